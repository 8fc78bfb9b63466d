"""Benchmark: what a PhiSNet training run compiles before its first step, and how long that takes.

For each preset, a fresh process (no persistent compilation cache) builds the water training
problem of experiments/phisnet_speed.py (def2-SVP, float32, random targets) and times
- the parameter initialisation as a run makes it (``jit_once(model.init)``: trace, compile, run),
- the training step (loss, gradient, optimiser, EMA): tracing and lowering, then compiling,
- the compiled step itself (median of ``--repeats``).
It also counts the parameter arrays and the kernels (fusions) of the compiled step, the two
things compile time grows with, and times a whole fresh run of one step through the command
line, ``phisnet train DATA --preset P --steps 1`` (``train_one_step_seconds``: imports, data,
parameters, compilation, the step, its checkpoint), on 24 HF/def2-SVP water geometries this
script generates first. ``--reference REV`` runs the same measurements on another git
revision of this project (checked out beside this one) in the same run, alternating with this
one, and adds the ratios (this / reference). Last, this checkout twice more with one
persistent compilation cache (``molfoundation.compiling.use_persistent_cache``, as the command
lines use it): the second run is a repeated or resumed run's start-up (``this_warm_cache``).
Writes experiments/results/phisnet_compile_<platform>.json.

    .venv/bin/python experiments/phisnet_compile.py [--presets small] [--batch 10] [--repeats 5]
        [--reference REV] [--rounds 2]
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
from machine import machine_info, result_stem  # noqa: E402

ROOT = revisions.ROOT

# One measurement in a fresh process, run from the root of the checkout it measures.
MEASURE = r"""
import json, os, re, statistics, sys, time
sys.path.insert(0, "experiments")
import jax, numpy as np
from molfoundation import compiling, molecules
from phisnet_jax.model import MODEL_PRESETS, PhiSNetConfig
from phisnet_jax.train import init_state, make_train_step
from phisnet_speed import training_problem
preset, batch, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if os.environ["JAX_COMPILATION_CACHE_DIR"]:
    compiling.use_persistent_cache()
cfg = PhiSNetConfig(basis="def2-svp", elements=(1, 8), max_order=4, **MODEL_PRESETS[preset])
model, single, batched, (fock, overlap), tcfg, opt = training_problem(cfg, molecules.from_name("water"), batch)
t0 = time.perf_counter()
state = init_state(model, tcfg, batched, opt)
jax.block_until_ready(state)
init_seconds = time.perf_counter() - t0
step = jax.jit(make_train_step(model, tcfg, opt))
t0 = time.perf_counter()
lowered = step.lower(state, batched, fock, overlap)
t1 = time.perf_counter()
compiled = lowered.compile()
t2 = time.perf_counter()
jax.block_until_ready(compiled(state, batched, fock, overlap))
times = []
for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(state, batched, fock, overlap))
    times.append(time.perf_counter() - t)
entry = compiled.as_text().split("ENTRY", 1)[1]
print(json.dumps({
    "init_seconds": init_seconds, "train_trace_seconds": t1 - t0, "train_compile_seconds": t2 - t1,
    "startup_seconds": init_seconds + t2 - t0, "train_step_ms": 1e3 * statistics.median(times),
    "parameter_arrays": len(jax.tree.leaves(state.params)),
    "parameters": int(sum(np.size(p) for p in jax.tree.leaves(state.params))),
    "step_kernels": len(re.findall(r"= \S+ fusion\(", entry)), "jax": jax.__version__,
    "platform": jax.default_backend(),
}))
"""

KEYS = ("init_seconds", "train_trace_seconds", "train_compile_seconds", "startup_seconds", "train_step_ms",
        "train_one_step_seconds")


def measure(root: str, preset: str, batch: int, repeats: int, cache: str = "") -> dict:
    """One measurement in a fresh process; ``cache``: its persistent compilation cache (none)."""
    out = revisions.run_python(root, ["-c", MEASURE, preset, str(batch), str(repeats)],
                               JAX_COMPILATION_CACHE_DIR=cache)
    return json.loads(out.strip().splitlines()[-1])


def train_one_step(root: str, preset: str, batch: int, data: str) -> float:
    """Seconds of ``phisnet train`` from ``root`` for a fresh one-step run, in a new process
    without a persistent compilation cache."""
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        revisions.run_python(root, ["-m", "phisnet_jax", "train", data, "--run-dir", os.path.join(run_dir, "run"),
                                    "--train", "16", "--valid", "4", "--preset", preset, "--batch-size", str(batch),
                                    "--steps", "1"], JAX_COMPILATION_CACHE_DIR="")
        return time.perf_counter() - started


def measured(root: str, preset: str, batch: int, repeats: int, data: str) -> dict:
    """:func:`measure` and :func:`train_one_step` of one checkout."""
    return {**measure(root, preset, batch, repeats), "train_one_step_seconds": train_one_step(root, preset, batch, data)}


def summarise(runs: list[dict]) -> dict:
    return {**{k: v for k, v in runs[0].items() if k not in KEYS},
            **{k: statistics.median(r[k] for r in runs) for k in KEYS}, "runs": runs}


def measure_preset(preset: str, args, reference_tree: str | None, data: str) -> dict:
    """One preset's row: this checkout (and the reference) ``args.rounds`` times, alternated,
    then this checkout twice with one persistent compilation cache."""
    ours, reference = [], []
    for _ in range(args.rounds):
        ours.append(measured(ROOT, preset, args.batch, args.repeats, data))
        print(json.dumps({"preset": preset, "code": "this", **ours[-1]}), flush=True)
        if reference_tree:
            reference.append(measured(reference_tree, preset, args.batch, args.repeats, data))
            print(json.dumps({"preset": preset, "code": "reference", **reference[-1]}), flush=True)
    with tempfile.TemporaryDirectory() as cache:
        measure(ROOT, preset, args.batch, args.repeats, cache)  # fills the cache
        warm = measure(ROOT, preset, args.batch, args.repeats, cache)
    print(json.dumps({"preset": preset, "code": "this, warm cache", **warm}), flush=True)
    row = {"preset": preset, "molecule": "water", "batch": args.batch, "this": summarise(ours),
           "this_warm_cache": warm}
    if reference:
        row["reference"] = summarise(reference)
        row["ratios"] = {k: row["this"][k] / row["reference"][k] for k in KEYS}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small"])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="measurements of each checkout, alternated")
    parser.add_argument("--reference", help="a git revision of this project to measure in the same run")
    parser.add_argument("--output")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "water.h5")
        revisions.run_python(ROOT, ["-m", "phisnet_jax", "generate", "water", "-n", "24", "--method", "hf",
                                    "--basis", "def2-svp", "--no-optimize", "-o", data])
        if args.reference:
            with revisions.checkout(args.reference) as (tree, commit):
                results = [measure_preset(preset, args, tree, data) for preset in args.presets]
            for row in results:
                row["reference"]["commit"] = commit
        else:
            results = [measure_preset(preset, args, None, data) for preset in args.presets]
    output = args.output or result_stem("phisnet_compile", None, results[0]["this"]["platform"]) + ".json"
    record = {
        "benchmark": "PhiSNet start-up: parameter initialisation and training-step compilation (float32)",
        "command": "python experiments/phisnet_compile.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(), "results": results,
    }
    with open(output + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(output + ".tmp", output)
    print(output)


if __name__ == "__main__":
    main()
