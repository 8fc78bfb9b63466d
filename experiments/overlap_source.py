"""Benchmark: orbitals and SCF guesses of a trained PhiSNet model with its predicted S vs the exact S.

The same model's predicted F is combined with the exact overlap matrix of each geometry (what
``predict`` uses by default) and with the model's own S (``overlap="predicted"``):

- held-out geometries of the run (its test split): MAE of the occupied orbital energies against
  the reference (uHa) with each S, the smallest eigenvalue of the predicted S, and SCF iterations
  from each predicted density next to pyscf's minao guess (converged energies must agree);
- off-distribution geometries made of the same elements (a water dimer and hydrogen peroxide
  for a water model): the smallest eigenvalue of each S, the prediction's warnings, and the
  occupied orbital-energy MAE against a reference SCF at the run's level of theory.

Writes experiments/results/overlap_source_<name>_<platform>.json.

    .venv/bin/python experiments/overlap_source.py --run-dir runs/water/small --name water -n 20
"""

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
from machine import machine_info, result_stem  # noqa: E402

from molfoundation.molecules import BOHR_PER_ANGSTROM, Molecule, from_smiles, to_pyscf  # noqa: E402
from phisnet_jax.dataset import read_file_info  # noqa: E402
from phisnet_jax.evaluate import HARTREE_TO_MICRO, load_trained_model, predict_matrices, run_split  # noqa: E402
from phisnet_jax.prediction import PredictionWarning, predict  # noqa: E402
from phisnet_jax.reference import make_scf  # noqa: E402
from phisnet_jax.scf_guess import compare_guesses  # noqa: E402
from phisnet_jax.train import load_run_config  # noqa: E402

# A water dimer near its equilibrium (angstrom): donor O-H...O hydrogen bond of 1.95 angstrom.
WATER_DIMER = Molecule(np.array([8, 1, 1, 8, 1, 1]), BOHR_PER_ANGSTROM * np.array([
    [-1.551, -0.115, 0.0], [-1.934, 0.763, 0.0], [-0.600, 0.041, 0.0],
    [1.351, 0.111, 0.0], [1.680, -0.374, -0.759], [1.680, -0.374, 0.759]]))


def occupied_eigenvalues(fock, overlap, n_occupied):
    """The lowest ``n_occupied`` eigenvalues of F C = S C eps (NaN if S is not positive definite)."""
    try:
        return scipy.linalg.eigh(fock, overlap, eigvals_only=True)[:n_occupied]
    except np.linalg.LinAlgError:
        return np.full(n_occupied, np.nan)


def held_out_orbitals(trained, data):
    """Occupied orbital-energy errors (uHa) with the exact and the predicted S, and the smallest
    eigenvalue of each predicted S, over a data split."""
    fock, overlap = predict_matrices(trained, data.inputs)
    errors = {"exact": [], "predicted": []}
    smallest = []
    for i in range(len(data)):
        k, n_occ = int(np.asarray(data.inputs.ao_mask[i]).sum()), int(data.n_occupied[i])
        exact, predicted = data.overlap[i, :k, :k], overlap[i, :k, :k]
        reference = occupied_eigenvalues(data.fock[i, :k, :k], exact, n_occ)
        for source, s in (("exact", exact), ("predicted", predicted)):
            errors[source].append(np.abs(occupied_eigenvalues(fock[i, :k, :k], s, n_occ) - reference))
        smallest.append(float(np.linalg.eigvalsh(predicted)[0]))
    return {
        "samples": len(data),
        "orbital_energy_mae_uha": {source: float(np.nanmean(np.concatenate(e)) * HARTREE_TO_MICRO)
                                   for source, e in errors.items()},
        "predicted_overlap_not_positive_definite": int(sum(s <= 0 for s in smallest)),
        "smallest_predicted_overlap_eigenvalue": min(smallest),
    }


def off_distribution(trained, level, name, molecule):
    """Both predictions of one geometry against a reference SCF at the run's level."""
    mf = make_scf(to_pyscf(molecule, level.basis), level)
    mf.kernel()
    n_occ = molecule.n_electrons // 2
    row = {"molecule": name, "reference_converged": bool(mf.converged)}
    for source in ("exact", "predicted"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PredictionWarning)
            p = predict(trained, molecule, overlap=source)
        row[source] = {
            "smallest_overlap_eigenvalue": p.smallest_overlap_eigenvalue,
            "warnings": list(p.warnings),
            "warnings_raised": len(caught),
            "occupied_orbital_energy_mae_uha": float(np.abs(p.orbital_energies[:n_occ] - mf.mo_energy[:n_occ]).mean()
                                                     * HARTREE_TO_MICRO),
            "homo_lumo_gap_error_uha": float((p.homo_lumo_gap - (mf.mo_energy[n_occ] - mf.mo_energy[n_occ - 1]))
                                             * HARTREE_TO_MICRO),
        }
    row["smallest_exact_overlap_eigenvalue_pyscf"] = float(np.linalg.eigvalsh(mf.get_ovlp())[0])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True,
                        help="PhiSNet training run (a water model for the off-distribution rows).")
    parser.add_argument("--name", required=True, help="Name of the result file.")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("-n", "--max-geometries", type=int, default=20, help="Geometries for the SCF runs.")
    args = parser.parse_args()

    trained = load_trained_model(args.run_dir)
    model_cfg, _, data_cfg = load_run_config(args.run_dir)
    level = read_file_info(data_cfg.dataset).level
    scf = compare_guesses(args.run_dir, guesses=("minao",), trained=trained, overlaps=("exact", "predicted"),
                          split=args.split, max_geometries=args.max_geometries)
    record = {
        "benchmark": "predicted F with the exact S vs the model's S",
        "command": "python experiments/overlap_source.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(), "jax": jax.__version__, "run_dir": args.run_dir, "model_step": trained.step,
        "level_of_theory": f"{level.method}/{level.basis}",
        "held_out": held_out_orbitals(trained, run_split(model_cfg, data_cfg, args.split)),
        "scf_guess": {key: scf[key] for key in
                      ("geometries", "guesses", "max_energy_spread_hartree", "energies_agree")},
        "off_distribution": [off_distribution(trained, level, "water dimer", WATER_DIMER),
                             off_distribution(trained, level, "hydrogen peroxide", from_smiles("OO"))],
    }
    path = result_stem("overlap_source", args.name, jax.devices()[0].platform) + ".json"
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    held = record["held_out"]
    print(f"{held['samples']} held-out geometries: occupied orbital-energy MAE "
          f"{held['orbital_energy_mae_uha']['exact']:.1f} uHa with the exact S, "
          f"{held['orbital_energy_mae_uha']['predicted']:.1f} uHa with the predicted S")
    for guess, row in scf["guesses"].items():
        print(f"  SCF from {guess:12s} {row['mean_iterations']:5.2f} iterations")
    for row in record["off_distribution"]:
        print(f"  {row['molecule']}: smallest eigenvalue of S exact {row['exact']['smallest_overlap_eigenvalue']:.3f}, "
              f"predicted {row['predicted']['smallest_overlap_eigenvalue']:.3f}; occupied eps MAE "
              f"{row['exact']['occupied_orbital_energy_mae_uha']:.0f} vs "
              f"{row['predicted']['occupied_orbital_energy_mae_uha']:.0f} uHa")
    print(f"wrote {path}")
    if not scf["energies_agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
