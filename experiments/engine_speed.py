"""Benchmark: training step times of this checkout against another revision, in one run.

Each case runs the command line of both code versions on the same machine, the other revision
first and this checkout second, and reads the step times each writes to its run's log: the
``seconds`` of every VMC step (the step function with its host round-trips), and for PhiSNet
the difference of the cumulative ``seconds`` between consecutive logged steps. A case's step
time is the median after --warmup steps (compilation excluded). The other revision is checked
out with ``git worktree`` into a temporary directory and run from there with the same virtual
environment. Cases: VMC H2 and LiH (small preset: 256 walkers, 10 Metropolis steps, KFAC),
shared VMC on three H4 chains (all three in every step), PhiSNet small preset on water
(batch 10). Writes experiments/results/engine_speed_<platform>.json.

    .venv/bin/python experiments/engine_speed.py --baseline 28add4a
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import revisions  # noqa: E402
from machine import machine_info  # noqa: E402

ROOT = revisions.ROOT
RESULTS = os.path.join(ROOT, "experiments", "results")


def run(tree: str, module: str, args: list[str]) -> float:
    """``python -m module args`` with the packages of ``tree``; returns its wall-clock seconds."""
    started = time.perf_counter()
    revisions.run_python(tree, ["-m", module, *args])
    return time.perf_counter() - started


def log_entries(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def hf_fit_flag(tree: str) -> str:
    """The option that sets the supervised Hartree-Fock steps in ``tree``'s ``vmc`` CLI."""
    with open(os.path.join(tree, "vmc", "cli.py")) as f:
        return "--hf-fit-steps" if "--hf-fit-steps" in f.read() else "--pretrain-steps"


def vmc_case(tree: str, work: str, command: str, spec: str, steps: int, warmup: int, extra: list[str]) -> dict:
    run_dir = os.path.join(work, "run")
    wall = run(tree, "vmc", [command, spec, "--run-dir", run_dir, "--preset", "small", hf_fit_flag(tree), "0",
                             "--steps", str(steps), "--set", "checkpoint_every=100000", *extra])
    times = [e["seconds"] for e in log_entries(run_dir) if e["phase"] == "vmc"]
    return {"step_seconds": statistics.median(times[warmup:]), "steps": len(times), "wall_seconds": wall}


def phisnet_case(tree: str, work: str, dataset: str, steps: int, warmup: int) -> dict:
    run_dir = os.path.join(work, "run")
    wall = run(tree, "phisnet_jax", ["train", dataset, "--run-dir", run_dir, "--preset", "small", "--train", "40",
                                     "--valid", "0", "--batch-size", "10", "--steps", str(steps),
                                     "--set", "log_every=1", "--set", "validate_every=100000"])
    seconds = [e["seconds"] for e in log_entries(run_dir) if "loss" in e]
    times = [b - a for a, b in zip(seconds, seconds[1:])]
    return {"step_seconds": statistics.median(times[warmup:]), "steps": len(seconds), "wall_seconds": wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare with")
    parser.add_argument("--dataset", help="water dataset (HDF5, >= 40 geometries) [default: generate 40 "
                        "PBE/def2-SVP geometries]")
    parser.add_argument("--vmc-steps", type=int, default=60)
    parser.add_argument("--phisnet-steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each version per case, alternating; the median step time is kept")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="engine_speed_") as work, \
            revisions.checkout(args.baseline) as (baseline_tree, revision):
        trees = {"baseline": baseline_tree, "this": ROOT}
        dataset = args.dataset and os.path.abspath(args.dataset)
        if dataset is None:
            dataset = os.path.join(work, "water.h5")
            run(ROOT, "phisnet_jax", ["generate", "water", "--samples", "40", "--workers", "2", "--output", dataset])
        cases = {
            "vmc_H2": lambda tree, w: vmc_case(tree, w, "train", "H2", args.vmc_steps, args.warmup, []),
            "vmc_LiH": lambda tree, w: vmc_case(tree, w, "train", "LiH", args.vmc_steps, args.warmup, []),
            "vmc_shared_H4x3": lambda tree, w: vmc_case(tree, w, "pretrain", "hchains:4@1.6,1.8,2.0",
                                                        args.vmc_steps // 2, args.warmup,
                                                        ["--geometries-per-step", "3"]),
            "phisnet_small_water_batch10": lambda tree, w: phisnet_case(tree, w, dataset, args.phisnet_steps,
                                                                        args.warmup),
        }
        results = {}
        for name, case in cases.items():
            runs = {label: [] for label in trees}
            for repeat in range(args.repeats):
                for label, tree in trees.items():
                    case_dir = os.path.join(work, f"{name}_{label}_{repeat}")
                    os.makedirs(case_dir)
                    runs[label].append(case(tree, case_dir))
            row = {label: {"step_seconds": statistics.median(r["step_seconds"] for r in rows),
                           "runs": rows} for label, rows in runs.items()}
            row["ratio_this_to_baseline"] = row["this"]["step_seconds"] / row["baseline"]["step_seconds"]
            results[name] = row
            print(name, json.dumps(row), flush=True)
    import jax

    record = {"benchmark": "engine_speed", "command": "python experiments/engine_speed.py " + " ".join(sys.argv[1:]),
              "baseline_revision": revision, "results": results, "machine": machine_info()}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"engine_speed_{jax.default_backend()}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
