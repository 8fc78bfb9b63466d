"""The VMC benchmark the peer scripts share: the systems and sampling settings, this project's
run of it in a measured process, and the figures taken from a run.

Every code trains one of SYSTEMS, at the geometry of ``vmc.systems.from_name`` (LiH at R =
3.015 bohr, 2 + 2 electrons; H2O at its experimental geometry, 5 + 5 electrons), with 256
walkers, 10 Metropolis steps per update, 100 steps of supervised pretraining towards
Hartree-Fock (STO-6G), 20 burn-in MCMC calls, KFAC and the forward Laplacian (folx). A measured
run returns ``step_times`` (Unix seconds at which each training step was logged),
``parameters``, ``settings`` and, filled in by the process, ``compile_seconds`` (see
:func:`record_compile_time`) and ``trained``.
"""

import json
import statistics
import sys
import time

from harness import launch

SYSTEMS = ("LiH", "H2O")
PRETRAIN_STEPS = 100
BURN_IN_CALLS = 20
WALKERS = 256
MCMC_STEPS = 10


def benchmark_system(name: str):
    """The :class:`vmc.systems.System` of the benchmark ``name`` (one of SYSTEMS)."""
    from vmc import systems

    return systems.from_name(name)


def exact_energy(name: str) -> float | None:
    """The exact energy (hartree) of the benchmark system ``name``, where the literature has one
    at its geometry (vmc.references), else None."""
    from vmc import references

    return references.exact_energy(benchmark_system(name))


def system_record(name: str) -> dict:
    """The benchmark's settings, as result files record them."""
    system = benchmark_system(name)
    return {"name": name, "atomic_numbers": system.atomic_numbers.tolist(),
            "positions_bohr": system.positions.tolist(), "electrons": [system.n_up, system.n_down],
            "walkers": WALKERS, "mcmc_steps": MCMC_STEPS,
            "pretrain_steps": PRETRAIN_STEPS, "burn_in_calls": BURN_IN_CALLS, "optimizer": "kfac",
            "laplacian": "folx"}


def add_arguments(sub, mode: str, systems: tuple[str, ...] = SYSTEMS) -> None:
    """The command-line options every comparison takes: the system (one of ``systems``), this
    project's preset and settings, the steps left out of the step time, and the mode's run
    lengths."""
    sub.add_argument("--system", choices=systems, default=systems[0])
    sub.add_argument("--ours-preset", default="small")
    sub.add_argument("--set", dest="ours_settings", action="append", default=[], metavar="KEY=VALUE",
                     help="a setting of this project's run (as vmc train --set), repeatable")
    sub.add_argument("--skip", type=int, default=50, help="first steps left out of the step time")
    if mode == "speed":
        sub.add_argument("--steps", type=int, default=600, help="training steps of every run")
        sub.add_argument("--repeats", type=int, default=2, help="runs of each code, alternating")
    else:
        sub.add_argument("--seconds", type=float, default=360.0, help="wall-clock budget of each training")
        sub.add_argument("--eval-steps", type=int, default=2000, help="MCMC calls of each evaluation")


def record_compile_time() -> dict:
    """Sums of JAX's compile events (seconds) in this process, filled in as they happen."""
    import jax.monitoring

    totals = {"trace": 0.0, "lower": 0.0, "backend_compile": 0.0}
    names = {"/jax/core/compile/jaxpr_trace_duration": "trace",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
             "/jax/core/compile/backend_compile_duration": "backend_compile"}

    def listen(event, duration, **_):
        if event in names:
            totals[names[event]] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    return totals


def ours_train(run_dir: str, job: dict) -> dict:
    """``vmc train`` of the job's system in this process; its steps' times and energies, and its
    settings."""
    import jax

    from vmc import cli, config, train

    limit = (["--steps", str(job["steps"])] if job["budget"] is None else
             ["--steps", "100000000", "--time-budget", str(job["budget"] - (time.time() - job["launched"]))])
    args = ["train", job["system"], "--run-dir", run_dir, "--preset", job["ours_preset"],
            "--hf-fit-steps", str(PRETRAIN_STEPS), *limit, "--set", f"burn_in_sweeps={BURN_IN_CALLS}",
            "--set", f"n_walkers={WALKERS}", "--set", f"mcmc_steps={MCMC_STEPS}",
            "--set", "optimizer=kfac", "--set", "laplacian=folx",
            *[item for setting in job["ours_settings"] for item in ("--set", setting)]]
    try:
        cli.main(args)
    except SystemExit as exit_:
        if exit_.code:
            raise
    entries = config.run_directory(run_dir).read_log("vmc")
    cfg = config.load_config(run_dir)
    shapes = train.param_shapes(cfg.ansatz, cfg.vmc.float64)
    return {"step_times": [e["time"] for e in entries], "energies": [e["energy"][0] for e in entries],
            "parameters": int(sum(x.size for x in jax.tree.leaves(shapes))),
            "settings": {"command": "vmc " + " ".join("RUN" if a == run_dir else a for a in args),
                         "config": cfg.to_record()}}


def ours_evaluate(run_dir: str, eval_steps: int) -> dict:
    from vmc import evaluate

    result = evaluate.evaluate_run(run_dir, None, 0, n_steps=eval_steps, n_walkers=WALKERS,
                                   burn_in_sweeps=None, seed=1, step=None)
    system = result.systems[0]
    return {"energy": system.energy, "error": system.error, "burn_in_calls": result.burn_in_sweeps,
            "nonfinite": system.n_nonfinite, "nonfinite_unit": "walker energies"}


def finite_mean(values) -> float:
    """The mean of the finite ones of ``values``; NaN where none is finite."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def training_energies(energies: list) -> dict:
    """What a training's logged step energies say: the mean of the finite ones among the last
    10 % of steps (``final_train_energy``, hartree) and how many steps logged a non-finite one
    (``train_nonfinite_steps``: a training that lost its parameters shows here)."""
    import numpy as np

    energies = np.asarray(energies, dtype=np.float64)
    return {"final_train_energy": finite_mean(energies[-max(1, len(energies) // 10):]),
            "train_nonfinite_steps": int((~np.isfinite(energies)).sum())}


def summarise(raw: dict, skip: int) -> dict:
    """A run's figures: seconds per step from step ``skip`` on, start-up (process start to the
    first step), compile and trace seconds, parameters and settings."""
    times = raw["step_times"]
    return {
        "steps": len(times),
        "step_seconds": (times[-1] - times[skip]) / (len(times) - 1 - skip),
        "startup_seconds": times[0] - raw["launched"],
        "train_seconds": raw["trained"] - raw["launched"],
        "compile_seconds": raw["compile_seconds"]["lower"] + raw["compile_seconds"]["backend_compile"],
        "trace_seconds": raw["compile_seconds"]["trace"],
        "parameters": raw["parameters"],
        "settings": raw["settings"],
    }


def compare_speed(script: str, job: dict, peer: str, repeats: int, skip: int, peer_python: str = sys.executable) -> dict:
    """``repeats`` runs of ``job`` by each code (the peer first, then this project, alternating;
    the peer's processes started by ``peer_python``): each code's medians (``ours``, ``<peer>``),
    the ratios ours / peer of the step, start-up and compile seconds, and every run."""
    runs = {peer: [], "ours": []}
    for repeat in range(repeats):
        for code in runs:
            python = peer_python if code == peer else sys.executable
            row = summarise(launch(script, dict(job, code=code), python), skip)
            runs[code].append(row)
            print(json.dumps({"code": code, "repeat": repeat, **{k: v for k, v in row.items() if k != "settings"}}),
                  flush=True)
    summary = {code: {key: statistics.median(r[key] for r in rows)
                      for key in ("step_seconds", "startup_seconds", "compile_seconds", "trace_seconds")}
               | {"parameters": rows[0]["parameters"], "settings": rows[0]["settings"]}
               for code, rows in runs.items()}
    ours, theirs = summary["ours"], summary[peer]
    return {
        "steps": job["steps"], "step_time_skips": skip, "ours": ours, peer: theirs,
        "step_ratio": ours["step_seconds"] / theirs["step_seconds"],
        "startup_ratio": ours["startup_seconds"] / theirs["startup_seconds"],
        "compile_ratio": ours["compile_seconds"] / theirs["compile_seconds"],
        "runs": {code: [{k: v for k, v in r.items() if k != "settings"} for r in rows] for code, rows in runs.items()},
    }
