"""VMC training runs: run directory, exact resume, divergence handling, walker sharding over two
devices, evaluation with blocking error bars, and the ``vmc`` command line.

One configuration (H2, tiny network, KFAC, float64) is used throughout, so its functions are
traced and compiled once per process (:func:`vmc.train.problem_for` keeps them)."""

import dataclasses
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import background_run_for, log_lines, run_vmc_cli, without_timings

from vmc import evaluate, mcmc, train


def tiny_config(**vmc_changes) -> train.RunConfig:
    return train.preset_config("tiny", train.SystemConfig("H2"), float64=True, checkpoint_every=2, **vmc_changes)


def final_params(run_dir):
    config = train.load_run_config(run_dir)
    with train.precision(config.vmc):
        problem = train.problem_for(config)
        template = jax.eval_shape(lambda: problem.init_params(jax.random.PRNGKey(0)))
        return train.restore_params(run_dir, "vmc", template)


TWO_DEVICE_RUN = textwrap.dedent("""
    import json, sys
    import jax
    sys.path.insert(0, sys.argv[2])
    from test_vmc_train import tiny_config
    from vmc import train
    assert jax.device_count() == 2
    train.train(sys.argv[1], tiny_config(), max_steps=3, progress=False)
""")


@pytest.fixture(scope="module", autouse=True)
def two_device_run(request, tmp_path_factory):
    """The first 3 steps of the ``runs`` configuration with the walkers sharded over two forced
    CPU devices, in a subprocess started with the module (see conftest.BackgroundRun)."""
    run_dir = str(tmp_path_factory.mktemp("two") / "run")
    with background_run_for(request, "test_walkers_sharded_over_two_devices_give_the_same_run",
                            TWO_DEVICE_RUN, run_dir, os.path.dirname(__file__)) as background:
        yield run_dir, background


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6-step run made twice: straight through, and stopped after 3 steps and resumed."""
    base = tmp_path_factory.mktemp("vmc")
    straight, resumed = str(base / "straight"), str(base / "resumed")
    config = tiny_config()
    result = train.train(straight, config, max_steps=6, progress=False)
    train.train(resumed, config, max_steps=3, progress=False)
    train.train(resumed, config, max_steps=6, progress=False)
    return config, result, straight, resumed


def test_run_directory_is_complete(runs):
    config, result, straight, _ = runs
    assert result.pretrain_steps == config.vmc.pretrain_steps and result.steps == 6
    assert result.stopped_because == "max_steps"
    assert train.load_run_config(straight) == config
    assert os.path.isfile(os.path.join(straight, "energy.png"))
    entries = log_lines(straight)
    phases = [e["phase"] for e in entries]
    assert phases == ["pretrain"] * config.vmc.pretrain_steps + ["vmc"] * 6
    vmc_entries = [e for e in entries if e["phase"] == "vmc"]
    for key in ("energy", "variance", "acceptance", "step_size", "n_nonfinite", "n_walkers_reset",
                "learning_rate", "damping", "seconds"):
        assert key in vmc_entries[0]
    assert all(np.isfinite(e["energy"]) and e["n_nonfinite"] == 0 for e in vmc_entries)
    # Energies of a pretrained H2 wavefunction: near the HF energy (-1.117 Ha in STO-6G), above
    # the exact -1.1745 Ha up to the noise of 32 walkers.
    assert -1.5 < np.mean([e["energy"] for e in vmc_entries]) < -0.8


def test_resume_is_exact(runs):
    _, _, straight, resumed = runs
    a, b = log_lines(straight), log_lines(resumed)
    assert without_timings(a) == without_timings(b)  # same steps and values, no duplicated lines
    for x, y in zip(jax.tree.leaves(final_params(straight)), jax.tree.leaves(final_params(resumed))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_log_lines_after_the_last_checkpoint_are_dropped_on_resume(runs, tmp_path):
    config, _, straight, _ = runs
    import shutil

    run_dir = str(tmp_path / "run")
    shutil.copytree(straight, run_dir)
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps({"phase": "vmc", "step": 7, "energy": 0.0}) + "\n" + '{"phase": "vm')
    train.train(run_dir, config, max_steps=6, progress=False)  # nothing left to do
    assert log_lines(run_dir) == log_lines(straight)


def test_other_configuration_in_run_dir_is_rejected(runs):
    _, _, straight, _ = runs
    with pytest.raises(train.InputError, match="another configuration"):
        train.train(straight, tiny_config(seed=1), max_steps=6, progress=False)


def test_divergence_stops_and_keeps_the_last_checkpoint(runs, tmp_path, monkeypatch):
    config, _, straight, _ = runs
    import shutil

    run_dir = str(tmp_path / "run")
    shutil.copytree(straight, run_dir)
    with train.precision(config.vmc):
        problem = train.problem_for(config)
    good_step = problem.optimizer.step
    calls = []

    def poisoned_step(params, state, key, walkers):
        calls.append(1)
        params, state, stats = good_step(params, state, key, walkers)
        if len(calls) == 2:  # the second step of this resumed run returns NaN parameters
            params = jax.tree.map(lambda x: x * jnp.nan, params)
        return params, state, stats

    monkeypatch.setitem(problem.__dict__, "optimizer", problem.optimizer._replace(step=poisoned_step))
    # Step 7 succeeds (checkpoints every 2 steps: the last one is 6); step 8 diverges.
    with pytest.raises(train.TrainingDiverged, match=r"non-finite parameters after VMC step 7; "
                                                      r"the last checkpoint \(vmc step 6\) is kept"):
        train.train(run_dir, config, max_steps=10, progress=False)
    assert train.restore_step(run_dir, "vmc") == 6
    monkeypatch.undo()
    train.train(run_dir, config, max_steps=7, progress=False)  # resumes from step 6
    steps = [e["step"] for e in log_lines(run_dir) if e["phase"] == "vmc"]
    assert steps == list(range(1, 8))


def test_stored_configs_without_newer_ansatz_options_load_without_them():
    """A config.json written before an ansatz option existed describes a network trained
    without it, so loading it must switch the option off (the defaults are on)."""
    record = tiny_config().to_record()
    newer = ("smooth_distance_features", "atom_messages", "local_pooling")
    assert all(record["ansatz"][name] for name in newer)
    for name in newer:
        del record["ansatz"][name]
    loaded = train.RunConfig.from_record(json.loads(json.dumps(record)))
    assert not any(getattr(loaded.ansatz, name) for name in newer)
    assert dataclasses.replace(loaded.ansatz, smooth_distance_features=True, atom_messages=True,
                               local_pooling=True) == tiny_config().ansatz


def test_nonfinite_walkers_are_replaced_by_finite_ones():
    walkers = jnp.arange(5 * 2 * 3, dtype=jnp.float32).reshape(5, 2, 3)
    walkers = walkers.at[1, 0, 0].set(jnp.nan)
    log_psi = jnp.array([0.0, 1.0, -jnp.inf, 3.0, 4.0])
    state = mcmc.MCMCState(walkers, log_psi, jnp.asarray(0.1))
    repaired, n = mcmc.replace_nonfinite_walkers(state, jax.random.PRNGKey(0))
    assert int(n) == 2
    assert np.all(np.isfinite(repaired.walkers)) and np.all(np.isfinite(repaired.log_psi))
    for k in (0, 3, 4):  # good walkers stay
        np.testing.assert_array_equal(repaired.walkers[k], walkers[k])
    for k in (1, 2):  # bad ones become copies of good ones, with their log|psi|
        donor = [j for j in (0, 3, 4) if np.array_equal(repaired.walkers[k], walkers[j])]
        assert donor and float(repaired.log_psi[k]) == float(log_psi[donor[0]])


def test_blocking_error_of_correlated_series():
    rng = np.random.default_rng(0)
    n, rho, sigma = 2**15, 0.8, 1.0
    noise = rng.normal(0.0, sigma * np.sqrt(1 - rho**2), n)
    x = np.empty(n)
    x[0] = rng.normal(0.0, sigma)
    for i in range(1, n):
        x[i] = rho * x[i - 1] + noise[i]
    # AR(1): the variance of the mean is sigma^2 (1 + rho) / (1 - rho) / n for large n.
    expected = sigma * np.sqrt((1 + rho) / (1 - rho) / n)
    naive = x.std(ddof=1) / np.sqrt(n)
    assert naive < 0.4 * expected
    assert abs(evaluate.blocking_error(x) - expected) < 0.15 * expected
    iid = rng.normal(0.0, 1.0, n)
    assert abs(evaluate.blocking_error(iid) - 1 / np.sqrt(n)) < 0.15 / np.sqrt(n)


def test_evaluate_gives_energy_with_error_bar(runs):
    _, _, straight, _ = runs
    result = evaluate.evaluate(straight, n_steps=40, progress=False)
    assert result.checkpoint_step == 6 and result.n_nonfinite == 0
    assert result.burn_in_sweeps == evaluate.MIN_BURN_IN_SWEEPS  # the tiny preset's 4 is raised
    assert result.reference == pytest.approx(-1.1744757)
    assert 0 < result.error < 0.05 and result.variance > 0
    # A variational estimate: not below the exact energy by more than 4 error bars.
    assert result.energy > result.reference - 4 * result.error
    assert 0.2 < result.acceptance < 0.9


def test_cli_train_resume_and_evaluate(runs, tmp_path, capsys):
    config, _, straight, _ = runs
    run_dir = str(tmp_path / "cli")
    args = ["train", "H2", "--run-dir", run_dir, "--preset", "tiny", "--float64",
            "--set", "checkpoint_every=2", "--steps", "3", "--json"]
    code, out, _ = run_vmc_cli(args, capsys)
    assert code == 0 and json.loads(out)["steps"] == 3
    assert train.load_run_config(run_dir) == config
    code, out, _ = run_vmc_cli(["train", "--run-dir", run_dir, "--steps", "6", "--json"], capsys)
    assert code == 0 and json.loads(out)["steps"] == 6
    assert without_timings(log_lines(run_dir)) == without_timings(log_lines(straight))
    code, out, _ = run_vmc_cli(["evaluate", run_dir, "--steps", "10", "--burn-in", "3", "--json"], capsys)
    record = json.loads(out)
    assert code == 0 and record["checkpoint_step"] == 6 and np.isfinite(record["energy"])
    assert record["burn_in_sweeps"] == 3
    code, out, _ = run_vmc_cli(["evaluate", run_dir, "--steps", "10"], capsys)
    assert code == 0 and "exact -1.174476 Ha" in out


@pytest.mark.parametrize("args, message", [
    (["train", "Xx", "--steps", "3"], "unknown system 'Xx'"),
    (["train", "H2", "--steps", "3", "--charge", "3"], "charge"),
    (["train", "H2", "--steps", "3", "--walkers", "1"], "n_walkers >= 2"),
    (["train", "H2", "--steps", "3", "--set", "learning_rate=0.1"], "ambiguous"),
    (["train", "H2", "--steps", "3", "--set", "vmc.optimizer=sgd"], "unknown optimizer"),
    (["train", "H2", "--steps", "3", "--set", "nonsense=1"], "unknown setting"),
    (["train", "Na", "--steps", "3"], "slots"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    run_dir = tmp_path / "run"
    args = args[:2] + ["--run-dir", str(run_dir), "--preset", "tiny"] + args[2:]
    code, _, err = run_vmc_cli(args, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not run_dir.exists()


def test_cli_evaluate_without_checkpoint(tmp_path, capsys):
    code, _, err = run_vmc_cli(["evaluate", str(tmp_path)], capsys)
    assert code == 2 and "not a VMC run directory" in err


def test_walkers_sharded_over_two_devices_give_the_same_run(runs, two_device_run):
    _, _, straight, _ = runs
    run_dir, background = two_device_run
    out = background.wait()
    assert out.returncode == 0, out.stderr[-3000:]
    one = [e for e in log_lines(straight)][: len(log_lines(run_dir))]
    two = log_lines(run_dir)
    assert [e["step"] for e in one] == [e["step"] for e in two]
    for a, b in zip(one, two):
        for key in ("loss", "energy", "variance", "acceptance"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-8, abs=1e-10), (a, b)


def test_pretraining_fits_the_hartree_fock_orbitals():
    """LiH (1s and a Li-H bond orbital, s and p coefficients): 150 supervised steps on walkers
    from the HF density bring the squared orbital-matrix error below 1 % of its start."""
    config = train.preset_config("tiny", train.SystemConfig("LiH"), n_walkers=64, pretrain_learning_rate=3e-3)
    problem = train.problem_for(config)
    params = problem.init_params(jax.random.PRNGKey(0))
    opt_state = problem.pretrain_transform.init(params)
    sampler = mcmc.init_state(problem.hartree_fock_log_psi(), None,
                              problem.init_walkers(jax.random.PRNGKey(1)), 0.2)
    losses = []
    for key in jax.random.split(jax.random.PRNGKey(2), 150):
        sampler, _, _ = problem.sample_hartree_fock(None, sampler, key)
        params, opt_state, value = problem.pretrain_update(params, opt_state, sampler.walkers)
        losses.append(float(value))
    assert np.mean(losses[-10:]) < 1e-2 * losses[0]
