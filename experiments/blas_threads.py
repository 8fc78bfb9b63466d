"""Benchmark: the VMC step with the BLAS libraries' thread pools as they start and on one thread.

XLA hands the LAPACK calls of a program (the KFAC factor inverses' Cholesky, the determinants'
LU) to the BLAS that scipy ships, whose own threads compete with XLA's for the cores
(molfoundation.blas_threads). This times the training loop's VMC step (MCMC call and KFAC
update, every output waited for) on the first geometry of a preset's system, in one process,
the two settings taking turns: --rounds rounds of --steps steps each (the first step of a round
not counted, so that threads left spinning by the other setting do not count against this
one); per setting the median of the rounds' mean seconds per step. Without
--inverse-update-period, the preset's. Writes experiments/results/blas_threads[_<system>_<preset>]
[_period<n>]_<platform>.json (the label for settings other than LiH, small, the preset's period).

    .venv/bin/python experiments/blas_threads.py [--system LiH] [--preset small] [--rounds 20]
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import threadpoolctl  # noqa: E402

from machine import machine_info, result_stem  # noqa: E402
from molfoundation.blas_threads import one_blas_thread  # noqa: E402
from molfoundation.settings import apply_settings  # noqa: E402
from vmc.config import SystemsConfig, preset_config  # noqa: E402
from vmc_speed import first_step  # noqa: E402

SETTINGS = {"as_started": contextlib.nullcontext, "one_thread": one_blas_thread}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="LiH")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=9, help="steps per round (the first not counted)")
    parser.add_argument("--inverse-update-period", type=int)
    args = parser.parse_args()

    config = preset_config(args.preset, SystemsConfig(args.system), hf_fit_steps=0)
    if args.inverse_update_period:
        config = apply_settings(config, [f"inverse_update_period={args.inverse_update_period}"])
    _, rows, step, state = first_step(config)

    def advance(n, first_key):
        times = []
        for i in range(n):
            start = time.perf_counter()
            *state[:], _, stats = step(*state, jax.random.PRNGKey(first_key + i), rows, rows)
            jax.block_until_ready((state, stats))
            times.append(time.perf_counter() - start)
        return times

    advance(3, 0)
    blas = {}
    per_round = {name: [] for name in SETTINGS}
    for r in range(args.rounds):
        for name, setting in SETTINGS.items():
            with setting():
                blas[name] = sorted({lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                                     if lib["user_api"] == "blas"})
                times = advance(args.steps, 10 + r * args.steps)  # the same keys for both settings
            per_round[name].append(statistics.mean(times[1:]))
    seconds = {name: statistics.median(t) for name, t in per_round.items()}
    out = {
        "benchmark": "blas_threads",
        "command": "python experiments/blas_threads.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "jax": jax.__version__,
        "system": args.system, "preset": args.preset,
        "walkers": config.vmc.n_walkers, "mcmc_steps": config.vmc.mcmc_steps,
        "optimizer": config.vmc.optimizer, "inverse_update_period": config.kfac.inverse_update_period,
        "rounds": args.rounds, "steps_per_round": args.steps,
        "blas_threads": blas,
        "step_seconds": seconds,
        "round_seconds": per_round,
        "ratio": seconds["one_thread"] / seconds["as_started"],
    }
    print(json.dumps({k: out[k] for k in ("blas_threads", "step_seconds", "ratio")}, indent=1))
    label = [args.system, args.preset] if (args.system, args.preset) != ("LiH", "small") else []
    if args.inverse_update_period:
        label.append(f"period{args.inverse_update_period}")
    path = result_stem("blas_threads", "_".join(label), jax.default_backend())
    with open(path + ".json.tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".json.tmp", path + ".json")


if __name__ == "__main__":
    main()
