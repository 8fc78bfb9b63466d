"""Energy and force training, fine-tuning from a checkpoint (HF -> CCSD(T) transfer learning).

One small HF/STO-3G data set with CCSD(T) labels serves all tests: distorted H4 (two H2 side by
side) and H2, so that H2 is padded to H4's shapes in every mixed batch. Hydrogen in STO-3G has
only s functions, so the model needs feature order 0, which makes the second-derivative training
step about 3 times cheaper to compile than for water (p shells, order 2); the energy, force and
padding code is the same for any basis. Every training run uses float64 and the same loss
weights, so that step is compiled once (JAX's persistent cache, switched on in conftest, serves
the later identical compilations).
"""

import dataclasses
import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pyscf import lib

from conftest import start_geometry
from phisnet_jax import observables
from phisnet_jax import train as training
from phisnet_jax.blocks import expansion_tables
from phisnet_jax.data import SplitSpec, load_splits
from molfoundation.errors import InputError
from phisnet_jax.evaluate import load_trained_model, predict_energies_and_forces
from phisnet_jax.generate import GenerationRequest, generate
from phisnet_jax.model import PhiSNetConfig, make_phisnet
from molfoundation.molecules import Molecule, to_pyscf
from phisnet_jax.reference import LevelOfTheory
from phisnet_jax.sampling import TrajectoryEnsemble

CORE = PhiSNetConfig(basis="sto-3g", elements=(1,), features=8, max_order=0, num_modules=1,
                     num_radial=8, overlap_features=4, core_hamiltonian=True, residual_blocks=0,
                     head_residual_blocks=1)
# Fine-tuning on CCSD(T) energies and forces only, as in the transfer-learning experiment.
FINETUNE = training.TrainConfig(
    batch_size=4, validate_every=4, log_every=1, learning_rate=3e-3, float64=True,
    fock_mse_weight=0.0, fock_mae_weight=0.0, overlap_mse_weight=0.0, overlap_mae_weight=0.0,
    core_mse_weight=0.0, core_mae_weight=0.0, energy_weight=1.0, forces_weight=1.0, energy_source="ccsd_t",
)
# The run to fine-tune learns Hartree-Fock energies and forces: the same compiled step.
SOURCE = dataclasses.replace(FINETUNE, energy_source="scf")
# Every term at once, for checking the loss itself.
ALL_TERMS = dataclasses.replace(FINETUNE, fock_mse_weight=1.0, fock_mae_weight=1.0, overlap_mse_weight=1.0,
                                overlap_mae_weight=1.0, core_mse_weight=1.0, core_mae_weight=1.0)
LEVEL = LevelOfTheory("hf", "sto-3g")
EVAL_BATCH = 38  # every energy-and-forces evaluation uses this batch size: one compilation


H4 = Molecule(np.ones(4, dtype=int), np.array([[0.0, 0, 0], [1.4, 0, 0], [0, 3.0, 0], [1.4, 3.0, 0]]))


def _distorted(m, n, seed, scale):
    rng = np.random.default_rng(seed)
    return tuple(m.with_positions(m.positions + scale * rng.normal(size=m.positions.shape)) for _ in range(n))


def _generate(path, name, frames, with_ccsd_t):
    request = GenerationRequest(output=path, name=name, source="test", n_samples=len(frames), level=LEVEL,
                                with_ccsd_t=with_ccsd_t)
    # One OpenMP thread: pyscf's threads slow down badly on a busy 2-core machine.
    with lib.with_omp_threads(1):
        generate(request, lambda: TrajectoryEnsemble(frames), log=lambda m: None)


@pytest.fixture(scope="module")
def cc_data(tmp_path_factory):
    """12 distorted H4 and 10 H2 geometries, HF/STO-3G with CCSD(T) energies and forces."""
    path = str(tmp_path_factory.mktemp("data") / "cc.h5")
    _generate(path, "h4", _distorted(H4, 12, 0, 0.1), True)
    _generate(path, "h2", _distorted(start_geometry("hydrogen"), 10, 1, 0.05), True)
    return path


@pytest.fixture(scope="module")
def hf_only_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "hf.h5")
    _generate(path, "h4", _distorted(H4, 4, 2, 0.1), False)
    return path


def data_config(path):
    """8 training geometries of each molecule, no validation, the rest test."""
    return training.DataConfig(path, ("h4", "h2"), n_train=8, n_valid=0)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, cc_data):
    """A run trained for 4 steps on HF energies and forces (the model to fine-tune)."""
    run_dir = str(tmp_path_factory.mktemp("runs") / "source")
    training.train(run_dir, CORE, SOURCE, data_config(cc_data), max_steps=4, progress=False)
    return run_dir


@functools.cache
def finetune_functions():
    """The compiled functions of the fine-tuning configuration, made once for every run of it."""
    return training.make_training_functions(CORE, FINETUNE)


def finetune(run_dir, cc_data, source, steps):
    return training.train(str(run_dir), CORE, FINETUNE, data_config(cc_data), max_steps=steps, progress=False,
                          init_from=source, functions=finetune_functions())


def test_loss_forces_are_minus_finite_difference_gradients(cc_data, source_run):
    """Energy, forces and H_core inside the loss, for a real and a padded molecule (H2 in H4's shapes)."""
    trained = load_trained_model(source_run)
    h = 1e-4
    with jax.enable_x64(True):
        data = load_splits(cc_data, ["h4", "h2"], CORE, SplitSpec(0, 0), labels=("core_hamiltonian",))["test"]
        pair = data.take([0, len(data) - 1])  # one H4, one H2 (padded: 2 of 4 atoms and AOs)
        assert pair.inputs.ao_mask[1].sum() == 2 and pair.inputs.atom_mask[1].sum() == 2
        # Rows: the two molecules, then each real coordinate displaced by +h and -h.
        rows, shifts = [0, 1], [None, None]
        for mol in range(2):
            for atom in range(int(pair.inputs.atom_mask[mol].sum())):
                for axis in range(3):
                    rows += [mol, mol]
                    shifts += [(atom, axis, h), (atom, axis, -h)]
        assert len(rows) == EVAL_BATCH
        batch = pair.take(rows)
        positions = np.array(batch.inputs.positions)
        for r, shift in enumerate(shifts):
            if shift is not None:
                positions[r, shift[0], shift[1]] += shift[2]
        inputs = dataclasses.replace(training.cast_inputs(batch.inputs, np.float64), positions=positions)
        energy_fn = jax.jit(training.make_energy_and_forces(trained.model))
        energies, forces, out = jax.tree.map(np.asarray, energy_fn(trained.params, inputs, batch.n_occupied))
        fd_forces = np.zeros((2, 4, 3))
        for r in range(2, len(rows), 2):
            atom, axis, _ = shifts[r]
            fd_forces[rows[r], atom, axis] = -(energies[r] - energies[r + 1]) / (2 * h)

        # The padded H2 has the energy of observables.total_energy on its own 2 x 2 matrices, with
        # pyscf's overlap matrix of its geometry.
        h2_geometry = Molecule(np.array([1, 1]), positions[1, :2])
        h2 = observables.total_energy(out["fock"][1, :2, :2], to_pyscf(h2_geometry, "sto-3g").intor("int1e_ovlp"),
                                      out["core_hamiltonian"][1, :2, :2], 1, jnp.array([1.0, 1.0]), positions[1, :2])
        assert abs(energies[1] - float(h2)) < 1e-10
        # Autodiff (dS/dR of the exact overlap included) and central differences (h = 1e-4 bohr,
        # error O(h^2)) agree to 2.1e-8 (observed).
        np.testing.assert_allclose(forces[:2], fd_forces, atol=1e-7)
        assert np.abs(fd_forces).max() > 1e-2 and np.all(forces[1, 2:] == 0.0)  # padding atoms: zero

        loss_fn = jax.jit(training.make_loss(trained.model, ALL_TERMS))
        labels = {"core_hamiltonian": pair.labels["core_hamiltonian"], "energy": energies[:2], "forces": forces[:2],
                  "n_occupied": pair.n_occupied}
        _, metrics = loss_fn(trained.params, training.cast_inputs(pair.inputs, np.float64), pair.fock,
                             pair.overlap, labels)
    # The loss sees exactly these energies and forces: its errors against them vanish.
    assert float(metrics["energy_mae"]) < 1e-12 and float(metrics["forces_mae"]) < 1e-12
    core_errors = [np.abs(out["core_hamiltonian"][i] - pair.labels["core_hamiltonian"][i])[:k, :k].ravel()
                   for i, k in enumerate((4, 2))]
    assert float(metrics["core_mae"]) == pytest.approx(np.concatenate(core_errors).mean(), rel=1e-10)


def test_core_hamiltonian_offsets_start_at_the_data_means(cc_data):
    """Like F's, the on-site scalar offsets of H_core start at the training data's means."""
    with jax.enable_x64(True):
        data = load_splits(cc_data, ["h4", "h2"], CORE, SplitSpec(8, 0), labels=("core_hamiltonian",))["train"]
        model = make_phisnet(CORE)
        inputs = training.cast_inputs(data.inputs, np.float64)
        state = training.init_state(model, ALL_TERMS, inputs, training.make_optimizer(ALL_TERMS), data)
    # In STO-3G every AO of these hydrogen chains is an H 1s, whose on-site block has one scalar
    # channel: the offset times that channel's pattern is the data's mean H_core diagonal,
    # computed here straight from the matrices.
    diagonals = np.diagonal(data.labels["core_hamiltonian"], axis1=1, axis2=2)[np.asarray(data.inputs.ao_mask)]
    pattern = expansion_tables(CORE.element_basis).tables[0][0, 0, :, 0]  # (C0 = 1, A = 1, A = 1)
    offset = np.asarray(state.params["params"]["core_onsite_offset"])
    assert offset.shape == (1, 1) and diagonals.mean() < -0.5  # about -1 hartree
    np.testing.assert_allclose(offset[0, 0] * pattern[0, 0, 0], diagonals.mean(), rtol=1e-12)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, cc_data, source_run):
    """(run dir, its step-0 EMA parameters): 16 steps of CCSD(T) fine-tuning of ``source_run``."""
    run_dir = tmp_path_factory.mktemp("runs") / "finetuned"
    finetune(run_dir, cc_data, source_run, 0)
    start = load_trained_model(str(run_dir))
    assert start.step == 0
    finetune(run_dir, cc_data, source_run, 16)  # resumes from its own step-0 checkpoint
    return run_dir, start.params


def test_finetuning_starts_from_source_ema_and_lowers_energy_force_loss(cc_data, source_run, finetuned):
    run_dir, start_params = finetuned
    source = load_trained_model(source_run)
    for x, y in zip(jax.tree.leaves(source.params), jax.tree.leaves(start_params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    record = json.load(open(run_dir / "config.json"))
    assert record["init_from"] == {"run_dir": source_run, "step": source.step, "parameters": "ema"}
    assert record["train"]["energy_source"] == "ccsd_t"

    log = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert {"energy_mae", "forces_mae"} <= set(log[0]) and "fock_mae" in log[0]
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])

    # Energies against CCSD(T) improve on the held-out geometries too.
    test = load_splits(cc_data, ["h4", "h2"], CORE, SplitSpec(8, 0), labels=("ccsd_t_energy",))["test"]
    errors = {}
    for name, model in (("before", source), ("after", load_trained_model(str(run_dir)))):
        energies, forces = predict_energies_and_forces(model, test, batch_size=EVAL_BATCH)
        errors[name] = np.abs(energies - test.labels["ccsd_t_energy"]).mean()
        assert np.all(forces[~np.asarray(test.inputs.atom_mask)] == 0.0)
    assert errors["after"] < errors["before"]


def test_finetuning_resumes_exactly(tmp_path, cc_data, source_run, finetuned):
    finetune(tmp_path / "resumed", cc_data, source_run, 8)
    training.train(str(tmp_path / "resumed"), CORE, FINETUNE, data_config(cc_data), max_steps=16, progress=False,
                   functions=finetune_functions())
    a, b = load_trained_model(str(finetuned[0])), load_trained_model(str(tmp_path / "resumed"))
    assert a.step == b.step == 16
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(InputError, match="another configuration"):
        finetune(tmp_path / "resumed", cc_data, str(finetuned[0]), 17)


def test_bad_setups_are_input_errors(tmp_path, cc_data, hf_only_data, source_run):
    no_head = dataclasses.replace(CORE, core_hamiltonian=False)
    with pytest.raises(InputError, match="core-Hamiltonian head"):
        training.train(str(tmp_path / "a"), no_head, FINETUNE, data_config(cc_data), max_steps=1, progress=False)
    with pytest.raises(InputError, match="has no ccsd_t_energy, ccsd_t_forces labels .*--ccsd-t"):
        training.train(str(tmp_path / "b"), CORE, FINETUNE, training.DataConfig(hf_only_data, ("h4",), 2, 0),
                       max_steps=1, progress=False)
    with pytest.raises(InputError, match="energy_source must be one of"):
        training.train(str(tmp_path / "c"), CORE, dataclasses.replace(FINETUNE, energy_source="mp2"),
                       data_config(cc_data), max_steps=1, progress=False)
    with pytest.raises(InputError, match="model configuration differs"):
        training.train(str(tmp_path / "d"), dataclasses.replace(CORE, features=4), FINETUNE, data_config(cc_data),
                       max_steps=1, progress=False, init_from=source_run)


def phisnet(*args, cwd):
    return subprocess.run([sys.executable, "-m", "phisnet_jax", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_cli_init_from_and_errors(tmp_path, cc_data, hf_only_data, source_run):
    ccsd_t = ["--set", "energy_weight=1", "--set", "forces_weight=1", "--set", "energy_source=ccsd_t"]
    out = phisnet("train", cc_data, "--run-dir", "ft", "--init-from", source_run, "--train", "8", "--valid", "0",
                  "--batch-size", "4", *ccsd_t, "--set", "learning_rate=1e-4", "--steps", "0", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["init_from"]["run_dir"] == source_run
    record = json.load(open(tmp_path / "ft" / "config.json"))
    assert record["model"]["core_hamiltonian"] and record["train"]["learning_rate"] == 1e-4
    out = phisnet("train", hf_only_data, "--run-dir", "bad", "--init-from", source_run, "--train", "2", "--valid", "0",
                  "--batch-size", "2", *ccsd_t, "--steps", "1", cwd=tmp_path)
    assert out.returncode == 2 and "--ccsd-t" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
