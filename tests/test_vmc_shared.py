"""Shared training over system sets: geometries batched as arguments (against the one-system
functions), the schedule, exact resume, fine-tuning from a base model, per-system and zero-shot
evaluation, and the ``vmc pretrain / finetune / evaluate --systems`` command line. (Ctrl-C and
kill -9 are tested on ``vmc train``, tests/test_vmc_train.py: the same engine and run layer.)

One tiny configuration on one small set (H2 at 1.0 and 3.0 bohr, and H3: two compositions, so
a step batches two geometries and one KFAC state serves both compositions) is trained once per
module; its :class:`vmc.train.Problem` is built once and passed to every run."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (ProcessGroupRun, assert_vmc_logs_agree, background_for, log_lines, reuse_problems,
                      run_vmc_cli, without_timings)

from molfoundation.errors import InputError
from vmc import ansatz, cli, evaluate, geometries, hamiltonian, loss, mcmc, system_sets, systems, train
from vmc.config import ScheduleConfig, SystemsConfig, load_config, preset_config

NAMES = ["H2_a", "H2_b", "H3"]
SET = [dataclasses.replace(s, name=n) for s, n in zip(
    [systems.hydrogen_chain(2, 1.0), systems.hydrogen_chain(2, 3.0), systems.hydrogen_chain(3, 1.6)], NAMES)]


def write_set(path):
    system_sets.write_system_set(str(path), SET)
    return str(path)


def tiny_config(set_file, **vmc_changes):
    settings = dict(float64=True, checkpoint_every=3, n_walkers=16, hf_fit_steps=4)
    settings.update(vmc_changes)
    return preset_config("tiny", SystemsConfig(set_file), ScheduleConfig(2), **settings)


def pretrain_args(set_file, run_dir, steps):
    """``vmc pretrain`` of :func:`tiny_config` on ``set_file``."""
    return ["pretrain", set_file, "--run-dir", run_dir, "--preset", "tiny", "--float64", "--geometries-per-step", "2",
            "--walkers", "16", "--hf-fit-steps", "4", "--set", "checkpoint_every=3", "--set", "laplacian=hessian",
            "--steps", str(steps)]


@pytest.fixture(scope="module", autouse=True)
def two_process_run(request, tmp_path_factory):
    """``vmc pretrain`` of the ``runs`` configuration as two processes of one run, two CPU devices
    each, every geometry's walkers split over all four, started with the module."""
    base = tmp_path_factory.mktemp("two_processes")
    command = ["vmc", *pretrain_args(write_set(base / "set.xyz"), str(base / "run"), 6)]
    with background_for(request, "test_two_processes_give_the_run_of_one",
                        lambda: ProcessGroupRun(command, devices_per_process=2)) as group:
        yield str(base / "run"), group


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6-step shared run straight through, and stopped after 3 steps and resumed."""
    base = tmp_path_factory.mktemp("shared")
    config = tiny_config(write_set(base / "set.xyz"))
    straight, resumed = str(base / "straight"), str(base / "resumed")
    problem = train.Problem.build(config, train.run_systems(straight, config), progress=False)
    result = train.train(straight, config, max_steps=6, progress=False, problem=problem)
    train.train(resumed, config, max_steps=3, progress=False, problem=problem)
    train.train(resumed, config, max_steps=6, progress=False, problem=problem)
    return config, result, straight, resumed, problem


def test_batched_geometries_give_the_mean_of_one_system_losses():
    """Value and gradient of the loss over two geometries in one batch equal the mean of the
    one-system losses built from the single-molecule functions (independent code path)."""
    with jax.enable_x64(True):
        network = ansatz.small_config(n_determinants=1, embedding_layers=1, gnn_iterations=1)
        pair = SET[:2]
        group = geometries.build_groups(pair, network, dtype=jnp.float64, progress=False)[0]
        fns = geometries.functions(network, "hessian")
        walkers = jnp.stack([mcmc.init_walkers(jax.random.PRNGKey(i), s.positions, s.charges, 1, 1, 8,
                                               dtype=jnp.float64) for i, s in enumerate(pair)])
        params = train.init_params(jax.random.PRNGKey(3), network, True)
        batch = geometries.GeometryBatch(walkers, group.geometries)
        grouped = loss.make_energy_loss(None, fns.local_energy, 5.0,
                                        batched_log_psi=geometries.over_batch(fns.log_psi))
        (value, stats), grads = jax.jit(jax.value_and_grad(grouped, has_aux=True))(params, batch)
        values, all_grads = [], []

        @jax.jit
        def single(params, walkers, inputs, positions, charges):
            # Both geometries have the same shapes: one compilation serves the two.
            log_psi = ansatz.make_log_psi(network, inputs).log_psi
            local_energy = hamiltonian.make_batched_local_energy(log_psi, positions, charges, "hessian")
            return jax.value_and_grad(loss.make_energy_loss(log_psi, local_energy, 5.0), has_aux=True)(
                params, walkers)

        for g, system in enumerate(pair):
            inputs = jax.tree.map(lambda x: x[g], group.geometries.inputs)
            (v, s), gr = single(params, walkers[g], inputs, jnp.asarray(system.positions),
                                jnp.asarray(system.charges))
            np.testing.assert_allclose(stats.energy[g], v, rtol=1e-12)
            np.testing.assert_allclose(stats.variance[g], s.variance, rtol=1e-10)
            values.append(v)
            all_grads.append(gr)
        np.testing.assert_allclose(value, np.mean(values), rtol=1e-12)
        expected = jax.tree.map(lambda a, b: (a + b) / 2, *all_grads)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        # The per-walker (KFAC) form of log|psi| is the plain batched one, on every walker or on
        # every second (compiled: op by op, the network takes seconds per call).
        plain = jax.jit(geometries.over_batch(fns.log_psi))(params, batch)
        np.testing.assert_allclose(jax.jit(geometries.make_kfac_log_psi(network))(params, batch), plain,
                                   rtol=1e-12)
        np.testing.assert_allclose(jax.jit(geometries.make_kfac_log_psi(network, 2))(params, batch),
                                   plain[:, ::2], rtol=1e-12)


class _Group:
    def __init__(self, members):
        self.members = tuple(members)


def test_schedule_round_robin_then_largest_spread():
    groups = [_Group([0, 2, 3]), _Group([1])]
    inf = np.inf
    # First pass: the least-visited (then first) geometry leads; its group fills the batch.
    g, rows = train.choose_geometries(np.full(4, inf), np.zeros(4, int), groups, 2, by_spread=True)
    assert g == 0 and rows.tolist() == [0, 1]
    g, rows = train.choose_geometries(np.full(4, inf), np.array([1, 0, 1, 0]), groups, 2, by_spread=True)
    assert g == 1 and rows.tolist() == [0]  # a group smaller than the batch gives what it has
    g, rows = train.choose_geometries(np.full(4, inf), np.array([1, 1, 1, 0]), groups, 2, by_spread=True)
    assert g == 0 and rows.tolist() == [2, 0]
    # Everything visited: the largest spread leads, then its group by spread.
    spread = np.array([0.1, 0.9, 0.5, 0.3])
    g, rows = train.choose_geometries(spread, np.ones(4, int), groups, 2, by_spread=True)
    assert g == 1 and rows.tolist() == [0]
    spread = np.array([0.1, 0.2, 0.5, 0.3])
    g, rows = train.choose_geometries(spread, np.ones(4, int), groups, 2, by_spread=True)
    assert g == 0 and rows.tolist() == [1, 2]
    # Round-robin ignores the spread.
    g, rows = train.choose_geometries(spread, np.array([2, 1, 2, 2]), groups, 2, by_spread=False)
    assert g == 1
    # A geometry below the minimum share of the mean visits (4 < 0.5 x 13) leads whatever the
    # spreads; at the share (7 >= 0.5 x 13.75) the spread decides again.
    spread = np.array([0.1, 0.9, 0.5, 0.3])
    g, rows = train.choose_geometries(spread, np.array([16, 16, 16, 4]), groups, 2, by_spread=True,
                                       min_share=0.5)
    assert g == 0 and rows.tolist() == [2, 0]
    g, rows = train.choose_geometries(spread, np.array([16, 16, 16, 7]), groups, 2, by_spread=True,
                                       min_share=0.5)
    assert g == 1
    g, rows = train.choose_geometries(spread, np.array([16, 16, 16, 4]), groups, 2, by_spread=True)
    assert g == 1  # without a minimum share the spread alone decides


def test_shared_run_directory_schedule_and_resume(runs):
    config, result, straight, resumed, _ = runs
    assert result.hf_fit_steps == 4 and result.steps == 6 and result.stopped_because == "max_steps"
    assert load_config(straight) == config
    assert [s.name for s in system_sets.read_system_set(os.path.join(straight, "systems.xyz"))] == NAMES
    assert os.path.isfile(os.path.join(straight, "energy.png"))
    entries = log_lines(straight)
    hf_fit = [e for e in entries if e["phase"] == "hf_fit"]
    assert [e["systems"] for e in hf_fit[:2]] == [["H2_a", "H2_b"], ["H3"]]
    vmc_entries = [e for e in entries if e["phase"] == "vmc"]
    # Round-robin over the compositions first; two geometries of H2 in one step.
    assert vmc_entries[0]["systems"] == ["H2_a", "H2_b"] and vmc_entries[1]["systems"] == ["H3"]
    for e in vmc_entries:
        assert len(e["energy"]) == len(e["systems"]) == len(e["step_size"])
        assert all(np.isfinite(e["energy"])) and e["n_nonfinite"] == 0
    assert sum(result.visits.values()) == sum(len(e["systems"]) for e in vmc_entries)
    # Resuming from the step-3 checkpoint continues exactly.
    assert without_timings(log_lines(resumed)) == without_timings(entries)


def test_evaluation_per_system_keeps_systems_apart(runs):
    """Every system of the set is evaluated separately: the same systems in reverse order give
    the same energies (within error bars) under their names."""
    config, _, straight, _, _ = runs
    network, params, _ = evaluate.load_model(straight)
    pair = SET[:2]
    options = dict(n_steps=50, n_walkers=64, burn_in_sweeps=20, progress=False)
    forward = evaluate.evaluate_model(network, params, config.vmc, pair, **options)
    backward = evaluate.evaluate_model(network, params, config.vmc, pair[::-1], seed=2, **options)
    assert [r.name for r in forward] == ["H2_a", "H2_b"]
    assert [r.name for r in backward] == ["H2_b", "H2_a"]
    for a, b in zip(forward, backward[::-1]):
        assert a.n_nonfinite == 0 and 0 < a.error < 0.1
        assert abs(a.energy - b.energy) < 4 * np.hypot(a.error, b.error)
    # 1.0 and 3.0 bohr differ by ~0.1 Ha: a swap of the two would show.
    assert abs(forward[0].energy - forward[1].energy) > 4 * np.hypot(forward[0].error, forward[1].error)


def test_cli_pretrain_resume_finetune_and_zero_shot(runs, tmp_path, capsys, monkeypatch):
    config, _, straight, _, problem = runs
    reuse_problems(monkeypatch, problem)
    run_dir = str(tmp_path / "base")
    args = pretrain_args(config.systems.spec, run_dir, 3) + ["--json"]
    code, out, _ = run_vmc_cli(args, capsys)
    assert code == 0 and json.loads(out)["steps"] == 3
    assert load_config(run_dir) == config
    code, out, _ = run_vmc_cli(["pretrain", "--run-dir", run_dir, "--steps", "6", "--json"], capsys)
    assert code == 0 and json.loads(out)["steps"] == 6
    assert without_timings(log_lines(run_dir)) == without_timings(log_lines(straight))
    code, out, _ = run_vmc_cli(["evaluate", run_dir, "--systems", "H2", "--steps", "10", "--burn-in", "4",
                                "--checkpoint", "3", "--json"], capsys)
    record = json.loads(out)
    assert code == 0 and record["parameters"] == "vmc step 3"
    assert record["systems"][0]["reference"] == pytest.approx(-1.1744757)
    # Fine-tuning starts from every weight of the base model, without an HF fit.
    finetuned = str(tmp_path / "finetuned")
    code, out, _ = run_vmc_cli(["finetune", run_dir, "H2", "--run-dir", finetuned, "--steps", "0", "--json"], capsys)
    assert code == 0 and json.loads(out)["hf_fit_steps"] == 0
    tuned = load_config(finetuned)
    assert tuned.init_from == os.path.abspath(run_dir)
    assert (tuned.ansatz, tuned.kfac, tuned.adam) == (config.ansatz, config.kfac, config.adam)
    assert tuned.vmc == dataclasses.replace(config.vmc, hf_fit_steps=0)
    assert (tuned.systems.basis, tuned.systems.localization) == (config.systems.basis, config.systems.localization)
    _, base_params, origin = evaluate.load_model(run_dir)
    assert origin == "vmc step 6"
    assert evaluate.load_model(run_dir, step=4)[2] == "hf_fit step 4"  # the HF fit's last checkpoint
    with pytest.raises(InputError, match="has no checkpoint 5"):
        evaluate.load_model(run_dir, step=5)
    _, params, origin = evaluate.load_model(finetuned)
    assert origin == "vmc step 0"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_params)):
        np.testing.assert_array_equal(a, b)
    code, out, _ = run_vmc_cli(["finetune", run_dir, "--run-dir", finetuned, "--steps", "2", "--json"], capsys)
    assert code == 0 and json.loads(out)["steps"] == 2
    # Shipped as a named model: its card's check values reproduced, fine-tuned by name.
    from vmc import shipped

    monkeypatch.setattr(shipped, "MODELS", dataclasses.replace(shipped.MODELS, directory=str(tmp_path / "models")))
    code, out, _ = run_vmc_cli(["export", run_dir, "tiny-chains", "--made-by", "this test", "--eval-steps", "4",
                                "--burn-in", "2"],
                               capsys)
    assert code == 0 and out.startswith("wrote tiny-chains: vmc step 6"), out
    record = shipped.MODELS.read_record("tiny-chains")
    assert [r["name"] for r in record["card"]["evaluation"]["systems"]] == NAMES
    assert shipped.load_config("tiny-chains") == config
    check = shipped.MODELS.read_arrays("tiny-chains", shipped.CHECK_FILE)
    log_psi, energies = shipped.check_values(config, shipped.load_params("tiny-chains")[1], SET[0], check["walkers"])
    np.testing.assert_array_equal(log_psi, check["log_psi"])
    np.testing.assert_array_equal(energies, check["local_energy"])
    named = str(tmp_path / "named")
    code, out, _ = run_vmc_cli(["finetune", "tiny-chains", "H2", "--run-dir", named, "--steps", "0", "--json"], capsys)
    assert code == 0 and load_config(named).init_from == "tiny-chains"
    for a, b in zip(jax.tree.leaves(evaluate.load_model(named)[1]), jax.tree.leaves(base_params)):
        np.testing.assert_array_equal(a, b)
    code, _, err = run_vmc_cli(["evaluate", "tiny-chains", "--checkpoint", "3"], capsys)
    assert code == 2 and "shipped model" in err


def test_two_processes_give_the_run_of_one(runs, two_process_run):
    """Two processes joined by jax.distributed (gloo on 127.0.0.1), each with half of every
    geometry's walkers sharded over its two devices, give the schedule, energies and parameters
    of the single-process run on one device;
    process 0 alone writes the log, the configuration and the plot, and both write the
    checkpoints together. (``vmc train`` runs this engine on a set of one.)"""
    config, _, straight, _, _ = runs
    run_dir, group = two_process_run
    for i, out in enumerate(group.wait()):
        assert out.returncode == 0, (i, out.stderr[-3000:])
    assert dataclasses.replace(load_config(run_dir), systems=config.systems) == config
    assert os.path.isfile(os.path.join(run_dir, "energy.png"))
    one, two = log_lines(straight), log_lines(run_dir)
    assert [(e["phase"], e["step"], e["systems"]) for e in one] == [(e["phase"], e["step"], e["systems"]) for e in two]
    assert_vmc_logs_agree(one, two)
    for x, y in zip(jax.tree.leaves(evaluate.load_model(straight)[1]), jax.tree.leaves(evaluate.load_model(run_dir)[1])):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("args, message", [
    (["pretrain", "hchains:x@1", "--steps", "3"], "hydrogen chain length"),
    (["pretrain", "nonsense", "--steps", "3"], "or a system set"),
    (["pretrain", "H2", "--steps", "3", "--geometries-per-step", "0"], "geometries_per_step"),
    (["pretrain", "H2", "--steps", "3", "--set", "schedule.schedule=random"], "unknown schedule"),
    (["finetune", "missing_base", "H2", "--steps", "3"], "not a VMC run directory"),
    (["finetune", "missing_base", "--steps", "3"], "SYSTEMS is needed"),
    (["pretrain", "H2", "--steps", "3", "--orbitals", "missing_phisnet_run"], "not a PhiSNet training run directory"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    run_dir = tmp_path / "run"
    code, _, err = run_vmc_cli(args + ["--run-dir", str(run_dir)], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not run_dir.exists()


def test_every_vmc_subcommand_has_help(capsys):
    assert {"train", "evaluate", "pretrain", "finetune"} <= set(cli.vmc.commands)
    for name in cli.vmc.commands:
        code, out, _ = run_vmc_cli([name, "--help"], capsys)
        assert code == 0 and out.startswith("Usage: ") and f" {name} [OPTIONS]" in out
