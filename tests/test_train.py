"""PhiSNet training: learning, exact resume, data parallelism, divergence handling, CLI."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import scipy.linalg

from phisnet_jax import train as training
from molfoundation import molecules
from molfoundation.errors import InputError
from phisnet_jax.evaluate import load_trained_model, orbital_metrics
from phisnet_jax.generate import GenerationRequest, generate
from phisnet_jax.model import PhiSNetConfig, make_inputs
from phisnet_jax.reference import LevelOfTheory
from phisnet_jax.sampling import thermal_ensemble
from conftest import (ProcessGroupRun, assert_same_checkpoints, background_for, compile_events,
                      directory_digest, sigint_then_kill_9, run_phisnet_cli, start_geometry, without_timings)

# The CLI's "tiny" preset on water in STO-3G.
TINY = PhiSNetConfig(basis="sto-3g", elements=(1, 8), features=8, max_order=2, num_modules=1,
                     num_radial=16, overlap_features=4, residual_blocks=0, head_residual_blocks=1)


@pytest.fixture(scope="module")
def water_data(tmp_path_factory):
    """16 HF/STO-3G water geometries at 500 K."""
    path = str(tmp_path_factory.mktemp("data") / "water.h5")
    level = LevelOfTheory("hf", "sto-3g")
    request = GenerationRequest(output=path, name="water", source="test", n_samples=16, level=level)
    generate(request, lambda: thermal_ensemble(start_geometry("water"), level, 500.0, seed=1), log=lambda m: None)
    return path


# ``run()``'s configuration on the command line (train for STEPS more).
def train_command(data, run_dir, steps):
    return ["phisnet_jax", "train", data, "--run-dir", run_dir, "--train", "8", "--valid", "4",
            "--preset", "tiny", "--batch-size", "4", "--float64", "--set", "validate_every=4",
            "--set", "log_every=1", "--set", "learning_rate=3e-3", "--steps", str(steps)]


@pytest.fixture(scope="module", autouse=True)
def two_process_run(request, water_data, tmp_path_factory):
    """``phisnet train`` of ``run()``'s configuration for 4 steps (one validation) as two
    processes of one run, two CPU devices each (the batch of 4 split over all four), started
    with the module; with a time budget too (never reached), which process 0 decides for all."""
    run_dir = str(tmp_path_factory.mktemp("two_processes") / "run")
    command = train_command(water_data, run_dir, 4) + ["--time-budget", "3600"]
    with background_for(request, "test_two_processes_give_the_run_of_one",
                        lambda: ProcessGroupRun(command, devices_per_process=2)) as group:
        yield run_dir, group


def data_config(path):
    return training.DataConfig(path, ("water",), n_train=8, n_valid=4)


# The compiled training functions of each configuration these tests train, made once.
FUNCTIONS = {}


def functions_for(**overrides):
    """The TrainConfig these tests use (float64 unless overridden) and its compiled functions."""
    settings = dict(batch_size=4, validate_every=4, log_every=1, learning_rate=3e-3, float64=True)
    cfg = training.TrainConfig(**{**settings, **overrides})
    key = training.compiled_settings(cfg)
    if key not in FUNCTIONS:
        FUNCTIONS[key] = training.make_training_functions(TINY, cfg)
    return cfg, FUNCTIONS[key]


def run(run_dir, path, steps, time_budget=None, **overrides):
    """Train TINY on the first 8 samples for ``steps`` steps (one configuration throughout, so
    one compiled step serves every test)."""
    cfg, functions = functions_for(**overrides)
    return training.train(str(run_dir), TINY, cfg, data_config(path), max_steps=steps, time_budget=time_budget,
                          progress=False, functions=functions)


def fresh_state(path):
    """(config, compiled functions, training data, a fresh TrainState) of ``run``'s configuration."""
    from phisnet_jax.data import SplitSpec, load_splits

    cfg, functions = functions_for()
    with jax.enable_x64(True):
        data = load_splits(path, ["water"], TINY, SplitSpec(8, 4))["train"]
        inputs = training.cast_inputs(data.inputs, np.float64)
        state = training.init_state(functions.model, cfg, inputs, functions.optimizer, data, init=functions.init)
    return cfg, functions, data, state


def test_ema_follows_its_warm_up_formula(water_data):
    """After a step from step t the EMA is d e + (1 - d) p with d = min(0.999, (1 + t) / (10 + t)),
    checked at t = 0 (d = 0.1) and t = 10000 (d = 0.999)."""
    cfg, functions, data, state = fresh_state(water_data)
    batch = data.take(np.arange(4))
    with jax.enable_x64(True):
        for t, decay in ((0, 0.1), (10000, 0.999)):
            start = state.replace(step=jax.numpy.asarray(t, jax.numpy.int32),
                                  ema_params=jax.tree.map(lambda x: x + 0.01, state.params))
            ema_before = jax.tree.map(np.array, start.ema_params)  # the step donates its state
            new, _ = functions.step(jax.tree.map(jax.numpy.array, start), training.cast_inputs(batch.inputs, np.float64),
                                    batch.fock, batch.overlap, training.batch_labels(batch, TINY, cfg, np.float64))
            for e0, p1, e1 in zip(jax.tree.leaves(ema_before), jax.tree.leaves(new.params), jax.tree.leaves(new.ema_params)):
                np.testing.assert_allclose(e1, decay * e0 + (1 - decay) * np.asarray(p1), rtol=1e-12, atol=1e-15)


def test_reduce_on_plateau_halves_after_patience_bad_validations(water_data):
    """Validation losses 1.0, 0.9, 0.95, 0.92, 0.8, 0.85, 0.85 with patience 2: the learning rate
    halves after the 2nd bad validation in a row (the 4th) and again after the 7th; a better
    loss resets the count."""
    cfg, functions, data, state = fresh_state(water_data)
    cfg = dataclasses.replace(cfg, plateau_patience=2, plateau_factor=0.5)
    losses = iter([1.0, 0.9, 0.95, 0.92, 0.8, 0.85, 0.85])
    rates = []
    with jax.enable_x64(True):
        for _ in range(7):
            state, entry = training._validate(state, lambda params, data: {"loss": next(losses)}, data, cfg)
            rates.append(entry["learning_rate"])
    lr = cfg.learning_rate
    assert rates == pytest.approx([lr, lr, lr, lr / 2, lr / 2, lr / 2, lr / 4])
    assert float(state.best_valid) == 0.8 and int(state.bad_validations) == 0


def test_time_budget_and_minimum_learning_rate_stop_a_run(tmp_path, water_data):
    result = run(tmp_path / "budget", water_data, 1000, time_budget=0.0)
    assert result.stopped_because == "time_budget" and result.steps == 0
    result = run(tmp_path / "budget", water_data, 1000, time_budget=3.0)  # resumes, runs out again
    assert result.stopped_because == "time_budget" and 0 < result.steps < 1000
    result = run(tmp_path / "slow", water_data, 8, min_learning_rate=3e-3 * 1.01)
    assert result.stopped_because == "min_learning_rate" and result.steps == 0


def test_budget_schedule_follows_the_larger_of_step_and_time_progress():
    cfg = training.TrainConfig(learning_rate=1e-3, min_learning_rate=1e-5)
    assert training.budget_progress(0.0, 5, 20, 0.0, None) == 0.25
    assert training.budget_progress(0.2, 0, None, 30.0, 60.0) == pytest.approx(0.6)  # 0.2 + 0.8 * 30/60
    assert training.budget_progress(0.0, 5, 20, 30.0, 60.0) == 0.5  # time ahead of steps
    assert training.budget_progress(0.7, 5, 20, 0.0, None) == 0.7  # never back
    assert training.budget_progress(0.0, 5, 20, 90.0, 60.0) == 1.0
    assert [training.budget_learning_rate(cfg, p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1e-3, 5.05e-4, 1e-5])


def test_budget_schedule_decays_over_the_steps_and_resumes_exactly(tmp_path, water_data, monkeypatch):
    """lr_schedule="budget" over 8 steps: step k runs at 3e-3 + (1e-5 - 3e-3) k/8, and a run
    interrupted (Ctrl-C) at step 5 and resumed ends with the same parameters."""
    overrides = dict(lr_schedule="budget", min_learning_rate=1e-5)
    result = run(tmp_path / "straight", water_data, 8, **overrides)
    assert result.steps == 8 and result.stopped_because == "max_steps"
    rates = [e["learning_rate"] for e in map(json.loads, open(tmp_path / "straight" / "log.jsonl")) if "loss" in e]
    assert rates == pytest.approx([3e-3 + (1e-5 - 3e-3) * k / 8 for k in range(8)], rel=1e-12)
    real_rows = training.batch_rows

    def interrupted_at_5(step, *args):
        if step == 5:
            raise KeyboardInterrupt
        return real_rows(step, *args)

    monkeypatch.setattr(training, "batch_rows", interrupted_at_5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", water_data, 8, **overrides)
    monkeypatch.setattr(training, "batch_rows", real_rows)
    run(tmp_path / "resumed", water_data, 8, **overrides)
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unknown_or_unlimited_schedules_are_refused(tmp_path, water_data):
    with pytest.raises(InputError, match="lr_schedule must be one of plateau, budget, not 'cosine'"):
        run(tmp_path / "a", water_data, 8, lr_schedule="cosine")
    with pytest.raises(InputError, match='lr_schedule "budget" needs a step limit or a time budget'):
        run(tmp_path / "b", water_data, None, lr_schedule="budget")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def final_params(run_dir):
    template_cfg = training.load_run_config(str(run_dir))
    trained = load_trained_model(str(run_dir))
    assert trained.config == template_cfg[0]
    return trained


def test_loss_decreases_and_run_dir_is_complete(tmp_path, water_data):
    result = run(tmp_path / "run", water_data, 24)
    assert result.steps == 24 and result.stopped_because == "max_steps"
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    losses = [e["loss"] for e in log if "loss" in e]
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4])  # observed: 0.59 -> 0.46
    assert any("valid_fock_mae" in e for e in log)
    for name in ("config.json", "learning_curve.png", "checkpoints"):
        assert (tmp_path / "run" / name).exists()


def test_a_fresh_run_takes_the_step_compiled_during_initialisation(tmp_path, water_data):
    """The step lowered for a stand-in state and compiled in a thread while the parameters
    are made is the one the run's steps call: it is lowered in the main thread and compiled
    once, not again for arguments that differ from the stand-in's in dtype, weak type or
    placement."""
    cfg, _ = functions_for()
    functions = training.make_training_functions(TINY, cfg)
    with compile_events() as events:
        training.train(str(tmp_path / "run"), TINY, cfg, data_config(water_data), max_steps=2, progress=False,
                       functions=functions)
    assert [(event, main) for event, name, main in events if name == "train_step"] == [("lowered", True),
                                                                                       ("compiled", False)]


def test_resume_is_exact(tmp_path, water_data):
    run(tmp_path / "straight", water_data, 8)
    run(tmp_path / "resumed", water_data, 4)  # checkpoint at step 4 (a validation step)
    run(tmp_path / "resumed", water_data, 8)
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    assert a.step == b.step == 8
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, water_data, monkeypatch):
    run(tmp_path / "run", water_data, 4)
    real_load = training.load_splits

    def poisoned(*args, **kwargs):
        splits = real_load(*args, **kwargs)
        splits["train"].fock[:] = np.nan
        return splits

    monkeypatch.setattr(training, "load_splits", poisoned)
    with pytest.raises(training.TrainingDiverged, match="non-finite loss at step 4"):
        run(tmp_path / "run", water_data, 8)
    assert load_trained_model(str(tmp_path / "run")).step == 4


def test_other_configuration_in_run_dir_is_rejected(tmp_path, water_data):
    run(tmp_path / "run", water_data, 1)
    with pytest.raises(Exception, match="another configuration"):
        training.train(str(tmp_path / "run"), TINY, training.TrainConfig(batch_size=2),
                       data_config(water_data), max_steps=2, progress=False)


def test_run_directory_of_another_schema_version_is_refused(tmp_path, water_data):
    run(tmp_path / "run", water_data, 1)
    path = tmp_path / "run" / "config.json"
    record = json.loads(path.read_text())
    assert record["kind"] == "phisnet" and record["schema_version"] == training.SCHEMA_VERSION
    del record["schema_version"]
    path.write_text(json.dumps(record))
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(InputError, match=f"unversioned configuration; this version of the code reads "
                                         f"PhiSNet training runs of schema version {training.SCHEMA_VERSION}"):
        run(tmp_path / "run", water_data, 2)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


def test_two_processes_give_the_run_of_one(tmp_path, water_data, two_process_run):
    """Two processes joined by jax.distributed (gloo on 127.0.0.1), each with half of every
    batch split over its two devices, give the log and parameters of the single-process run on
    one device; process 0 alone writes the log, the configuration and the learning curve."""
    run(tmp_path / "one", water_data, 4)
    run_dir, group = two_process_run
    for i, out in enumerate(group.wait()):
        assert out.returncode == 0, (i, out.stderr[-3000:])
    assert training.load_run_config(run_dir) == training.load_run_config(str(tmp_path / "one"))
    assert os.path.isfile(os.path.join(run_dir, "learning_curve.png"))
    one, two = (training.run_directory(d).read_log() for d in (str(tmp_path / "one"), run_dir))
    assert [e["step"] for e in one] == [e["step"] for e in two]  # no line twice
    for a, b in zip(one, two):
        for key, value in a.items():
            if key not in ("seconds", "time"):
                assert b[key] == pytest.approx(value, rel=1e-10, abs=1e-14), key
    with jax.enable_x64(True):
        one, two = (jax.tree.leaves(load_trained_model(d).params) for d in (str(tmp_path / "one"), run_dir))
    for x, y in zip(one, two):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-10, atol=1e-14)


def test_sigint_then_kill_9_then_resume_gives_the_uninterrupted_run(tmp_path, water_data):
    """``phisnet train`` stopped by Ctrl-C and then by kill -9, each at a random moment, and run
    again ends with the state and log of a run that was never interrupted."""
    steps = 24
    run(tmp_path / "reference", water_data, steps)
    run_dir = str(tmp_path / "run")
    command = train_command(water_data, run_dir, steps)
    last_line = steps + steps // 4 - 2  # a line per step and per validation
    sigint_then_kill_9(command, os.path.join(run_dir, "log.jsonl"), last_line, (1, 2))
    run(run_dir, water_data, steps)
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    reference = [json.loads(line) for line in open(tmp_path / "reference" / "log.jsonl")]
    assert without_timings(log) == without_timings(reference)
    assert_same_checkpoints(str(tmp_path / "reference"), run_dir, (training.PHASE,))


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_damaged_checkpoints_are_one_line_errors_and_nothing_is_written(tmp_path, water_data, capsys, damage):
    run_dir = tmp_path / "run"
    run(run_dir, water_data, 4)
    checkpoints = run_dir / "checkpoints" / training.PHASE
    if damage == "missing":
        shutil.rmtree(checkpoints)
        expected = "train checkpoints of"
    else:
        for path in (checkpoints / "4").rglob("*"):
            if path.is_file():
                path.write_bytes(b"not a checkpoint")
        expected = "cannot restore checkpoint 4"
        intact = (f"checkpoint 0 there is intact: load it explicitly (--checkpoint 0), or delete {checkpoints / '4'} "
                  f"to resume training from step 0")
    before = directory_digest(str(run_dir))
    code, _, err = run_phisnet_cli(["train", "--run-dir", str(run_dir), "--steps", "8"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert directory_digest(str(run_dir)) == before
    if damage == "corrupt":
        assert intact in err


def test_orbital_metrics_against_direct_solution():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    S = a @ a.T + 6 * np.eye(6)
    F = rng.normal(size=(6, 6))
    F = F + F.T
    errors, cosine = orbital_metrics(F, F, S, 3)
    np.testing.assert_allclose(errors, 0.0, atol=1e-12)
    assert abs(cosine - 1.0) < 1e-12
    shift = 1e-3 * S  # F + c S has the same orbitals and energies shifted by exactly c
    errors, cosine = orbital_metrics(F + shift, F, S, 3)
    np.testing.assert_allclose(errors, 1e-3, rtol=1e-8)
    assert abs(cosine - 1.0) < 1e-10
    # Below 1 on a known perturbation: rotating occupied orbital 0 into virtual orbital 4 by an
    # angle t (F' = U F U^T, S = 1) keeps every energy and turns that orbital by t, so the mean
    # |cosine| over the 3 occupied orbitals is (cos t + 2) / 3.
    t = 0.3
    U = np.eye(6)
    U[np.ix_([0, 4], [0, 4])] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    F = np.diag([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    errors, cosine = orbital_metrics(U @ F @ U.T, F, np.eye(6), 3)
    np.testing.assert_allclose(errors, 0.0, atol=1e-12)
    assert cosine == pytest.approx((np.cos(t) + 2) / 3, abs=1e-12)


def test_cli_train_evaluate_predict(tmp_path, water_data, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def phisnet(*args):
        return run_phisnet_cli(list(args), capsys)

    # The configuration of run() above, so the compiled training step is reused.
    common = ["--run-dir", "r", "--train", "8", "--valid", "4", "--preset", "tiny", "--batch-size", "4",
              "--float64", "--set", "validate_every=4", "--set", "log_every=1", "--set", "learning_rate=3e-3"]
    code, out, err = phisnet("train", water_data, *common, "--steps", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 4
    # Resuming without repeating the dataset uses the stored configuration.
    code, out, err = phisnet("train", "--run-dir", "r", "--steps", "6", "--json")
    assert code == 0 and json.loads(out)["steps"] == 6, err
    code, out, err = phisnet("evaluate", "r", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["samples"] == 4 and metrics["split"] == "test" and metrics["fock_mae_uha"] > 0
    assert metrics["step"] == 6
    metrics_at_6 = {k: v for k, v in metrics.items() if k not in ("run_dir", "dataset", "split", "step")}
    code, out, err = phisnet("evaluate", "r", "--checkpoint", "4", "--json")  # the run's older checkpoint
    assert code == 0 and json.loads(out)["step"] == 4, err
    (tmp_path / "w.xyz").write_text("3\n\nO 0 0 0\nH 0 0.76 0.58\nH 0 -0.76 0.58\n")
    code, out, err = phisnet("predict", "r", "--xyz", "w.xyz", "-o", "p.npz", "--cube", "cubes")
    assert code == 0, err
    water = molecules.read_xyz(str(tmp_path / "w.xyz"))[0]
    exact = molecules.to_pyscf(water, "sto-3g").intor("int1e_ovlp")
    with np.load(tmp_path / "p.npz") as z:
        assert z["fock"].shape == (1, 7, 7) and str(z["overlap_source"]) == "exact"
        np.testing.assert_allclose(z["overlap"][0], exact, atol=1e-12)
        assert np.abs(z["predicted_overlap"][0] - exact).max() > 1e-3  # a barely trained S head
        assert z["orbital_energies"].shape == (1, 7) and "energy" not in z.files  # no H_core head
        # The predicted density holds water's 10 electrons, shared out by the Mulliken charges.
        assert abs(np.trace(z["density_matrix"][0] @ exact) - 10.0) < 1e-10
        assert abs(z["mulliken_charges"].sum()) < 1e-10
    assert sorted(os.listdir(tmp_path / "cubes")) == [
        "geometry0_density.cube", "geometry0_orbital4.cube", "geometry0_orbital5.cube"]
    (tmp_path / "stretched.xyz").write_text("3\n\nO 0 0 0\nH 0 0 2.5\nH 0 -0.76 0.58\n")
    code, out, err = phisnet("predict", "r", "--xyz", "stretched.xyz", "-o", "s.npz", "--overlap", "predicted",
                             "--json")
    assert code == 0 and "outside the training data" in err, err
    summary = json.loads(out)
    assert summary["geometries_outside_training_distances"] == 1 and summary["overlap"] == "predicted"
    with np.load(tmp_path / "s.npz") as z:
        np.testing.assert_array_equal(z["overlap"], z["predicted_overlap"])
        assert abs(np.trace(z["density_matrix"][0] @ z["overlap"][0]) - 10.0) < 1e-4
    code, out, err = phisnet("scf-guess", "r", "--split", "valid", "-n", "2", "--overlap", "exact", "--overlap",
                             "predicted", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["energies_agree"] and report["geometries"] == 2
    assert set(report["guesses"]) == {"predicted", "predicted_S", "minao", "atom", "huckel", "1e"}
    (tmp_path / "hcl.xyz").write_text("2\n\nCl 0 0 0\nH 0 0 1.3\n")
    for args, message in [
        (["predict", "r", "--xyz", "hcl.xyz", "-o", "q.npz"], "not atomic number"),
        (["evaluate", "missing_run"], "not a PhiSNet training run directory"),
        (["evaluate", "r", "--checkpoint", "5"], "no checkpoint 5 in"),
        (["train", water_data, *common, "--steps", "1", "--set", "nonsense=1"], "unknown setting"),
    ]:
        code, _, err = phisnet(*args)
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q.npz").exists()
    # Shipped as a named model: loadable by name, its card's check metrics reproduced.
    from phisnet_jax import shipped

    monkeypatch.setattr(shipped, "MODELS", dataclasses.replace(shipped.MODELS, directory=str(tmp_path / "models")))
    code, out, err = phisnet("export", "r", "tiny-water", "--made-by", "this test", "--samples", "3")
    assert code == 0 and "wrote tiny-water: step 6" in out, err
    assert shipped.MODELS.names() == ["tiny-water"]
    card = shipped.MODELS.read_record("tiny-water")["card"]
    assert card["test_metrics"] == metrics_at_6 and card["check_metrics"]["samples"] == 3
    from phisnet_jax.evaluate import accuracy

    for key, value in accuracy(load_trained_model("tiny-water"), shipped.check_data("tiny-water")).items():
        assert value == pytest.approx(card["check_metrics"][key], rel=1e-9), key
    code, out, err = phisnet("predict", "tiny-water", "--xyz", "w.xyz", "-o", "named.npz")
    assert code == 0, err
    # Evaluated by name on a dataset: every sample of it (the run's split does not travel with it).
    code, out, err = phisnet("evaluate", "tiny-water", "--dataset", water_data, "--json")
    by_name = json.loads(out)
    assert code == 0 and by_name["split"] == "all", err
    code, out, err = phisnet("evaluate", "r", "--dataset", water_data, "--split", "all", "--json")
    assert by_name == {**json.loads(out), "run_dir": "tiny-water"}
    for args, problem in ((["tiny-water"], "give a dataset"), (["tiny-water", "--dataset", water_data, "--split", "test"],
                                                                "the split of its training data")):
        code, out, err = phisnet("evaluate", *args)
        assert code == 2 and problem in err and len(err.strip().splitlines()) == 1, err
    with np.load(tmp_path / "named.npz") as z, np.load(tmp_path / "p.npz") as direct:
        np.testing.assert_array_equal(z["fock"], direct["fock"])


def test_one_model_on_molecules_of_different_size(tmp_path, water_data):
    import shutil

    from phisnet_jax.data import SplitSpec, load_splits
    from phisnet_jax.evaluate import accuracy

    path = str(tmp_path / "mixed.h5")
    shutil.copyfile(water_data, path)
    level = LevelOfTheory("hf", "sto-3g")
    request = GenerationRequest(output=path, name="hydrogen", source="test", n_samples=12, level=level)
    generate(request, lambda: thermal_ensemble(start_geometry("hydrogen"), level, 500.0, seed=2), log=lambda m: None)
    cfg = training.TrainConfig(batch_size=4, validate_every=4, learning_rate=3e-3)
    data_cfg = training.DataConfig(path, ("water", "hydrogen"), n_train=8, n_valid=2)
    training.train(str(tmp_path / "run"), TINY, cfg, data_cfg, max_steps=4, progress=False)
    splits = load_splits(path, ["water", "hydrogen"], TINY, SplitSpec(8, 2))
    assert splits["train"].fock.shape[1:] == (7, 7)  # water's 7 AOs; H2's 2 are padded
    test = splits["test"]
    assert sorted(set(test.molecule.tolist())) == [0, 1]
    trained = load_trained_model(str(tmp_path / "run"))
    metrics = accuracy(trained, test)
    assert metrics["samples"] == len(test)
    # The same metrics computed directly: each molecule unpadded through the model, then numpy
    # and scipy on the matrices cut to its own AOs.
    f_err, s_err, eps_err, cosines = [], [], [], []
    for i in range(len(test)):
        n_atoms, k = int(test.inputs.atom_mask[i].sum()), int(test.inputs.ao_mask[i].sum())
        numbers = np.asarray(TINY.elements)[test.inputs.element_index[i, :n_atoms]]
        inputs = training.cast_inputs(make_inputs(TINY, numbers, test.inputs.positions[i, :n_atoms]), trained.dtype)
        out = trained.apply(trained.params, inputs)
        f_p, s_p = np.asarray(out["fock"], np.float64), np.asarray(out["overlap"], np.float64)
        f_r, s_r = test.fock[i, :k, :k], test.overlap[i, :k, :k]
        assert f_p.shape == (k, k)
        f_err.append(np.abs(f_p - f_r).ravel())
        s_err.append(np.abs(s_p - s_r).ravel())
        n_occ = int(test.n_occupied[i])
        (e_p, c_p), (e_r, c_r) = scipy.linalg.eigh(f_p, s_r), scipy.linalg.eigh(f_r, s_r)
        eps_err.append(np.abs(e_p[:n_occ] - e_r[:n_occ]))
        cosines.append(np.mean([abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
                                for a, b in zip(c_p[:, :n_occ].T, c_r[:, :n_occ].T)]))  # per molecule
    direct = {"fock_mae_uha": np.concatenate(f_err).mean() * 1e6, "overlap_mae": np.concatenate(s_err).mean(),
              "orbital_energy_mae_uha": np.concatenate(eps_err).mean() * 1e6,
              "orbital_cosine_similarity": np.mean(cosines)}  # mean over molecules
    for name, value in direct.items():  # float32 model: padded and unpadded differ by rounding
        assert metrics[name] == pytest.approx(value, rel=1e-4), name
