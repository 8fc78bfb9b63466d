"""Predicted Hamiltonians as SCF initial guesses, compared with pyscf's own guesses.

For each geometry, pyscf runs the SCF from the density 2 C_occ C_occ^T of the predicted F (with
the exact, cheaply computed overlap S, as in the QH9 benchmark) and from its standard guesses.
The guess may change how fast the SCF converges, never what it converges to: the converged
energies are compared and any disagreement above ``energy_tolerance`` is reported.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import scipy.linalg

from phisnet_jax.molecules import Molecule, to_pyscf
from phisnet_jax.reference import LevelOfTheory, make_scf

PYSCF_GUESSES = ("minao", "atom", "huckel", "1e")


def predicted_density(fock: np.ndarray, overlap: np.ndarray, n_occupied: int) -> np.ndarray:
    """Closed-shell density matrix from the occupied orbitals of F C = S C eps."""
    _, c = scipy.linalg.eigh(fock, overlap)
    occ = c[:, :n_occupied]
    return 2.0 * occ @ occ.T


@dataclasses.dataclass(frozen=True)
class GuessResult:
    guess: str
    iterations: int
    seconds: float
    energy: float
    converged: bool


def run_from_guesses(molecule: Molecule, level: LevelOfTheory, predicted_fock: np.ndarray | None,
                     guesses=PYSCF_GUESSES) -> list[GuessResult]:
    """SCF runs of one geometry from the predicted density (if given) and pyscf's guesses."""
    mol = to_pyscf(molecule, level.basis)
    results = []
    runs = ([("predicted", None)] if predicted_fock is not None else []) + [(g, g) for g in guesses]
    for name, pyscf_guess in runs:
        mf = make_scf(mol, level)
        t0 = time.perf_counter()
        if pyscf_guess is None:
            dm0 = predicted_density(predicted_fock, mol.intor("int1e_ovlp"), molecule.n_electrons // 2)
            mf.kernel(dm0=dm0)
        else:
            mf.init_guess = pyscf_guess
            mf.kernel()
        results.append(GuessResult(name, int(mf.cycles), time.perf_counter() - t0, float(mf.e_tot), bool(mf.converged)))
    return results


def summarize(per_geometry: list[list[GuessResult]], energy_tolerance: float = 1e-8) -> dict:
    """Mean iterations and seconds per guess, ratios to minao, and the energy-agreement check."""
    names = [r.guess for r in per_geometry[0]]
    table = {}
    for k, name in enumerate(names):
        its = np.array([g[k].iterations for g in per_geometry])
        secs = np.array([g[k].seconds for g in per_geometry])
        table[name] = {"mean_iterations": float(its.mean()), "mean_seconds": float(secs.mean()),
                       "converged": int(sum(g[k].converged for g in per_geometry))}
    if "minao" in table:
        for name in table:
            table[name]["iterations_vs_minao"] = table[name]["mean_iterations"] / table["minao"]["mean_iterations"]
    spread = max(max(r.energy for r in g) - min(r.energy for r in g) for g in per_geometry)
    return {
        "geometries": len(per_geometry),
        "guesses": table,
        "max_energy_spread_hartree": float(spread),
        "energies_agree": bool(spread <= energy_tolerance),
    }
