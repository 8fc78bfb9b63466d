"""Benchmark: the KFAC factor inverses by LU (kfac-jax's default) and by Cholesky, in one run.

Every few steps (``inverse_update_period``) the KFAC update recomputes the damped inverse of
each Kronecker factor of each dense layer (kfac-jax's ``update_cache``): one small program per
layer, which makes up much of the update's compiled code. This times that part alone for the
VMC network of a preset on a system (default: the small preset on LiH, float32 as trained):
its curvature estimator (the one ``vmc.optimizers.make_kfac`` builds, on random positive
definite factors of the real shapes), traced, lowered and compiled anew --rounds times for each
method, the methods alternating, and the compiled cache update run --calls times (median of
per-round means). Also: the compiled kernels of each, and the largest difference between the
two methods' inverses relative to the largest inverse entry. No persistent compilation cache.
Writes experiments/results/kfac_inverse_<platform>.json.

    .venv/bin/python experiments/kfac_inverse.py [--system LiH] [--preset small] [--rounds 5]
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from machine import machine_info, result_stem  # noqa: E402
from vmc import geometries, kfac_compat, optimizers, train  # noqa: E402
from vmc.config import SystemsConfig, preset_config  # noqa: E402

METHODS = {"lu": False, "cholesky": True}  # kfac-jax's use_cholesky_inversion
DAMPING = 1e-3


def estimator_and_state(system: str, preset: str):
    """kfac-jax's curvature estimator of the VMC network and a state whose factors are random
    positive definite matrices of their real shapes."""
    kfac_jax = kfac_compat.load()
    config = preset_config(preset, SystemsConfig(system))
    problem = train.Problem.build(config, progress=False)
    group = problem.groups[0]
    key = jax.random.PRNGKey(0)
    batch = geometries.GeometryBatch(problem.init_walkers(key, group)[:1], group.select(jnp.array([0])))
    params = train.init_params(key, config.ansatz, False)
    estimator = kfac_jax.BlockDiagonalCurvature(
        func=optimizers.curvature_value(geometries.make_kfac_log_psi(config.ansatz)),
        default_estimation_mode="fisher_gradients",
        layer_tag_to_block_ctor={"repeated_dense": optimizers.repeated_dense_block()})
    state = estimator.init(key, (params, batch), None, -1.0)
    rng = np.random.default_rng(0)

    def positive_definite(x):
        if x.ndim == 2 and x.shape[0] == x.shape[1]:
            a = rng.normal(size=x.shape)
            return jnp.asarray(a @ a.T / x.shape[0] + 0.1 * np.eye(x.shape[0]), x.dtype)
        return x

    return estimator, jax.tree.map(positive_definite, state), config


def measure(estimator, state, method: str, calls: int) -> tuple[dict, object]:
    kfac_compat.load().utils.set_use_cholesky_inversion(METHODS[method])
    # A new function each time: traced, lowered and compiled anew.
    update = jax.jit(lambda s: estimator.update_cache(s, DAMPING, None, -1.0, False, None))
    start = time.perf_counter()
    lowered = update.lower(state)
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    out = jax.block_until_ready(compiled(state))
    start_calls = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(compiled(state))
    run_ms = (time.perf_counter() - start_calls) / calls * 1e3
    return {"lower_seconds": traced - start, "compile_seconds": done - traced, "run_ms": run_ms,
            "kernels": compiled.as_text().count(" fusion(")}, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="LiH")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--output")
    args = parser.parse_args()
    estimator, state, config = estimator_and_state(args.system, args.preset)
    runs = {method: [] for method in METHODS}
    inverses = {}
    for r in range(args.rounds):
        for method in METHODS:
            row, inverses[method] = measure(estimator, state, method, args.calls)
            runs[method].append(row)
            print(json.dumps({"round": r, "method": method, **row}), flush=True)
    summary = {method: {key: statistics.median(row[key] for row in rows) for key in rows[0]}
               for method, rows in runs.items()}
    lu, cholesky = (jax.tree.leaves(inverses[m]) for m in METHODS)
    difference = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                     for a, b in zip(lu, cholesky) if jnp.issubdtype(a.dtype, jnp.floating) and a.size)
    result = {
        "benchmark": "KFAC factor inverses (kfac-jax update_cache), LU against Cholesky",
        "command": "python experiments/kfac_inverse.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "system": args.system, "preset": args.preset, "damping": DAMPING,
        "blocks": len(estimator.blocks),
        "rounds": args.rounds, "calls": args.calls,
        **summary,
        "ratios": {key: summary["cholesky"][key] / summary["lu"][key] for key in summary["lu"]},
        "max_relative_difference": difference,
        "runs": runs,
    }
    path = args.output or result_stem("kfac_inverse", None, jax.default_backend()) + ".json"
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("lu", "cholesky", "ratios", "max_relative_difference")}, indent=1))


if __name__ == "__main__":
    main()
