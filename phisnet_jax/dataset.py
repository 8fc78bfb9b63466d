"""HDF5 reference datasets: schema, atomic writing, reading, and reproducible splits.

The schema is documented in ``docs/dataset.md``. In short: one level of theory (method and
basis) per file, one group per molecule ensemble under ``/molecules``, one row per geometry.
Files are only ever replaced atomically (written to a temporary file, then renamed), so an
interrupted write never leaves a corrupt or half-updated dataset behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil

import h5py
import numpy as np

from molfoundation.basis import AOLayout
from molfoundation.errors import InputError
from phisnet_jax.reference import CCSD_T_FIELDS, LABEL_FIELDS, LevelOfTheory

SCHEMA_VERSION = 1
AO_CONVENTION = (
    "pyscf-spherical: AOs by atom, then shell, then m = -l..l; p shells as (px, py, pz)"
)
PER_SAMPLE_FIELDS = ("sample_index", "positions") + LABEL_FIELDS
MATRIX_FIELDS = ("fock", "overlap", "core_hamiltonian", "density_matrix", "mo_coefficients")


def software_versions() -> dict[str, str]:
    """Versions of the programs that produce reference data."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("phisnet-jax", "pyscf", "numpy", "h5py", "rdkit", "geometric", "ase"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """File-level metadata of a dataset."""

    level: LevelOfTheory
    molecules: tuple[str, ...]
    created_with: dict


def _open_for_reading(path: str) -> h5py.File:
    if not os.path.isfile(path):
        raise InputError(f"dataset not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise InputError(f"cannot read dataset {path}: not a valid HDF5 file") from None
    if f.attrs.get("schema_version") is None or "molecules" not in f:
        f.close()
        raise InputError(f"{path} is an HDF5 file but not a phisnet dataset")
    if int(f.attrs["schema_version"]) > SCHEMA_VERSION:
        f.close()
        raise InputError(f"{path} uses dataset schema {int(f.attrs['schema_version'])}, newer than this program")
    return f


def read_file_info(path: str) -> FileInfo:
    with _open_for_reading(path) as f:
        level = LevelOfTheory(
            method=str(f.attrs["method"]),
            basis=str(f.attrs["basis"]),
            conv_tol=float(f.attrs["conv_tol"]),
            conv_tol_grad=float(f.attrs["conv_tol_grad"]),
            max_cycle=int(f.attrs["max_cycle"]),
            grid_level=int(f.attrs["grid_level"]),
        )
        return FileInfo(level, tuple(f["molecules"].keys()), json.loads(f.attrs["created_with"]))


@dataclasses.dataclass(frozen=True, eq=False)
class MoleculeData:
    """The samples of one molecule ensemble, as numpy arrays.

    Attributes:
      name: group name in the file.
      atomic_numbers: (n_atoms,) int.
      layout: the AO shell layout (pyscf order).
      arrays: field -> array with leading axis n_samples; see ``docs/dataset.md``.
      attrs: group attributes (formula, charge, spin, source, ...).
      ensemble_arrays, ensemble_attrs: what reproduces the geometries (see ``sampling``).
    """

    name: str
    atomic_numbers: np.ndarray
    layout: AOLayout
    arrays: dict[str, np.ndarray]
    attrs: dict
    ensemble_arrays: dict[str, np.ndarray]
    ensemble_attrs: dict

    @property
    def n_samples(self) -> int:
        return int(self.arrays["sample_index"].shape[0])


def read_molecule(
    path: str, name: str, include_unconverged: bool = False, fields: tuple[str, ...] | None = None
) -> MoleculeData:
    """Load one molecule group. Unconverged samples are left out unless asked for."""
    with _open_for_reading(path) as f:
        if name not in f["molecules"]:
            known = ", ".join(f["molecules"].keys()) or "none"
            raise InputError(f"molecule {name!r} not in {path} (it has: {known})")
        g = f["molecules"][name]
        keep = slice(None) if include_unconverged else np.asarray(g["converged"][()], dtype=bool)
        wanted = [k for k in g.keys() if isinstance(g[k], h5py.Dataset)]
        per_sample = [k for k in wanted if k not in ("atomic_numbers", "shell_atom", "shell_l")]
        if fields is not None:
            per_sample = [k for k in per_sample if k in fields or k in ("sample_index", "converged")]
        arrays = {k: np.asarray(g[k][()])[keep] for k in per_sample}
        layout = AOLayout(
            tuple(int(a) for a in g["shell_atom"][()]),
            tuple(int(l) for l in g["shell_l"][()]),
            int(g["atomic_numbers"].shape[0]),
        )
        ens = g["ensemble"]
        return MoleculeData(
            name=name,
            atomic_numbers=np.asarray(g["atomic_numbers"][()]),
            layout=layout,
            arrays=arrays,
            attrs=_attrs_to_dict(g.attrs),
            ensemble_arrays={k: np.asarray(ens[k][()]) for k in ens.keys()},
            ensemble_attrs=_attrs_to_dict(ens.attrs),
        )


def _attrs_to_dict(attrs) -> dict:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def _write_file_attrs(f: h5py.File, level: LevelOfTheory) -> None:
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["method"] = level.method
    f.attrs["basis"] = level.basis
    f.attrs["conv_tol"] = level.conv_tol
    f.attrs["conv_tol_grad"] = level.conv_tol_grad
    f.attrs["max_cycle"] = level.max_cycle
    f.attrs["grid_level"] = level.grid_level
    f.attrs["length_unit"] = "bohr"
    f.attrs["energy_unit"] = "hartree"
    f.attrs["ao_convention"] = AO_CONVENTION
    f.attrs["created_with"] = json.dumps(software_versions(), sort_keys=True)


def write_molecule_atomically(
    path: str,
    level: LevelOfTheory,
    name: str,
    atomic_numbers: np.ndarray,
    layout: AOLayout,
    samples: dict[str, np.ndarray],
    attrs: dict,
    ensemble_arrays: dict[str, np.ndarray],
    ensemble_attrs: dict,
) -> None:
    """Create or replace molecule group ``name`` in ``path`` without ever exposing a partial file.

    The existing file (if any) is copied to ``path + '.tmp'``, the group is written there, the
    copy is flushed to disk, and only then renamed over ``path``.
    """
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)  # left by an interrupted earlier write; the real file is intact
    try:
        if os.path.exists(path):
            shutil.copyfile(path, tmp)
            f = h5py.File(tmp, "a")
        else:
            f = h5py.File(tmp, "w")
            _write_file_attrs(f, level)
            f.create_group("molecules")
        with f:
            group_parent = f["molecules"]
            if name in group_parent:
                del group_parent[name]
            g = group_parent.create_group(name)
            for k, v in attrs.items():
                g.attrs[k] = v
            g.create_dataset("atomic_numbers", data=np.asarray(atomic_numbers, dtype=np.int64))
            g.create_dataset("shell_atom", data=np.asarray(layout.shell_atom, dtype=np.int64))
            g.create_dataset("shell_l", data=np.asarray(layout.shell_l, dtype=np.int64))
            for k, v in samples.items():
                v = np.asarray(v)
                chunks = (1,) + v.shape[1:] if k in MATRIX_FIELDS and v.shape[0] > 0 else None
                g.create_dataset(k, data=v, chunks=chunks)
            ens = g.create_group("ensemble")
            for k, v in ensemble_attrs.items():
                ens.attrs[k] = v
            for k, v in ensemble_arrays.items():
                ens.create_dataset(k, data=np.asarray(v))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sample_fields(with_ccsd_t: bool) -> tuple[str, ...]:
    return PER_SAMPLE_FIELDS + (CCSD_T_FIELDS if with_ccsd_t else ())


def split_indices(
    n_samples: int, n_train: int, n_valid: int, seed: int = 42
) -> dict[str, np.ndarray]:
    """Random train / validation / test split (the rest is test), reproducible from ``seed``.

    Returns sorted index arrays into the (converged) samples of one molecule.
    """
    if n_train < 0 or n_valid < 0 or n_train + n_valid > n_samples:
        raise InputError(
            f"cannot split {n_samples} samples into {n_train} train and {n_valid} validation"
        )
    order = np.random.default_rng(seed).permutation(n_samples)
    return {
        "train": np.sort(order[:n_train]),
        "valid": np.sort(order[n_train : n_train + n_valid]),
        "test": np.sort(order[n_train + n_valid :]),
    }


# What a summary reads of every molecule group.
SUMMARY_FIELDS = ("converged", "energy", "scf_iterations", "atomic_numbers", "fock", "ensemble")


def summarize(path: str) -> dict:
    """A JSON-serialisable summary of a dataset file (what ``phisnet inspect`` prints)."""
    info = read_file_info(path)
    molecules = []
    with _open_for_reading(path) as f:
        for name in info.molecules:
            g = f["molecules"][name]
            missing = [k for k in SUMMARY_FIELDS if k not in g]
            if missing:
                raise InputError(f"{path}: molecule {name!r} lacks {', '.join(missing)}")
            converged = np.asarray(g["converged"][()], dtype=bool)
            energy = np.asarray(g["energy"][()])[converged]
            iterations = np.asarray(g["scf_iterations"][()])[converged]
            ens = _attrs_to_dict(g["ensemble"].attrs)
            entry = {
                "name": name,
                "formula": str(g.attrs.get("formula", "")),
                "source": str(g.attrs.get("source", "")),
                "n_atoms": int(g["atomic_numbers"].shape[0]),
                "n_ao": int(g["fock"].shape[-1]),
                "n_samples": int(converged.size),
                "n_converged": int(converged.sum()),
                "ensemble": ens,
                "has_ccsd_t": "ccsd_t_energy" in g,
                "energy_min": float(energy.min()) if energy.size else None,
                "energy_max": float(energy.max()) if energy.size else None,
                "mean_scf_iterations": float(iterations.mean()) if iterations.size else None,
            }
            molecules.append(entry)
    return {
        "path": path,
        "schema_version": SCHEMA_VERSION,
        "method": info.level.method,
        "basis": info.level.basis,
        "units": {"length": "bohr", "energy": "hartree"},
        "ao_convention": AO_CONVENTION,
        "created_with": info.created_with,
        "molecules": molecules,
    }
