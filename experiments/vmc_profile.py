"""Profile: where one VMC training step spends its time, part by part.

Each part of a step is compiled on its own and timed on the same state (median of --repeats
calls after two warm-up calls, results waited for):

- ``log_psi``: log|psi| of all walkers (one Metropolis step evaluates it once);
- ``orbitals``: the molecule-only half of the network (orbital GNN and heads), once;
- ``mcmc``: one MCMC call (``mcmc_steps`` Metropolis steps, the sampler of training);
- ``local_energy``: the local energies (kinetic term by the chosen Laplacian);
- ``energy_gradient``: the loss and its VMC gradient (local energies, then the gradient of
  log|psi| contracted with the centred, clipped local energies);
- ``curvature_log_psi``: the per-walker log|psi| KFAC estimates its curvature from (every
  walker with its own copy of the molecule's inputs) and its gradient;
- ``kfac_step``: the whole KFAC step (gradient, curvature estimate, factor inverses, update);
  ``kfac_step_no_inverse`` the same without recomputing the inverses (inverse_update_period
  past the timed steps): their difference is what the inverses cost in a step timed alone;
- ``adam_step``: the Adam step (gradient and update only);
- ``training_step``: wall-clock seconds per step of ``vmc train`` with the same settings, in
  a fresh process (from the log's timestamps, steps after --skip), everything the loop does
  included.

Parts timed alone miss how they share the two cores inside a step (work off the update's path,
such as the curvature estimate while inverses are cached, runs beside it; recomputed every step,
the inverses wait for it), so the step is also taken apart by changing one setting at a time:
``whole_step`` holds the median seconds of the VMC step itself (the training loop's compiled
MCMC call and update, its statistics fetched as the loop does) with the run's settings (``step``)
and with half the Metropolis steps (``half_mcmc``), Adam instead of KFAC (``adam``),
the factor inverses never recomputed (``no_inverse``) and the curvature estimated from a quarter
of the walkers (``quarter_curvature``), all in one process, taking turns (--rounds rounds of 5
steps each), so that a slower minute of the machine slows every variant alike. Derived from it:
``mcmc`` = (step - half_mcmc) x mcmc_steps / (mcmc_steps - mcmc_steps // 2), the MCMC call;
``kfac_extra`` = step - adam, what KFAC adds to the gradient step (curvature, inverses,
preconditioning); ``inverses`` = step - no_inverse, the inverses recomputed every step with the
curvature estimate they wait for; ``curvature`` = (step - quarter_curvature) x 4 / 3, the
per-walker network the curvature is estimated from; and ``outside_step`` =
training_step - step (logging, host round-trips, checkpoints). Writes
experiments/results/vmc_profile_<label>_<platform>.json (label: the system by default).

    .venv/bin/python experiments/vmc_profile.py --system LiH
    .venv/bin/python experiments/vmc_profile.py --system LiH --set curvature_walker_stride=4 --label LiH_stride4
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from machine import machine_info, result_stem  # noqa: E402
from molfoundation.blas_threads import one_blas_thread  # noqa: E402
from molfoundation.settings import apply_settings  # noqa: E402
from vmc import ansatz, geometries, optimizers  # noqa: E402
from vmc.config import SystemsConfig, preset_config, run_directory  # noqa: E402
from vmc.geometries import GeometryBatch  # noqa: E402
from vmc_speed import first_geometry, first_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of ``fn(*args)`` (results waited for) after two warm-up calls."""
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def profile_parts(config, repeats: int) -> dict:
    problem, group, rows, params, sampler, sample = first_geometry(config)
    for i in range(5):  # walkers off their starting positions
        sampler, _, _ = sample(params, sampler, rows, jax.random.PRNGKey(100 + i))
    batch = GeometryBatch(sampler.walkers, group.select(rows))
    fns = problem.functions
    geometry = jax.tree.map(lambda x: x[0], group.geometries)
    module = ansatz.TransferableWavefunction(config.ansatz)
    log_psi_all = jax.jit(geometries.over_batch(fns.log_psi))
    orbitals = jax.jit(lambda p, g: module.apply(p, g.inputs, method=module.orbitals))
    curvature_log_psi = geometries.make_kfac_log_psi(config.ansatz, config.kfac.curvature_walker_stride)
    curvature = jax.jit(jax.value_and_grad(lambda p, b: jnp.mean(curvature_log_psi(p, b))))
    energy_gradient = jax.jit(jax.value_and_grad(problem.energy_loss, has_aux=True))

    def optimizer_step(optimizer):
        own = jax.tree.map(lambda x: x.copy(), params)  # the KFAC step donates its parameters
        state = optimizer.init(own, jax.random.PRNGKey(2), batch)
        key = jax.random.PRNGKey(3)
        state_box = [own, state]

        def step():
            p, s, stats = optimizer.step(state_box[0], state_box[1], key, batch)
            state_box[0], state_box[1] = p, s
            return stats["energy"]

        return step

    kfac = problem.optimizer
    no_inverse = geometries.make_kfac(problem.energy_loss, config.ansatz,
                                      dataclasses.replace(config.kfac, inverse_update_period=10**6))
    adam = optimizers.make_adam(problem.energy_loss, config.adam)
    parts = {
        "log_psi": timed(log_psi_all, params, batch, repeats=repeats),
        "orbitals": timed(orbitals, params, geometry, repeats=repeats),
        "mcmc": timed(sample, params, sampler, rows, jax.random.PRNGKey(7), repeats=repeats),
        "local_energy": timed(problem.local_energy, params, batch, repeats=repeats),
        "energy_gradient": timed(energy_gradient, params, batch, repeats=repeats),
        "curvature_log_psi": timed(curvature, params, batch, repeats=repeats),
        "kfac_step": timed(optimizer_step(kfac), repeats=repeats),
        "kfac_step_no_inverse": timed(optimizer_step(no_inverse), repeats=repeats),
        "adam_step": timed(optimizer_step(adam), repeats=repeats),
    }
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    return {"parts": parts, "parameters": n_params, "electrons": group.n_electrons}


WHOLE_STEP_VARIANTS = {
    "step": lambda c: [],
    "half_mcmc": lambda c: [f"mcmc_steps={c.vmc.mcmc_steps // 2}"],
    "adam": lambda c: ["optimizer=adam"],
    "no_inverse": lambda c: ["inverse_update_period=1000000"],
    "quarter_curvature": lambda c: [f"curvature_walker_stride={4 * c.kfac.curvature_walker_stride}"],
}


def whole_steps(config, rounds: int) -> dict:
    """Median seconds of the VMC step of ``config`` and of each of :data:`WHOLE_STEP_VARIANTS`,
    the variants taking turns, 5 steps each per round (after 3 warm-up steps)."""
    variants = {name: first_step(apply_settings(config, change(config)))
                for name, change in WHOLE_STEP_VARIANTS.items()}

    def advance(name, n, first_key):
        _, rows, step, state = variants[name]
        for i in range(n):
            *state[:], _, stats = step(*state, jax.random.PRNGKey(first_key + i), rows, rows)
            jax.device_get(stats)  # as the training loop does, every step

    for name in variants:
        advance(name, 3, 0)
    times = {name: [] for name in variants}
    for r in range(rounds):
        for name in variants:
            start = time.perf_counter()
            advance(name, 5, 10 + 5 * r)
            times[name].append((time.perf_counter() - start) / 5)
    return {name: statistics.median(t) for name, t in times.items()}


def training_run(system: str, args: list[str], steps: int, skip: int) -> dict:
    """``vmc train SYSTEM ARGS --steps STEPS`` in a fresh process without a persistent
    compilation cache: ``startup_seconds`` from its start to its first VMC step logged (imports,
    Hartree-Fock, compilation, HF fit, burn-in, the first step) and ``step_seconds``, wall-clock
    seconds per VMC step from step ``skip`` to the last, from the log's time stamps."""
    with tempfile.TemporaryDirectory() as work:
        run_dir = os.path.join(work, "run")
        launched = time.time()
        done = subprocess.run([sys.executable, "-m", "vmc", "train", system, "--run-dir", run_dir,
                               "--steps", str(steps), *args],
                              cwd=ROOT, env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=""),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"vmc train {system} failed:\n{done.stderr[-2000:]}")
        times = [e["time"] for e in run_directory(run_dir).read_log("vmc")]
    return {"startup_seconds": times[0] - launched,
            "step_seconds": (times[-1] - times[skip]) / (len(times) - 1 - skip)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="LiH")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--laplacian", default="folx", choices=["folx", "hessian"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=40, help="rounds of the whole-step variants")
    parser.add_argument("--steps", type=int, default=300, help="steps of the timed training run")
    parser.add_argument("--skip", type=int, default=50)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the run configuration (as vmc train --set), repeatable")
    parser.add_argument("--label", help="result file label [default: the system]")
    args = parser.parse_args()

    config = preset_config(args.preset, SystemsConfig(args.system), hf_fit_steps=0, laplacian=args.laplacian)
    config = apply_settings(config, args.settings)
    with one_blas_thread():  # as in training (molfoundation.runs.Phase)
        profile = profile_parts(config, args.repeats)
    parts = profile["parts"]
    sets = [item for setting in args.settings for item in ("--set", setting)]
    parts["training_step"] = training_run(args.system, ["--preset", args.preset, "--hf-fit-steps", "0",
                                                        "--set", f"laplacian={args.laplacian}", *sets],
                                          args.steps, args.skip)["step_seconds"]
    with one_blas_thread():
        whole = whole_steps(config, args.rounds)
    m = config.vmc.mcmc_steps
    derived = {
        "mcmc": (whole["step"] - whole["half_mcmc"]) * m / (m - m // 2),
        "kfac_extra": whole["step"] - whole["adam"],
        "inverses": whole["step"] - whole["no_inverse"],
        "curvature": (whole["step"] - whole["quarter_curvature"]) * 4 / 3,
        "outside_step": parts["training_step"] - whole["step"],
    }
    out = {
        "benchmark": "vmc_profile",
        "command": "python experiments/vmc_profile.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "jax": jax.__version__,
        "system": args.system, "preset": args.preset, "laplacian": args.laplacian, "settings": args.settings,
        "walkers": config.vmc.n_walkers, "mcmc_steps": config.vmc.mcmc_steps,
        "parameters": profile["parameters"], "electrons": profile["electrons"],
        "seconds": parts, "whole_step_seconds": whole, "derived_seconds": derived,
    }
    print(json.dumps(out, indent=1))
    path = result_stem("vmc_profile", args.label or args.system, jax.default_backend()) + ".json"
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
