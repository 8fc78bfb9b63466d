"""Benchmark: folx's sparse against its dense Jacobians in VMC training runs, per system.

For each system, ``vmc train SYSTEM --preset small`` runs in fresh processes with no persistent
compilation cache, once with ``--set folx_sparsity=0`` (dense Jacobians) and once with
``vmc.hamiltonian.SPARSITY_THRESHOLD`` (6: sparse while an entry depends on one electron or one
pair), the two alternating, --repeats times each. The settings are the LiH comparison's with FermiNet
(experiments/peers/ferminet.py): 256 walkers, 10 Metropolis steps per update, KFAC, 20 burn-in
calls; the HF fit is --hf-fit-steps long. From the log's time stamps:

- ``startup_seconds``: from the process's start to its first VMC step logged (imports,
  Hartree-Fock, compilation, HF fit, burn-in and the first step);
- ``step_seconds``: wall-clock seconds per VMC step from step --skip to the last.

Medians over the repeats, and ``dense_over_sparse`` ratios of both. The default of ``vmc``
(``vmc.hamiltonian.folx_sparsity_threshold``) is chosen from these. Writes
experiments/results/folx_sparsity_<platform>.json.

    .venv/bin/python experiments/folx_sparsity.py [--systems LiH H6 H8 H2O] [--steps 150]
        [--skip 50] [--hf-fit-steps 20] [--repeats 1]
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

from machine import machine_info, result_stem  # noqa: E402
from vmc.hamiltonian import SPARSITY_THRESHOLD  # noqa: E402
from vmc_profile import training_run  # noqa: E402

SETTINGS = ["burn_in_sweeps=20", "n_walkers=256", "mcmc_steps=10", "optimizer=kfac", "laplacian=folx"]
THRESHOLDS = {"dense": 0, "sparse": SPARSITY_THRESHOLD}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=["LiH", "H6", "H8", "H2O"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--skip", type=int, default=50)
    parser.add_argument("--hf-fit-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    results = []
    for system in args.systems:
        runs = {name: [] for name in THRESHOLDS}
        for _ in range(args.repeats):
            for name, threshold in THRESHOLDS.items():
                settings = [*SETTINGS, f"folx_sparsity={threshold}"]
                runs[name].append(training_run(system, ["--preset", "small", "--hf-fit-steps", str(args.hf_fit_steps),
                                                        *[item for s in settings for item in ("--set", s)]],
                                               args.steps, args.skip))
                print(system, name, runs[name][-1], flush=True)
        row = {"system": system}
        for name in THRESHOLDS:
            row[name] = {key: statistics.median(r[key] for r in runs[name]) for key in runs[name][0]}
            row[name]["runs"] = runs[name]
        row["dense_over_sparse"] = {key: row["dense"][key] / row["sparse"][key]
                                    for key in ("startup_seconds", "step_seconds")}
        results.append(row)

    out = {
        "benchmark": "folx_sparsity",
        "command": "python experiments/folx_sparsity.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "preset": "small", "settings": SETTINGS, "thresholds": THRESHOLDS,
        "steps": args.steps, "skip": args.skip, "hf_fit_steps": args.hf_fit_steps, "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(out, indent=1))
    path = result_stem("folx_sparsity", None, "cpu") + ".json"
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
