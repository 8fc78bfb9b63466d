"""Benchmark: VMC step time against batch size and number of electrons, folx vs Hessian loop.

One step is what training repeats: one MCMC call (``mcmc_steps`` Metropolis steps) and one
optimiser step (local energies, the VMC gradient and, for KFAC, the curvature update). The
first step (trace + compile) is timed separately; the step time is the median of --repeats
steps after two warm-up steps. Writes experiments/results/vmc_speed_<platform>.json.

    .venv/bin/python experiments/vmc_speed.py
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from machine import machine_info  # noqa: E402
from molfoundation.blas_threads import one_blas_thread  # noqa: E402
from vmc import ansatz, geometries, train  # noqa: E402
from vmc.config import RunConfig, SystemsConfig, VMCConfig  # noqa: E402
from vmc.geometries import GeometryBatch  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
NETWORKS = {
    "small": lambda: ansatz.small_config(),
    # The size of the FermiNet reference timing in ../shared/reference.md: hidden (64, 16) x 2,
    # 4 determinants (orbital side: the small GNN).
    "ferminet_64x16x2": lambda: ansatz.small_config(one_electron_width=64, pair_width=16,
                                                    embedding_layers=2, n_determinants=4),
    "paper": lambda: ansatz.AnsatzConfig(),
}


def time_steps(system: str, network: str, walkers: int, laplacian: str, optimizer: str,
               mcmc_steps: int, repeats: int) -> dict:
    config = RunConfig(
        systems=SystemsConfig(system), ansatz=NETWORKS[network](),
        vmc=VMCConfig(n_walkers=walkers, mcmc_steps=mcmc_steps, laplacian=laplacian,
                      optimizer=optimizer, hf_fit_steps=0),
    )
    return {"system": system, "network": network, **time_config(config, repeats)}


class FirstGeometry(NamedTuple):
    """What a VMC step on the first geometry of a configuration's systems needs: the problem,
    its group, the row of that geometry, fresh parameters, the sampler state of fresh walkers
    and the compiled MCMC call."""

    problem: train.Problem
    group: geometries.GeometryGroup
    rows: jax.Array
    params: object
    sampler: object
    sample: object


def first_geometry(config: RunConfig) -> FirstGeometry:
    problem = train.Problem.build(config, config.systems.load()[:1], progress=False)
    group = problem.groups[0]
    params = train.init_params(jax.random.PRNGKey(0), config.ansatz, config.vmc.float64)
    sampler = problem.init_sampler(group, params, problem.init_walkers(jax.random.PRNGKey(1), group))
    return FirstGeometry(problem, group, jnp.zeros((1,), jnp.int32), params, sampler, problem.sampler(group))


class FirstStep(NamedTuple):
    """The training loop's VMC step (MCMC call and update) on the first geometry of a
    configuration's systems, and what it is called with: ``step(*state, key, rows, rows)``
    returns the next state (its first 5 entries) and the key and statistics."""

    group: geometries.GeometryGroup
    rows: jax.Array
    step: train.VMCStep
    state: list  # params, opt_state, sampler, spread, visits


def first_step(config: RunConfig) -> FirstStep:
    problem, group, rows, params, sampler, _ = first_geometry(config)
    opt_state = problem.optimizer.init(params, jax.random.PRNGKey(2), GeometryBatch(sampler.walkers, group.geometries))
    spread, visits = train._statistics(problem)
    return FirstStep(group, rows, problem.vmc_step(group), [params, opt_state, sampler, spread, visits])


def time_config(config: RunConfig, repeats: int) -> dict:
    """First-step (trace + compile) and median step seconds of the VMC step (one MCMC call and
    one optimiser step) on the first geometry of ``config``'s systems, with the sizes that set
    them."""
    group, rows, vmc_step, state = first_step(config)
    times = []
    with one_blas_thread():  # as in training (molfoundation.runs.Phase)
        for i in range(repeats + 3):
            start = time.perf_counter()
            *state[:], _, stats = vmc_step(*state, jax.random.PRNGKey(10 + i), rows, rows)
            jax.block_until_ready((state[0], stats["energy"]))
            times.append(time.perf_counter() - start)
    n_params = sum(x.size for x in jax.tree.leaves(state[0]))
    return {
        "electrons": group.n_electrons, "parameters": int(n_params),
        "walkers": config.vmc.n_walkers, "laplacian": config.vmc.laplacian,
        "optimizer": config.vmc.optimizer, "mcmc_steps": config.vmc.mcmc_steps,
        "first_step_seconds": times[0], "step_seconds": statistics.median(times[3:]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mcmc-steps", type=int, default=10)
    parser.add_argument("--optimizer", default="kfac", choices=["kfac", "adam"])
    parser.add_argument("--batch-system", default="LiH", help="system of the batch-size scan")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--electron-systems", nargs="+", default=["H2", "LiH", "H6", "H10"])
    parser.add_argument("--network", default="small", choices=sorted(NETWORKS))
    parser.add_argument("--reference-networks", nargs="*", default=["ferminet_64x16x2"],
                        help="networks also timed on LiH with 256 walkers (comparison with FermiNet)")
    args = parser.parse_args()

    cases = [(args.batch_system, args.network, b) for b in args.batches]
    cases += [(s, args.network, 256) for s in args.electron_systems if (s, args.network, 256) not in cases]
    cases += [("LiH", n, 256) for n in args.reference_networks]
    rows = []
    for system, network, walkers in cases:
        for laplacian in ("folx", "hessian"):
            row = time_steps(system, network, walkers, laplacian, args.optimizer, args.mcmc_steps, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {
        "benchmark": "vmc_speed",
        "command": "python experiments/vmc_speed.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "reference_ferminet_cpu": {
            "LiH, batch 256, hidden (64,16) x 2, 4 dets": {"hessian": 0.052, "folx": 0.038},
            "LiH, batch 256, hidden (256,32) x 4, 16 dets": {"hessian": 0.44, "folx": 0.38},
        },
        "rows": rows,
    }
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"vmc_speed_{jax.default_backend()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
