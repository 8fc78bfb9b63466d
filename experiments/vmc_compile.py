"""Benchmark: what the VMC update compiles, part by part, and how long each part takes.

The optimiser update of a VMC step is the longest compilation of a training run's start-up.
This lowers and compiles, each in a fresh process (no persistent compilation cache), the parts
it is made of for a preset's network on a system (default: the small preset on LiH, float32,
256 walkers, folx; the settings of experiments/peers/ferminet.py):

- ``log_psi``: log|psi| of every walker;
- ``local_energy``: the local energies (the Laplacian by --laplacian);
- ``energy_gradient``: the VMC loss and its gradient (vmc.loss);
- ``curvature_gradient``: the gradient of the mean of KFAC's registered log|psi| (the
  curvature's walkers);
- ``adam_step``: a whole Adam update (loss, gradient, optax);
- ``kfac_step``: a whole KFAC update as training compiles it (loss, gradient, curvature
  estimate, factor inverses every few steps, preconditioning).

For each: ``lower_seconds`` (tracing and lowering), ``compile_seconds`` (XLA) and
``stablehlo_lines``, the size of the lowered program. Also the network's parameter arrays and
KFAC's curvature blocks by kind, the counts the update's size grows with. Writes
experiments/results/vmc_compile_<platform>.json.

    .venv/bin/python experiments/vmc_compile.py [--system LiH] [--laplacian folx]
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from machine import machine_info, result_stem  # noqa: E402

PARTS = ("log_psi", "local_energy", "energy_gradient", "curvature_gradient", "adam_step", "kfac_step")
SETTINGS = ["n_walkers=256", "mcmc_steps=10", "optimizer=kfac"]


def measure(system: str, preset: str, laplacian: str, part: str) -> dict:
    """One part, lowered and compiled in this process."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = ""
    import jax
    import jax.numpy as jnp

    from molfoundation.settings import apply_settings
    from vmc import geometries, optimizers
    from vmc.config import SystemsConfig, preset_config
    from vmc.geometries import GeometryBatch
    from vmc_speed import first_geometry

    config = apply_settings(preset_config(preset, SystemsConfig(system), hf_fit_steps=0, laplacian=laplacian),
                            SETTINGS)
    problem, group, rows, params, sampler, _ = first_geometry(config)
    batch = GeometryBatch(sampler.walkers, group.select(rows))
    extra = {}
    if part == "log_psi":
        fn, args = geometries.over_batch(problem.functions.log_psi), (params, batch)
    elif part == "local_energy":
        fn, args = problem.functions.local_energy, (params, batch)
    elif part == "energy_gradient":
        fn, args = jax.value_and_grad(problem.energy_loss, has_aux=True), (params, batch)
    elif part == "curvature_gradient":
        values = geometries.make_kfac_log_psi(config.ansatz, config.kfac.curvature_walker_stride)
        fn, args = jax.value_and_grad(lambda p, b: jnp.mean(values(p, b))), (params, batch)
    else:
        optimizer = problem.optimizer if part == "kfac_step" else optimizers.make_adam(problem.energy_loss,
                                                                                        config.adam)
        state = optimizer.init(params, jax.random.PRNGKey(2), batch)
        fn, args = optimizer.step, (params, state, jax.random.PRNGKey(3), batch)
        if part == "kfac_step":
            blocks = state.estimator_state.blocks_states
            extra["kfac_blocks"] = dict(collections.Counter(type(b).__qualname__.split(".")[0] for b in blocks))
            extra["parameter_arrays"] = len(jax.tree.leaves(params))
            extra["parameters"] = int(sum(x.size for x in jax.tree.leaves(params)))
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"lower_seconds": lowered_at - start, "compile_seconds": done - lowered_at,
            "stablehlo_lines": lowered.as_text().count("\n"), **extra}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="LiH")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--laplacian", default="folx", choices=["folx", "hessian"])
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    if args.part:
        print(json.dumps(measure(args.system, args.preset, args.laplacian, args.part)))
        return
    parts = {}
    for part in PARTS:
        done = subprocess.run([sys.executable, __file__, "--system", args.system, "--preset", args.preset,
                               "--laplacian", args.laplacian, "--part", part],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{part} failed:\n{done.stderr[-2000:]}")
        parts[part] = json.loads(done.stdout.strip().splitlines()[-1])
        print(part, json.dumps(parts[part]), flush=True)
    import jax

    result = {"benchmark": "vmc_compile",
              "command": "python experiments/vmc_compile.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "jax": jax.__version__, "system": args.system, "preset": args.preset,
              "laplacian": args.laplacian, "settings": SETTINGS, "parts": parts}
    path = result_stem("vmc_compile", None, jax.default_backend()) + ".json"
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", os.path.relpath(path))


if __name__ == "__main__":
    main()
