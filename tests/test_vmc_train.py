"""VMC training of one system (a set of one): run directory, exact resume, divergence handling,
evaluation with blocking error bars, and the ``vmc`` command line. (Walkers sharded over several
devices and processes are tested on ``vmc pretrain``, tests/test_vmc_shared.py: the same engine.)

One configuration (H2, tiny network, KFAC, float64) is used throughout; its
:class:`vmc.train.Problem` is built once per module and passed to every run, so its functions
are traced and compiled once."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (assert_same_checkpoints, compile_events, directory_digest, log_lines,
                      reuse_problems, run_vmc_cli, sigint_then_kill_9, without_timings)

from molfoundation.errors import InputError, TrainingDiverged
from vmc import evaluate, mcmc, train
from vmc.config import SCHEMA_VERSION, SystemsConfig, load_config, preset_config, run_directory
from vmc.geometries import GeometryBatch


def tiny_config(**vmc_changes):
    return preset_config("tiny", SystemsConfig("H2"), float64=True, checkpoint_every=2, **vmc_changes)


def final_params(run_dir):
    return evaluate.load_model(run_dir)[1]


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    config = tiny_config()
    return train.Problem.build(config, train.run_systems(str(tmp_path_factory.mktemp("none")), config),
                               progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, problem):
    """The same 6-step run made twice: straight through, and stopped after 3 steps and resumed;
    and what the straight run lowered and compiled (conftest.compile_events)."""
    base = tmp_path_factory.mktemp("vmc")
    straight, resumed = str(base / "straight"), str(base / "resumed")
    config = problem.config
    with compile_events() as events:
        result = train.train(straight, config, max_steps=6, progress=False, problem=problem)
    train.train(resumed, config, max_steps=3, progress=False, problem=problem)
    train.train(resumed, config, max_steps=6, progress=False, problem=problem)
    return config, result, straight, resumed, events


def test_run_directory_is_complete(runs):
    config, result, straight, _, _ = runs
    assert result.hf_fit_steps == config.vmc.hf_fit_steps and result.steps == 6
    assert result.stopped_because == "max_steps" and result.visits == {"H2": 6}
    assert load_config(straight) == config
    assert os.path.isfile(os.path.join(straight, "energy.png"))
    entries = log_lines(straight)
    phases = [e["phase"] for e in entries]
    assert phases == ["hf_fit"] * config.vmc.hf_fit_steps + ["vmc"] * 6
    vmc_entries = [e for e in entries if e["phase"] == "vmc"]
    for key in ("energy", "variance", "acceptance", "step_size", "n_nonfinite", "n_walkers_reset",
                "learning_rate", "damping", "seconds", "time"):
        assert key in vmc_entries[0]
    assert all(e["systems"] == ["H2"] and np.isfinite(e["energy"][0]) and e["n_nonfinite"] == 0
               for e in vmc_entries)
    # Energies of an HF-fitted H2 wavefunction: near the HF energy (-1.117 Ha in STO-6G), above
    # the exact -1.1745 Ha up to the noise of 32 walkers.
    assert -1.5 < np.mean([e["energy"][0] for e in vmc_entries]) < -0.8
    assert result.energies["H2"] == vmc_entries[-1]["energy"][0]  # the last 10 % of 6 visits: one


def test_vmc_update_compiles_once_alongside_the_hf_fit(runs):
    """VMC's update is lowered for a stand-in state and compiled in a thread during the HF fit
    (train._compile_vmc_updates); the real steps reuse that program only if the stand-in matched
    their arguments exactly (shapes, dtypes, placement), else they lower and compile it again."""
    *_, events = runs
    # Two functions named update, the HF fit's Adam step and VMC's: both traced and lowered in
    # the main thread, each compiled once, VMC's in the other thread.
    assert [main for event, name, main in events if (event, name) == ("lowered", "update")] == [True, True]
    assert sorted(main for event, name, main in events if (event, name) == ("compiled", "update")) == [False, True]
    assert [(event, name) for event, name, _ in events].count(("lowered", "take")) == 1


def test_run_directory_of_another_schema_version_is_refused(runs, tmp_path):
    _, _, straight, _, _ = runs
    path = os.path.join(straight, "config.json")
    record = json.load(open(path))
    assert record["kind"] == "vmc" and record["schema_version"] == SCHEMA_VERSION
    record["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match=f"holds schema version {SCHEMA_VERSION + 1}; this version of "
                                         f"the code reads VMC runs of schema version {SCHEMA_VERSION}"):
        load_config(str(tmp_path))


def test_resume_is_exact(runs):
    _, _, straight, resumed, _ = runs
    a, b = log_lines(straight), log_lines(resumed)
    assert without_timings(a) == without_timings(b)  # same steps and values, no duplicated lines
    for x, y in zip(jax.tree.leaves(final_params(straight)), jax.tree.leaves(final_params(resumed))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_log_lines_after_the_last_checkpoint_are_dropped_on_resume(runs, tmp_path):
    config, _, straight, _, _ = runs
    import shutil

    run_dir = str(tmp_path / "run")
    shutil.copytree(straight, run_dir)
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps({"phase": "vmc", "step": 7, "energy": 0.0}) + "\n" + '{"phase": "vm')
    train.train(run_dir, config, max_steps=6, progress=False)  # nothing left to do (problem built anew)
    assert log_lines(run_dir) == log_lines(straight)


def test_other_configuration_in_run_dir_is_rejected(runs):
    _, _, straight, _, _ = runs
    with pytest.raises(InputError, match="another configuration"):
        train.train(straight, tiny_config(seed=1), max_steps=6, progress=False)


def test_divergence_stops_and_keeps_the_last_checkpoint(runs, problem, tmp_path, monkeypatch):
    config, _, straight, _, _ = runs
    import shutil

    run_dir = str(tmp_path / "run")
    shutil.copytree(straight, run_dir)
    good_step = problem.vmc_step
    calls = []

    def poisoned_step(group):
        good = good_step(group)

        def poisoned_update(params, opt_state, *args):
            nan = jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, opt_state)
            return good.update(params, nan, *args)

        def step(*args):
            calls.append(1)
            # The second step of this resumed run updates from a NaN optimiser state: its local
            # energies are finite, the parameters it returns are not.
            return (good._replace(update=poisoned_update) if len(calls) == 2 else good)(*args)

        step.take, step.sample, step.update = good  # what the update's compilation ahead runs
        return step

    monkeypatch.setattr(problem, "vmc_step", poisoned_step)
    # Step 7 succeeds (checkpoints every 2 steps: the last one is 6); step 8 diverges.
    with pytest.raises(TrainingDiverged, match=r"non-finite parameters after VMC step 7; "
                                                r"the last checkpoint \(vmc step 6\) is kept"):
        train.train(run_dir, config, max_steps=10, progress=False, problem=problem)
    assert run_directory(run_dir).latest_step("vmc") == 6
    monkeypatch.undo()
    train.train(run_dir, config, max_steps=7, progress=False, problem=problem)  # resumes from step 6
    steps = [e["step"] for e in log_lines(run_dir) if e["phase"] == "vmc"]
    assert steps == list(range(1, 8))


def test_sigint_then_kill_9_then_resume_gives_the_uninterrupted_run(problem, tmp_path):
    """``vmc train`` stopped by Ctrl-C and then by kill -9, each at a random moment, and run
    again ends with the state and log of a run that was never interrupted."""
    config, steps = problem.config, 30
    reference = str(tmp_path / "reference")
    train.train(reference, config, max_steps=steps, progress=False, problem=problem)
    run_dir = str(tmp_path / "run")
    command = ["vmc", "train", "H2", "--run-dir", run_dir, "--preset", "tiny", "--float64",
               "--set", "checkpoint_every=2", "--steps", str(steps)]
    last_line = config.vmc.hf_fit_steps + steps - 2
    sigint_then_kill_9(command, os.path.join(run_dir, "log.jsonl"), last_line, (1, 2))
    train.train(run_dir, config, max_steps=steps, progress=False, problem=problem)
    assert without_timings(log_lines(run_dir)) == without_timings(log_lines(reference))
    assert_same_checkpoints(reference, run_dir, ("hf_fit", "vmc"))


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_damaged_checkpoints_are_one_line_errors_and_nothing_is_written(runs, problem, tmp_path, capsys,
                                                                       monkeypatch, damage):
    _, _, straight, _, _ = runs
    run_dir = str(tmp_path / "run")
    shutil.copytree(straight, run_dir)
    checkpoints = os.path.join(run_dir, "checkpoints", "vmc")
    if damage == "missing":
        shutil.rmtree(checkpoints)
        expected = "vmc checkpoints of"
    else:
        for root, _, files in os.walk(os.path.join(checkpoints, "6")):
            for name in files:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"not a checkpoint")
        expected = "cannot restore checkpoint 6"
    before = directory_digest(run_dir)
    code, out, err = run_vmc_cli(["train", "--run-dir", run_dir, "--steps", "8"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert directory_digest(run_dir) == before
    if damage == "corrupt":
        # The error names the older intact checkpoint; deleting the damaged one as it says
        # resumes from there, and the log is trimmed to it.
        damaged = os.path.join(checkpoints, "6")
        assert (f"checkpoint 4 there is intact: load it explicitly (--checkpoint 4), or delete {damaged} "
                f"to resume training from step 4") in err
        shutil.rmtree(damaged)
        reuse_problems(monkeypatch, problem)
        code, _, err = run_vmc_cli(["train", "--run-dir", run_dir, "--steps", "8"], capsys)
        assert code == 0, err
        assert [e["step"] for e in log_lines(run_dir) if e["phase"] == "vmc"] == list(range(1, 9))


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


def test_evaluate_gives_energy_with_error_bar(runs, problem):
    _, _, straight, _, _ = runs
    result = evaluate.evaluate_run(straight, n_steps=40, progress=False)
    h2, = result.systems
    assert result.parameters == "vmc step 6" and h2.name == "H2" and h2.n_nonfinite == 0
    assert result.burn_in_sweeps == evaluate.MIN_BURN_IN_SWEEPS  # the tiny preset's 4 is raised
    assert h2.reference == pytest.approx(-1.1744757)
    assert 0 < h2.error < 0.05 and h2.variance > 0
    # A variational estimate: not below the exact energy by more than 4 error bars.
    assert h2.energy > h2.reference - 4 * h2.error
    assert 0.2 < h2.acceptance < 0.9


def test_cli_train_resume_and_evaluate(runs, problem, tmp_path, capsys, monkeypatch):
    config, _, straight, _, _ = runs
    reuse_problems(monkeypatch, problem)
    run_dir = str(tmp_path / "cli")
    args = ["train", "H2", "--run-dir", run_dir, "--preset", "tiny", "--float64",
            "--set", "checkpoint_every=2", "--steps", "3", "--json"]
    code, out, _ = run_vmc_cli(args, capsys)
    assert code == 0 and json.loads(out)["steps"] == 3
    assert load_config(run_dir) == config
    code, out, _ = run_vmc_cli(["train", "--run-dir", run_dir, "--steps", "6", "--json"], capsys)
    assert code == 0 and json.loads(out)["steps"] == 6
    assert without_timings(log_lines(run_dir)) == without_timings(log_lines(straight))
    code, out, _ = run_vmc_cli(["train", "--run-dir", run_dir, "--steps", "6"], capsys)  # nothing left to do
    assert code == 0 and "H2: " in out and f"vmc evaluate {run_dir}" in out  # the training energy is no evaluation
    code, out, _ = run_vmc_cli(["evaluate", run_dir, "--steps", "10", "--burn-in", "3", "--json"], capsys)
    record = json.loads(out)
    assert code == 0 and record["parameters"] == "vmc step 6" and np.isfinite(record["systems"][0]["energy"])
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
    (["train", "Na", "--steps", "3"], "supports only H-Ne"),
    (["train", "H2", "--steps", "3", "--num-processes", "2"], "missing: coordinator, process id"),
    (["train", "H2", "--steps", "3", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "process id 2 is not in 0..1"),
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


def test_hf_fit_reaches_the_hartree_fock_orbitals():
    """LiH (1s and a Li-H bond orbital, s and p coefficients): 150 supervised steps on walkers
    from the HF density bring the squared orbital-matrix error below 1 % of its start."""
    config = preset_config("tiny", SystemsConfig("LiH"), n_walkers=64, hf_fit_learning_rate=3e-3)
    problem = train.Problem.build(config, progress=False)
    group = problem.groups[0]
    rows = jnp.zeros((1,), jnp.int32)
    params = train.init_params(jax.random.PRNGKey(0), config.ansatz, False)
    opt_state = problem.hf_fit_transform.init(params)
    sampler = problem.init_sampler(group, params, problem.init_walkers(jax.random.PRNGKey(1), group),
                                   hartree_fock=True)
    sample, update = problem.sampler(group, hartree_fock=True), problem.hf_fit_update(group)
    losses = []
    for key in jax.random.split(jax.random.PRNGKey(2), 150):
        sampler, _, _ = sample(None, sampler, rows, key)
        params, opt_state, value = update(params, opt_state, GeometryBatch(sampler.walkers, group.geometries))
        losses.append(float(value))
    assert np.mean(losses[-10:]) < 1e-2 * losses[0]


def test_fresh_walkers_come_from_the_hartree_fock_density(problem):
    """Problem.fresh_sampler: 30 calls on H2's HF density move the Gaussians around the atoms
    (mean electron-nucleus energy -2.7 Ha) to the HF density, whose mean <V_ne> is pyscf's
    trace(D V_nuc) (-3.72 Ha in STO-6G): 4 x 32 walkers gave -3.89 Ha with a standard error of
    0.14 Ha, so 0.5 Ha is 3.5 standard errors. The state's log|psi| is the network's."""
    from pyscf import scf

    from molfoundation import runs

    group = problem.groups[0]
    system = group.systems[0]
    with runs.precision(True):
        params = train.init_params(jax.random.PRNGKey(0), problem.config.ansatz, True)
        samplers = [problem.fresh_sampler(group, params, jax.random.PRNGKey(k), 30) for k in range(4)]
        log_psi = jax.vmap(problem.functions.log_psi, in_axes=(None, 0))(
            (params, jax.tree.map(lambda x: x[0], group.geometries)), samplers[0].walkers[0])
    np.testing.assert_allclose(samplers[0].log_psi[0], log_psi, rtol=1e-12)
    walkers = np.concatenate([np.asarray(s.walkers[0]) for s in samplers])
    distances = np.linalg.norm(walkers[..., None, :] - np.asarray(system.positions), axis=-1)
    v_ne = (-np.asarray(system.charges) / distances).sum((-1, -2))
    mol = system.to_pyscf(problem.config.systems.basis)
    density = scf.RHF(mol).run(conv_tol=1e-10, verbose=0).make_rdm1()
    expected = np.einsum("ij,ji", density, mol.intor("int1e_nuc"))
    assert abs(v_ne.mean() - expected) < 0.5
