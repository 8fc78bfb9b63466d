"""Benchmark: seconds per reference sample for water and ethanol at PBE/def2-SVP.

For each molecule the ensemble (geometry optimisation and Hessian) is built once and timed
separately; then the same samples are labelled (SCF, Fock matrix, analytic forces) with 1 and
with 2 worker processes. Writes experiments/results/generation_speed.json.

    .venv/bin/python experiments/generation_speed.py [--water 16] [--ethanol 8]
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from machine import machine_info  # noqa: E402
from molfoundation import molecules  # noqa: E402
from phisnet_jax.dataset import software_versions  # noqa: E402
from phisnet_jax.generate import GenerationRequest, generate  # noqa: E402
from phisnet_jax.reference import LevelOfTheory  # noqa: E402
from phisnet_jax.sampling import thermal_ensemble  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "generation_speed.json")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--water", type=int, default=16, help="samples for water")
    parser.add_argument("--ethanol", type=int, default=8, help="samples for ethanol")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    level = LevelOfTheory("pbe", "def2-svp")
    rows = []
    for name, n_samples in (("water", args.water), ("ethanol", args.ethanol)):
        t0 = time.perf_counter()
        ensemble = thermal_ensemble(molecules.from_name(name), level, temperature=500.0, seed=0)
        ensemble_seconds = time.perf_counter() - t0
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                request = GenerationRequest(
                    output=os.path.join(tmp, "bench.h5"), name=name, source=f"name:{name}",
                    n_samples=n_samples, level=level, workers=workers,
                )
                report = generate(request, lambda: ensemble, log=lambda msg: None)
            row = {
                "molecule": name,
                "n_ao": 24 if name == "water" else 72,
                "samples": n_samples,
                "workers": workers,
                "seconds_per_sample": report.seconds_per_sample,
                "samples_per_minute": 60.0 / report.seconds_per_sample,
                "labelling_seconds": report.labelling_seconds,
                "ensemble_setup_seconds": ensemble_seconds,
                "converged": report.n_converged,
            }
            rows.append(row)
            print(f"{name:8s} workers={workers}: {row['seconds_per_sample']:.2f} s/sample "
                  f"(setup {ensemble_seconds:.1f} s, {report.n_converged}/{n_samples} converged)")

    result = {
        "benchmark": "reference data generation speed",
        "level_of_theory": "PBE/def2-SVP, conv_tol 1e-11, grid level 3, analytic forces",
        "command": "python experiments/generation_speed.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "versions": software_versions(),
        "results": rows,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
