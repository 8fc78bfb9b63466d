"""Benchmark: what runs beside an XLA compilation in another thread (molfoundation.compiling.compile_ahead).

A large program (--ops elementwise operations on a vector, compiling for some seconds) is lowered
in the main thread and compiled in a second one; meanwhile the main thread, every 0.5 s,
compiles a new one-operation program, runs an already compiled one and runs pure Python
(sum of squares to 300000). Each is also timed before the large compilation starts
(``alone``). Medians over the calls made while the large compilation ran. No persistent
compilation cache. Writes experiments/results/compile_overlap_<platform>.json.

    .venv/bin/python experiments/compile_overlap.py [--ops 1500]
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from machine import machine_info, result_stem  # noqa: E402


def large_program(n_ops: int):
    def program(x):
        for i in range(n_ops):
            x = jnp.sin(x * (i + 1.0)) + jnp.cos(x[::-1]) * 0.5
            if i % 3 == 0:
                x = jnp.roll(x, i % 7)
        return x

    return jax.jit(program).lower(jnp.ones(64))


def timed_tasks(k: int, compiled) -> dict:
    """Seconds of each main-thread task: compiling a new one-add program, running a compiled
    one, pure Python."""
    start = time.perf_counter()
    jax.jit(lambda x: x + k).lower(jnp.ones(3)).compile()
    compiled_at = time.perf_counter()
    jax.block_until_ready(compiled(jnp.ones(3)))
    ran_at = time.perf_counter()
    sum(i * i for i in range(300000))
    return {"compile_small": compiled_at - start, "run_compiled": ran_at - compiled_at,
            "python": time.perf_counter() - ran_at}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=1500)
    parser.add_argument("--output")
    args = parser.parse_args()
    compiled = jax.jit(lambda x: x * 2 + 1)
    compiled(jnp.ones(3))
    alone = [timed_tasks(-k - 1, compiled) for k in range(3)]
    lowered = large_program(args.ops)
    finished = {}
    start = time.perf_counter()

    def compile_large():
        lowered.compile()
        finished["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=compile_large)
    thread.start()
    beside = []
    while thread.is_alive():
        time.sleep(0.5)
        if thread.is_alive():
            beside.append(dict(timed_tasks(len(beside), compiled), at=time.perf_counter() - start))
    thread.join()
    keys = ("compile_small", "run_compiled", "python")
    result = {
        "benchmark": "Main-thread work beside an XLA compilation in another thread",
        "command": "python experiments/compile_overlap.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "ops": args.ops,
        "large_compile_seconds": finished["seconds"],
        "alone": {key: statistics.median(row[key] for row in alone) for key in keys},
        "beside": {key: statistics.median(row[key] for row in beside) for key in keys},
        "calls_beside": beside,
    }
    path = args.output or result_stem("compile_overlap", None, jax.default_backend()) + ".json"
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("large_compile_seconds", "alone", "beside")}, indent=1))


if __name__ == "__main__":
    main()
