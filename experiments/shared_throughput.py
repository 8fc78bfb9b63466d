"""Benchmark: throughput of shared training (several geometries per optimisation step) against
training on one geometry, on the same machine in the same run.

For a set of geometries of one composition, VMC runs with ``geometries_per_step`` = each value
of --per-step (walkers per geometry fixed), and on the first geometry alone (a set of one). Timings are the median seconds per optimisation step after
--warmup steps (compilation excluded; reported separately as the first step's time). Writes
experiments/results/shared_throughput_<platform>.json.

    .venv/bin/python experiments/shared_throughput.py --systems hchains:6@1.6,1.8,2.0,2.2 \
        --per-step 1 2 4 --steps 12
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from machine import machine_info  # noqa: E402
from vmc import system_sets, train  # noqa: E402
from vmc.config import PRESET_NAMES, ScheduleConfig, SystemsConfig, preset_config, run_directory  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def step_times(run_dir: str) -> np.ndarray:
    return np.array([e["seconds"] for e in run_directory(run_dir).read_log("vmc")])


def summary(times: np.ndarray, warmup: int, geometries: int, walkers: int) -> dict:
    median = float(np.median(times[warmup:]))
    return {"geometries_per_step": geometries, "walkers_per_geometry": walkers,
            "first_step_seconds": float(times[0]), "step_seconds": median,
            "geometries_per_second": geometries / median,
            "walker_updates_per_second": geometries * walkers / median}


def time_shared(set_file: str, n_geometries: int, per_step: int, preset: str, sampling: dict,
                steps: int, warmup: int, run_dir: str) -> dict:
    """Step times of ``steps`` steps of shared training on the system-set file ``set_file``
    (``n_geometries`` geometries), ``per_step`` geometries per step, in a new ``run_dir``."""
    config = preset_config(preset, SystemsConfig(set_file), ScheduleConfig(per_step, "round_robin"), **sampling)
    train.train(run_dir, config, max_steps=steps, progress=False)
    return summary(step_times(run_dir), warmup, min(per_step, n_geometries), config.vmc.n_walkers)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="hchains:6@1.6,1.8,2.0,2.2")
    parser.add_argument("--per-step", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--preset", default="small", choices=PRESET_NAMES)
    parser.add_argument("--walkers", type=int, help="Walkers per geometry [the preset's].")
    parser.add_argument("--optimizer", default="kfac", choices=["kfac", "adam"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    system_set = SystemsConfig(args.systems).load()
    sampling = dict(hf_fit_steps=0, burn_in_sweeps=2, checkpoint_every=10**6, optimizer=args.optimizer)
    if args.walkers:
        sampling["n_walkers"] = args.walkers
    work = tempfile.mkdtemp(prefix="shared_throughput_")
    results = []
    try:
        set_file = os.path.join(work, "set.xyz")
        system_sets.write_system_set(set_file, system_set)
        for per_step in args.per_step:
            row = time_shared(set_file, len(system_set), per_step, args.preset, sampling, args.steps,
                              args.warmup, os.path.join(work, f"shared_{per_step}"))
            results.append({"mode": "shared", **row})
            print(results[-1], flush=True)
        first = os.path.join(work, "first.xyz")
        system_sets.write_system_set(first, system_set[:1])
        row = time_shared(first, 1, 1, args.preset, sampling, args.steps, args.warmup, os.path.join(work, "single"))
        results.append({"mode": "one geometry", **row})
        print(results[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    single_step = results[-1]["step_seconds"]
    for row in results:
        row["geometries_per_second_vs_single"] = row["geometries_per_second"] * single_step
    record = {"benchmark": "shared-training throughput", "command": " ".join(sys.argv),
              "systems": args.systems, "preset": args.preset, "optimizer": args.optimizer,
              "results": results, "machine": machine_info()}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"shared_throughput_{jax.devices()[0].platform}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
