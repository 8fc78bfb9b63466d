"""Benchmark: time to the first parameters, compiled with XLA's backend optimisations (``jax.jit``)
and without them (``molfoundation.compiling.jit_once``, what both pillars use), in one run.

Every measurement runs in a fresh process without a persistent compilation cache, so both
variants pay the whole compilation: tracing, compiling and running the initialisation once.
Cases: PhiSNet on water in def2-SVP (the tiny and small presets, float32 as trained), and the
VMC ansatz (tiny and small presets). Each case alternates the two variants ``--repeats`` times;
the JSON gives every time, the medians, their ratio and the largest difference between the
parameters the two variants draw. Writes experiments/results/init_compile_<platform>.json.

    .venv/bin/python experiments/init_compile.py --repeats 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

from machine import machine_info, result_stem  # noqa: E402

# One measurement: prints {"seconds": ..., "checksum": [...]} for (case, variant).
MEASURE = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from molfoundation import compiling
case, variant = sys.argv[1], sys.argv[2]
compile_ = compiling.jit_once if variant == "jit_once" else jax.jit
if case.startswith("phisnet"):
    from molfoundation import molecules
    from phisnet_jax.model import MODEL_PRESETS, PhiSNetConfig, make_inputs, make_phisnet
    config = PhiSNetConfig(basis="def2-svp", elements=(1, 8), max_order=4, **MODEL_PRESETS[case.split("_")[1]])
    water = molecules.from_name("water")
    example = make_inputs(config, water.atomic_numbers, water.positions)
    init = compile_(make_phisnet(config).init)
    args = (jax.random.PRNGKey(0), example)
else:
    from vmc import train
    from vmc.config import SystemsConfig, preset_config
    network = preset_config(case.split("_")[1], SystemsConfig("H2")).ansatz
    init = compile_(train.init_params.__wrapped__, static_argnums=(1, 2))
    args = (jax.random.PRNGKey(0), network, False)
start = time.perf_counter()
params = jax.block_until_ready(init(*args))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "leaves": [np.asarray(x, np.float64).ravel()[:64].tolist()
                                                  for x in jax.tree.leaves(params)]}))
"""

CASES = ["phisnet_tiny", "phisnet_small", "vmc_tiny", "vmc_small"]
VARIANTS = ["jit", "jit_once"]


def measure(case: str, variant: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    out = subprocess.run([sys.executable, "-c", MEASURE, case, variant], env=env, text=True, capture_output=True)
    if out.returncode != 0:
        raise RuntimeError(f"{case} {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    args = parser.parse_args()
    results = {}
    for case in args.cases:
        seconds = {v: [] for v in VARIANTS}
        leaves = {}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                record = measure(case, variant)
                seconds[variant].append(record["seconds"])
                leaves[variant] = record["leaves"]
        medians = {v: statistics.median(s) for v, s in seconds.items()}
        difference = max(max(abs(a - b) for a, b in zip(x, y)) if x else 0.0
                         for x, y in zip(leaves["jit"], leaves["jit_once"]))
        results[case] = {"seconds": seconds, "median_seconds": medians,
                         "jit_over_jit_once": medians["jit"] / medians["jit_once"],
                         "max_parameter_difference": difference}
        print(case, json.dumps(results[case]), flush=True)
    record = {"benchmark": "init_compile", "command": "python experiments/init_compile.py " + " ".join(sys.argv[1:]),
              "results": results, "machine": machine_info()}
    import jax

    path = result_stem("init_compile", None, jax.default_backend()) + ".json"
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
