"""HDF5 datasets: round trip, splits, atomic replacement, corrupt files."""

import hashlib
import os

import h5py
import numpy as np
import pytest

from phisnet_jax import dataset
from molfoundation.basis import AOLayout
from molfoundation.errors import InputError
from phisnet_jax.reference import LevelOfTheory

LEVEL = LevelOfTheory("hf", "sto-3g")
LAYOUT = AOLayout(shell_atom=(0, 0, 0, 1, 2), shell_l=(0, 0, 1, 0, 0), n_atoms=3)  # water STO-3G


def fake_samples(n, rng):
    n_ao = LAYOUT.n_ao
    sym = lambda a: a + np.swapaxes(a, -1, -2)  # noqa: E731
    return {
        "sample_index": np.arange(n, dtype=np.int64),
        "positions": rng.normal(size=(n, 3, 3)),
        "fock": sym(rng.normal(size=(n, n_ao, n_ao))),
        "overlap": sym(rng.normal(size=(n, n_ao, n_ao))),
        "core_hamiltonian": sym(rng.normal(size=(n, n_ao, n_ao))),
        "density_matrix": sym(rng.normal(size=(n, n_ao, n_ao))),
        "mo_energies": rng.normal(size=(n, n_ao)),
        "mo_coefficients": rng.normal(size=(n, n_ao, n_ao)),
        "energy": rng.normal(size=n),
        "forces": rng.normal(size=(n, 3, 3)),
        "scf_iterations": rng.integers(5, 20, size=n),
        "converged": np.array([True] * (n - 1) + [False]),
    }


def write(path, name, samples):
    dataset.write_molecule_atomically(
        path, LEVEL, name, np.array([8, 1, 1]), LAYOUT, samples,
        {"formula": "H2O", "source": "test", "charge": 0, "spin": 0, "with_ccsd_t": False},
        {"atomic_numbers": np.array([8, 1, 1]), "trajectory_positions": samples["positions"]},
        {"kind": "trajectory", "charge": 0, "spin": 0},
    )


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_round_trip_and_unconverged_filter(tmp_path):
    path = str(tmp_path / "d.h5")
    samples = fake_samples(5, np.random.default_rng(0))
    write(path, "water", samples)
    write(path, "water_b", fake_samples(3, np.random.default_rng(1)))
    info = dataset.read_file_info(path)
    assert info.level == LEVEL and info.molecules == ("water", "water_b")
    assert info.created_with["pyscf"]
    data = dataset.read_molecule(path, "water")
    assert data.n_samples == 4  # the unconverged last sample is left out
    assert data.layout == LAYOUT
    for key, value in samples.items():
        np.testing.assert_array_equal(data.arrays[key], value[:4])
    assert dataset.read_molecule(path, "water", include_unconverged=True).n_samples == 5
    with h5py.File(path) as f:
        assert f.attrs["length_unit"] == "bohr" and f.attrs["energy_unit"] == "hartree"
        assert "pyscf" in f.attrs["ao_convention"]


def test_failed_write_leaves_existing_file_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "d.h5")
    write(path, "water", fake_samples(4, np.random.default_rng(0)))
    before = digest(path)

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        write(path, "water", fake_samples(6, np.random.default_rng(1)))
    assert digest(path) == before
    assert not os.path.exists(path + ".tmp")


def test_splits_are_reproducible_and_disjoint():
    a = dataset.split_indices(1000, 500, 300, seed=42)
    b = dataset.split_indices(1000, 500, 300, seed=42)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert [len(a[k]) for k in ("train", "valid", "test")] == [500, 300, 200]
    assert len(np.unique(np.concatenate(list(a.values())))) == 1000
    assert not np.array_equal(dataset.split_indices(1000, 500, 300, seed=1)["train"], a["train"])
    with pytest.raises(InputError):
        dataset.split_indices(10, 8, 3)


def test_corrupt_and_foreign_files_are_rejected(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(InputError, match="not a valid HDF5"):
        dataset.read_file_info(str(garbage))
    foreign = str(tmp_path / "foreign.h5")
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    with pytest.raises(InputError, match="not a phisnet dataset"):
        dataset.summarize(foreign)
    path = str(tmp_path / "d.h5")
    write(path, "water", fake_samples(2, np.random.default_rng(0)))
    with pytest.raises(InputError, match="not in"):
        dataset.read_molecule(path, "ethanol")


def test_summary_of_a_molecule_without_energies_is_an_input_error(tmp_path):
    path = str(tmp_path / "d.h5")
    write(path, "water", fake_samples(2, np.random.default_rng(0)))
    with h5py.File(path, "a") as f:
        del f["molecules/water/energy"]
    with pytest.raises(InputError, match="molecule 'water' lacks energy"):
        dataset.summarize(path)
