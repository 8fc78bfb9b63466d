"""Benchmark: this project's VMC against FermiNet, on the same machine, in the same run.

Both codes train a system of experiments/peers/vmc_benchmark.py (--system: LiH at R = 3.015
bohr, the default, or H2O) with 256 walkers, 10 Metropolis steps per update, 100 steps of
supervised pretraining towards Hartree-Fock (STO-6G), 20 burn-in MCMC calls, KFAC and the
forward Laplacian (folx), each with its own recommended KFAC settings:
FermiNet with hidden (64, 16) x 2 and 4 determinants (--ferminet-network), this project with its
``small`` preset (--ours-preset, and --set for any of its settings). Every run is a fresh
process (nothing compiled is shared between runs), the codes alternating. Time is read from
stamps each code takes as it logs a step (this project: the ``time`` of its log lines;
FermiNet: the writer its ``train.train`` takes).

``speed`` (experiments/results/peer_ferminet[_<label>]_<platform>.json), --repeats runs of --steps steps:

- ``step_seconds``: wall-clock seconds per training step from step --skip to the last,
  everything the training loop does included (sampling, the update, logging, checkpoints);
- ``startup_seconds``: from the process's start to its first training step logged (imports,
  Hartree-Fock, compilation, pretraining, burn-in, and the first step);
- ``compile_seconds``: lowering and XLA compilation summed over the run (JAX's monitoring
  events; tracing is reported apart as ``trace_seconds``, where nested traces count again).
  A sum over threads: this project compiles its VMC update alongside the HF fit, and two
  compilations sharing the cores each take longer, so it can exceed the start-up's share;
- ``parameters``: each network's parameter count;
- ``step_ratio``, ``startup_ratio``, ``compile_ratio``: ours / FermiNet, of the medians.

``budget`` (experiments/results/budget_<system>[_<label>]_<platform>.json, e.g. budget_lih_cpu.json):
each code trains for --seconds of wall-clock time from its process's start (start-up included),
then its final parameters are evaluated with --eval-steps MCMC calls of 256 walkers (this
project: ``vmc evaluate``, fresh walkers after 200 calls of burn-in on the HF density and 200
under the network; FermiNet: its inference mode, from the training's last walkers); both
energies (``energy``, ``energy_error``) get the same blocking error bar (vmc.evaluate.blocking_error). Where the system has an exact energy
(LiH: -8.070548 Ha) they are compared with it: ``ours.error_mha``, ``ferminet.error_mha``;
``energy_difference_mha`` is ours minus FermiNet's (negative: ours lower, better by the
variational principle), ``difference_error_mha`` its error bar. Each code's row also gives
``eval_nonfinite`` (local energies left out of its evaluation: walker energies for this
project, whole steps for FermiNet, which logs step means only), ``final_train_energy`` (the
mean logged energy of the last 10 % of training steps) and ``train_nonfinite_steps``.

The peer is not part of this repository. FermiNet's main branch calls kfac-jax as it is
released (0.0.8), which runs on JAX up to 0.9.1, so both codes run in an environment of this
project's oldest supported JAX (requirements/oldest-jax.txt) with FermiNet's own few extras:

    git clone https://github.com/google-deepmind/ferminet PEER    # measured at 0ce3411
    python3.11 -m venv .venv-peers
    .venv-peers/bin/python requirements/override.py requirements/oldest-jax.txt > .venv-peers/req.txt
    .venv-peers/bin/pip install -r .venv-peers/req.txt ml-collections pandas pyblock absl-py
    .venv-peers/bin/pip install --no-deps -e .
    .venv-peers/bin/python experiments/peers/ferminet.py speed --ferminet PEER
    .venv-peers/bin/python experiments/peers/ferminet.py budget --ferminet PEER --seconds 360
    .venv-peers/bin/python experiments/peers/ferminet.py budget --ferminet PEER --system H2O --seconds 1200

This project's training keeps the BLAS libraries on one thread (molfoundation.blas_threads);
FermiNet's does not, and its KFAC inverses are slowed by OpenBLAS threads competing with XLA's.
The same limit for both codes: ``OPENBLAS_NUM_THREADS=1`` in the environment, e.g. ``speed
--label one_blas_thread``; every result file records the thread settings it ran with
(``environment``).
"""

import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import harness  # noqa: E402
from harness import launch, mode_parsers, run_child, write_result  # noqa: E402
from vmc_benchmark import (BURN_IN_CALLS, MCMC_STEPS, PRETRAIN_STEPS, WALKERS, add_arguments,  # noqa: E402
                           benchmark_system, compare_speed, exact_energy, ours_evaluate, ours_train,
                           finite_mean, record_compile_time, summarise, system_record, training_energies)

CODES = ("ferminet", "ours")


# ----------------------------------------------------------------------------------------------
# Inside one measured process.


def ferminet_config(job: dict, save_path: str):
    from ferminet import base_config
    from ferminet.utils import system

    cfg = base_config.default()
    molecule = benchmark_system(job["system"])
    cfg.system.molecule = [system.Atom(symbol, tuple(position), units="bohr")
                           for symbol, position in zip(molecule.symbols, molecule.positions.tolist())]
    cfg.system.electrons = (molecule.n_up, molecule.n_down)
    cfg.batch_size = WALKERS
    cfg.mcmc.steps = MCMC_STEPS
    cfg.mcmc.burn_in = BURN_IN_CALLS
    cfg.pretrain.iterations = PRETRAIN_STEPS
    cfg.pretrain.basis = "sto-6g"
    cfg.optim.iterations = job["steps"] if job["budget"] is None else 10**8
    cfg.optim.optimizer = "kfac"
    cfg.optim.laplacian = "folx"
    layers, single, pair, determinants = job["ferminet_network"]
    cfg.network.ferminet.hidden_dims = ((single, pair),) * layers
    cfg.network.determinants = determinants
    cfg.log.save_path = save_path
    if job["budget"] is not None:
        cfg.log.save_frequency = 10.0**6  # minutes: the one checkpoint is the budget's (below)
    cfg.debug.deterministic = True
    return base_config.resolve(cfg)


class BudgetSpent(Exception):
    """Raised once FermiNet has saved its checkpoint at the end of the time budget."""


def ferminet_run(cfg, on_step=None) -> tuple[list, list]:
    """``train.train(cfg)`` with a writer that stamps every step; (times, energies)."""
    from ferminet import train

    times, energies = [], []

    class TimedWriter:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, t, **data):
            times.append(time.time())
            energies.append(float(data["energy"]))
            if on_step is not None:
                on_step()

        def flush(self):
            pass

    try:
        train.train(cfg, writer_manager=TimedWriter())
    except BudgetSpent:
        pass
    return times, energies


def ferminet_train(save_path: str, job: dict) -> dict:
    sys.path.insert(0, job["ferminet"])
    import jax
    from ferminet import checkpoint, networks

    cfg = ferminet_config(job, save_path)
    # At the first step past the budget the training loop's own checkpoint test (which reads
    # the setting every step) saves, and the run ends right after that save.
    original_save = checkpoint.save

    def save_then_stop(*args, **kwargs):
        written = original_save(*args, **kwargs)
        raise BudgetSpent(written)

    def stop_at_budget():
        if time.time() - job["launched"] >= job["budget"]:
            cfg.log.save_frequency = 0.0
            checkpoint.save = save_then_stop

    times, energies = ferminet_run(cfg, None if job["budget"] is None else stop_at_budget)
    determinants = job["ferminet_network"][3]
    net = networks.make_fermi_net(cfg.system.electrons, benchmark_system(job["system"]).charges, ndim=3,
                                  determinants=determinants, full_det=cfg.network.full_det,
                                  **cfg.network.ferminet)
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0))
    return {"step_times": times, "energies": energies,
            "parameters": int(sum(x.size for x in jax.tree.leaves(shapes))),
            "settings": {"hidden_dims": [list(h) for h in cfg.network.ferminet.hidden_dims],
                         "determinants": determinants, "full_det": bool(cfg.network.full_det),
                         "kfac": dict(cfg.optim.kfac), "lr": dict(cfg.optim.lr)}}


def ferminet_evaluate(save_path: str, job: dict) -> dict:
    """FermiNet's inference mode from the training's last checkpoint (its walkers included).
    FermiNet logs each step's mean local energy only, so a step with one non-finite local
    energy is left out whole (``nonfinite``: such steps; this project's evaluation leaves out
    single walkers instead)."""
    import numpy as np

    from vmc.evaluate import blocking_error

    cfg = ferminet_config(dict(job, budget=None, steps=job["eval_steps"]), os.path.join(save_path, "inference"))
    cfg.optim.optimizer = "none"
    cfg.log.restore_path = save_path
    _, energies = ferminet_run(cfg)
    energies = np.asarray(energies)
    finite = energies[np.isfinite(energies)]
    return {"energy": finite_mean(finite), "error": blocking_error(finite),
            "burn_in_calls": 0, "nonfinite": int(energies.size - finite.size), "nonfinite_unit": "steps"}


def child(job: dict, out_path: str) -> None:
    compile_seconds = record_compile_time()
    work = os.path.dirname(out_path)
    place = os.path.join(work, "run")
    out = (ours_train if job["code"] == "ours" else ferminet_train)(place, job)
    out.update(trained=time.time(), compile_seconds=compile_seconds)
    if job["budget"] is not None:
        out["evaluation"] = (ours_evaluate(place, job["eval_steps"]) if job["code"] == "ours"
                             else ferminet_evaluate(place, job))
    with open(out_path, "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------------------------
# The harness.


def header(args, benchmark: str) -> dict:
    return harness.header(__file__, benchmark, args.ferminet, ("jax", "jaxlib", "kfac-jax", "folx", "flax", "optax")) | {
        "system": system_record(args.system)}


def speed(args, job: dict) -> None:
    out = header(args, "peer_ferminet") | compare_speed(__file__, job, "ferminet", args.repeats, args.skip)
    write_result("peer_ferminet", args.label, out)
    print(json.dumps({k: out[k] for k in ("step_ratio", "startup_ratio", "compile_ratio")}))


def budget(args, job: dict) -> None:
    exact = exact_energy(args.system)
    results = {}
    for code in CODES:
        raw = launch(__file__, dict(job, code=code, budget=args.seconds, eval_steps=args.eval_steps))
        row = summarise(raw, min(args.skip, len(raw["step_times"]) - 2))
        evaluation = raw["evaluation"]
        row.update(energy=evaluation["energy"], energy_error=evaluation["error"],
                   eval_burn_in_calls=evaluation["burn_in_calls"],
                   eval_nonfinite=evaluation["nonfinite"], eval_nonfinite_unit=evaluation["nonfinite_unit"],
                   **training_energies(raw["energies"]))
        if exact is not None:
            row.update(error_mha=1000 * (evaluation["energy"] - exact), error_bar_mha=1000 * evaluation["error"])
        results[code] = row
        print(json.dumps({"code": code, **{k: v for k, v in row.items() if k != "settings"}}), flush=True)
    ours, theirs = results["ours"], results["ferminet"]
    name = f"budget_{args.system.lower()}"
    out = header(args, name) | {
        "budget_seconds": args.seconds, "eval_steps": args.eval_steps, "eval_walkers": WALKERS,
        "exact_energy": exact, "ours": ours, "ferminet": theirs,
        "energy_difference_mha": 1000 * (ours["energy"] - theirs["energy"]),
        "difference_error_mha": 1000 * math.hypot(ours["energy_error"], theirs["energy_error"]),
    }
    write_result(name, args.label, out)


def main():
    if run_child(child):
        return
    parser, subs = mode_parsers(__doc__.splitlines()[0], "ferminet",
                                "path of FermiNet's source (the directory with setup.py)")
    for mode, sub in subs.items():
        add_arguments(sub, mode)
        sub.add_argument("--ferminet-network", type=int, nargs=4, default=[2, 64, 16, 4],
                         metavar=("LAYERS", "SINGLE", "PAIR", "DETERMINANTS"))
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.ferminet, "ferminet", "train.py")):
        parser.error(f"{args.ferminet} holds no FermiNet source (ferminet/train.py)")
    job = {"ferminet": os.path.abspath(args.ferminet), "system": args.system, "ours_preset": args.ours_preset,
           "ours_settings": args.ours_settings, "ferminet_network": args.ferminet_network,
           "steps": getattr(args, "steps", None), "budget": None}
    if args.mode == "speed":
        if not 0 <= args.skip < args.steps - 1:
            parser.error("--skip must be below --steps - 1")
        speed(args, job)
    else:
        budget(args, job)


if __name__ == "__main__":
    main()
