"""Shared fixtures: pyscf calculations are cached per test session.

JAX's persistent compilation cache is switched on (before jax is imported anywhere) so that
identical computations compiled again, by another closure or a CLI subprocess, load from disk.
"""

import functools
import os

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Loading a cached executable makes XLA's C++ logger warn on stderr; CLI tests read stderr.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from phisnet_jax import molecules
from phisnet_jax.reference import LevelOfTheory, run_scf


@functools.lru_cache(maxsize=None)
def start_geometry(name: str) -> molecules.Molecule:
    """RDKit/MMFF geometry of a named molecule (deterministic, no quantum chemistry)."""
    return molecules.from_name(name)


def rotated(molecule: molecules.Molecule, rotation: np.ndarray) -> molecules.Molecule:
    """The molecule with positions x -> x @ R.T (rotated about the origin)."""
    return molecule.with_positions(molecule.positions @ rotation.T)


def random_rotation(seed: int, proper: bool = True) -> np.ndarray:
    R = Rotation.random(random_state=seed).as_matrix()
    return R if proper else -R


def scf_fock(molecule: molecules.Molecule, level: LevelOfTheory):
    """Converged (Fock, overlap, mo_energies) at a tight threshold."""
    mf = run_scf(molecule, level)
    assert mf.converged
    return np.asarray(mf.get_fock()), np.asarray(mf.get_ovlp()), np.asarray(mf.mo_energy)


@pytest.fixture(scope="session")
def hf_tight():
    return lambda basis: LevelOfTheory(method="hf", basis=basis, conv_tol=1e-12, conv_tol_grad=1e-8)


def log_lines(run_dir):
    """The JSON lines of a VMC run directory's log.jsonl."""
    import json

    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(entries):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in entries]


def _run_cli(main, args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def run_vmc_cli(args, capsys):
    """(exit code, stdout, stderr) of the ``vmc`` command line run in-process."""
    from vmc import cli

    return _run_cli(cli.main, args, capsys)


def run_phisnet_cli(args, capsys):
    """(exit code, stdout, stderr) of the ``phisnet`` command line run in-process (the
    subprocess entry point ``python -m phisnet_jax`` is exercised by tests/test_generate.py)."""
    from phisnet_jax import cli

    return _run_cli(cli.main, args, capsys)
