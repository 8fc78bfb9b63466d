"""Predicted Hamiltonians as SCF initial guesses, compared with pyscf's own guesses.

For each geometry, pyscf runs the SCF from the density 2 C_occ C_occ^T of the predicted F (with
the exact, cheaply computed overlap S, as in the QH9 benchmark, as guess "predicted"; with the
model's S as "predicted_S") and from its standard guesses.
The guess may change how fast the SCF converges, never what it converges to: the converged
energies are compared and any disagreement above ``energy_tolerance`` is reported.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from molfoundation.errors import InputError
from molfoundation.molecules import Molecule, to_pyscf
from phisnet_jax.reference import LevelOfTheory, make_scf

PYSCF_GUESSES = ("minao", "atom", "huckel", "1e")


def predicted_density(fock: np.ndarray, overlap: np.ndarray, n_occupied: int) -> np.ndarray:
    """(M, M) closed-shell density matrix from the occupied orbitals of F C = S C eps
    (``observables.roothaan``: a predicted S that is not positive definite is clamped)."""
    import jax
    import jax.numpy as jnp

    from phisnet_jax import observables

    with jax.enable_x64(True):
        _, c = observables.roothaan(jnp.asarray(fock, jnp.float64), jnp.asarray(overlap, jnp.float64))
        return np.asarray(observables.density_matrix(c, n_occupied))


def use_predicted_guess(mf, trained, overlap: str = "exact"):
    """Make a pyscf SCF object (RHF/RKS, or UHF/UKS with both spins from the closed-shell
    prediction) start from the density a trained model predicts for its molecule, in one line:
    ``use_predicted_guess(mf, trained).kernel()``. The molecule must be closed-shell, in the
    model's basis; ``overlap`` as in ``prediction.predict``. Returns ``mf``."""
    from pyscf import scf

    from phisnet_jax.prediction import predict

    basis = mf.mol.basis
    if not isinstance(basis, str) or basis.lower() != trained.config.basis.lower():
        raise InputError(f"the SCF's basis {basis!r} is not the model's ({trained.config.basis})")
    density = predict(trained, mf.mol, overlap=overlap).density_matrix
    guess = np.stack([density / 2, density / 2]) if isinstance(mf, scf.uhf.UHF) else density
    mf.get_init_guess = lambda *args, **kwargs: guess
    return mf


@dataclasses.dataclass(frozen=True)
class GuessResult:
    guess: str
    iterations: int
    seconds: float
    energy: float
    converged: bool


def run_from_guesses(molecule: Molecule, level: LevelOfTheory, densities: dict[str, np.ndarray],
                     guesses=PYSCF_GUESSES) -> list[GuessResult]:
    """SCF runs of one geometry from the given initial densities (name -> (M, M)), then from
    pyscf's guesses."""
    mol = to_pyscf(molecule, level.basis)
    results = []
    runs = [(name, dm) for name, dm in densities.items()] + [(g, g) for g in guesses]
    for name, start in runs:
        mf = make_scf(mol, level)
        t0 = time.perf_counter()
        if isinstance(start, str):
            mf.init_guess = start
            mf.kernel()
        else:
            mf.kernel(dm0=start)
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


def held_out_geometries(run_dir: str, model_cfg, dataset: str | None = None, molecule: str | None = None,
                        split: str | None = None, xyz_path: str | None = None, max_geometries: int = 10):
    """(geometries, level of theory) for a model of configuration ``model_cfg`` (a training run
    or a shipped model, ``run_dir``): the first ``max_geometries`` of a split of its molecules
    (or of ``molecule``) chosen as :func:`phisnet_jax.evaluate.model_split` chooses, at the
    dataset's level of theory; or those of an XYZ file, at the level the model was trained at.
    Raises ``InputError`` for an empty split or unsuitable geometries."""
    from molfoundation import molecules as mols
    from phisnet_jax import shipped
    from phisnet_jax.dataset import read_file_info
    from phisnet_jax.evaluate import model_split
    from phisnet_jax.train import load_run_config

    if xyz_path:
        geometries = mols.read_xyz(xyz_path)[:max_geometries]
        if shipped.MODELS.is_shipped(run_dir):
            level = shipped.level_of_theory(run_dir)
        else:
            level = read_file_info(load_run_config(run_dir)[2].dataset).level
    else:
        data, path, split = model_split(run_dir, model_cfg, split, dataset, [molecule] if molecule else None)
        if len(data) == 0:
            raise InputError(f"the {split} split of {molecule or path} has no samples")
        level = read_file_info(path).level
        inputs = data.inputs
        geometries = []
        for i in range(min(len(data), max_geometries)):
            mask = np.asarray(inputs.atom_mask[i])
            z = np.asarray(model_cfg.elements)[np.asarray(inputs.element_index[i])[mask]]
            geometries.append(Molecule(z, np.asarray(inputs.positions[i], np.float64)[mask]))
    for g in geometries:
        mols.validate(g, level.basis)
        model_cfg.element_basis.index_of(g.atomic_numbers)
    return geometries, level


OVERLAP_GUESSES = {"exact": "predicted", "predicted": "predicted_S"}
"""The name of the predicted-density guess for each source of S (``prediction.OVERLAP_SOURCES``)."""


def compare_guesses(run_dir: str, guesses=PYSCF_GUESSES, trained=None, overlaps=("exact",), **selection) -> dict:
    """The ``summarize`` table for a trained model on held-out geometries (``held_out_geometries``
    selection), with the per-geometry results under ``per_geometry``; ``trained``: the run's
    model if already loaded; ``overlaps``: the S of each predicted density ("exact" and/or
    "predicted", guesses named by ``OVERLAP_GUESSES``)."""
    from phisnet_jax.evaluate import load_trained_model, predict_matrices
    from phisnet_jax.model import MoleculeInputs, make_inputs

    unknown = set(overlaps) - set(OVERLAP_GUESSES)
    if unknown:
        raise InputError(f"unknown overlap source(s) {sorted(unknown)}: use {sorted(OVERLAP_GUESSES)}")
    trained = trained or load_trained_model(run_dir)
    geometries, level = held_out_geometries(run_dir, trained.config, **selection)
    per = [make_inputs(trained.config, g.atomic_numbers, g.positions) for g in geometries]
    stacked = MoleculeInputs(**{k: np.stack([getattr(p, k) for p in per]) for k in vars(per[0])})
    focks, predicted_overlaps = predict_matrices(trained, stacked)
    results = []
    for g, fock, predicted_overlap in zip(geometries, focks, predicted_overlaps):
        exact = to_pyscf(g, level.basis).intor("int1e_ovlp")
        k = exact.shape[0]
        overlap = {"exact": exact, "predicted": predicted_overlap[:k, :k]}
        densities = {OVERLAP_GUESSES[source]: predicted_density(fock[:k, :k], overlap[source], g.n_electrons // 2)
                     for source in overlaps}
        results.append(run_from_guesses(g, level, densities, guesses))
    summary = summarize(results)
    summary.update({"run_dir": run_dir, "level_of_theory": f"{level.method}/{level.basis}",
                    "conv_tol": level.conv_tol, "model_step": trained.step,
                    "per_geometry": [[dataclasses.asdict(r) for r in g] for g in results]})
    return summary
