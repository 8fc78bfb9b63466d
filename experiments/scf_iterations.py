"""Benchmark: SCF iterations and time from a trained PhiSNet model's density vs pyscf's guesses.

For held-out geometries of a training run (its test split by default), pyscf runs the SCF at
the run's level of theory from the predicted density and from minao, atom, huckel and 1e;
the table holds mean iterations, iterations relative to minao and mean seconds, and the
converged energies are checked to agree to 1e-8 Ha. The model's accuracy on the same split is
recorded next to it, since the iteration ratio follows the accuracy of F.
Writes experiments/results/scf_iterations_<name>_<platform>.json.

    .venv/bin/python experiments/scf_iterations.py --run-dir runs/water/small --name water -n 20
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

from machine import machine_info  # noqa: E402
from phisnet_jax.evaluate import accuracy, load_trained_model, run_split  # noqa: E402
from phisnet_jax.scf_guess import compare_guesses  # noqa: E402
from phisnet_jax.train import load_run_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="PhiSNet training run.")
    parser.add_argument("--name", required=True, help="Name of the result file.")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("-n", "--max-geometries", type=int, default=20)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    trained = load_trained_model(args.run_dir)
    summary = compare_guesses(args.run_dir, trained=trained, split=args.split, max_geometries=args.max_geometries)
    _, _, data_cfg = load_run_config(args.run_dir)
    record = {
        "benchmark": "SCF iterations from the predicted density vs pyscf's guesses",
        "command": "python experiments/scf_iterations.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(), "jax": jax.__version__,
        "model_accuracy_on_split": accuracy(trained, run_split(trained.config, data_cfg, args.split)),
        **summary,
    }
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"scf_iterations_{args.name}_{jax.devices()[0].platform}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"{summary['geometries']} geometries, {summary['level_of_theory']}, F MAE "
          f"{record['model_accuracy_on_split']['fock_mae_uha']:.1f} micro-hartree:")
    for guess, row in summary["guesses"].items():
        print(f"  {guess:10s} {row['mean_iterations']:5.1f} iterations ({row['iterations_vs_minao']:.2f} x minao)"
              f" {row['mean_seconds']:6.2f} s")
    print(f"energies agree to {summary['max_energy_spread_hartree']:.1e} Ha; wrote {path}")
    if not summary["energies_agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
