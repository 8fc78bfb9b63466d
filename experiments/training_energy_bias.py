"""Accuracy check: the energies a VMC run logs while it trains against its final network's energy.

A training step logs the mean local energy of walkers that the parameters of that very step
were fitted to (the walkers move only --mcmc-steps Metropolis steps between updates, so
successive steps see nearly the same configurations), which can make the logged energies run
below the trained network's own energy. This trains a system (``vmc train`` with the settings
of the FermiNet benchmark, experiments/peers/ferminet.py: small preset, 256 walkers, 10
Metropolis steps, 100 HF-fit steps, 20 burn-in calls, KFAC, folx) for --steps steps in
--run-dir (resumed or reused if it holds the run already), then samples the final parameters,
fixed, for --calls MCMC calls twice: from the walkers of the run's last checkpoint, and from
fresh walkers after --hf-calls calls on the HF density (as ``vmc evaluate`` starts). Each
series' mean leaves out its first fifth; error bars are blocking errors
(vmc.evaluate.blocking_error), also of the logged training energies.

--set changes a setting of the training run (e.g. ``mcmc_steps=20``; name the result with
--label). Writes experiments/results/training_energy_bias_<system>[_<label>]_<platform>.json:
``training`` (the logged energies of the last 10 % and the last half of the steps),
``from_training_walkers``, ``from_fresh_walkers`` (``energy``, ``energy_error``, means of blocks
of 100 calls), and ``bias_mha``: last 10 % of training minus the energy from the training's
walkers, with ``bias_error_mha``.

    .venv/bin/python experiments/training_energy_bias.py --system H2O --steps 4246 --run-dir RUN
"""

import argparse
import json
from importlib import metadata
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from machine import machine_info, result_stem  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ["burn_in_sweeps=20", "n_walkers=256", "mcmc_steps=10", "optimizer=kfac", "laplacian=folx"]


def train(system: str, run_dir: str, steps: int, settings: list[str]) -> list[str]:
    """Trains (or resumes) the run with :data:`SETTINGS`, ``settings`` (KEY=VALUE) overriding
    them; returns its command line."""
    args = [system, "--run-dir", run_dir, "--preset", "small", "--hf-fit-steps", "100", "--steps", str(steps)]
    merged = dict(setting.split("=", 1) for setting in SETTINGS)
    merged.update(setting.split("=", 1) for setting in settings)
    for key, value in merged.items():
        args += ["--set", f"{key}={value}"]
    subprocess.run([sys.executable, "-m", "vmc", "train", *args], cwd=ROOT, check=True)
    return ["vmc", "train", *args]


def summary(energies: np.ndarray) -> dict:
    from vmc.evaluate import blocking_error

    return {"energy": float(energies.mean()), "energy_error": blocking_error(energies), "calls": len(energies)}


def sample_series(problem, group, params, sampler, key, n_calls: int) -> np.ndarray:
    """Mean local energy (hartree) of the first geometry after each of ``n_calls`` MCMC calls."""
    from vmc.geometries import GeometryBatch
    from vmc.train import _rows

    sample, rows = problem.sampler(group), _rows(np.arange(group.size))
    means = []
    for k in jax.random.split(key, n_calls):
        sampler, _, _ = sample(params, sampler, rows, k)
        energies = np.asarray(problem.local_energy(params, GeometryBatch(sampler.walkers, group.geometries)),
                              np.float64)[0]
        means.append(np.nanmean(energies))
    return np.asarray(means)


def measure(run_dir: str, n_calls: int, hf_calls: int) -> dict:
    from molfoundation import checkpoints, runs
    from vmc import config, evaluate
    from vmc.train import Problem, run_systems

    cfg = config.load_config(run_dir)
    run = config.run_directory(run_dir)
    logged = np.array([e["energy"][0] for e in run.read_log("vmc")], np.float64)
    _, params, _ = evaluate.load_model(run_dir)
    step = run.latest_step("vmc")
    stored = checkpoints.restore_raw(run.checkpoint_dir("vmc"), step)["samplers"]["0"]
    skip = n_calls // 5
    result = {"steps": int(step), "training": {
        "last_10_percent": summary(logged[-max(1, len(logged) // 10):]),
        "last_half": summary(logged[len(logged) // 2:])}}
    with runs.precision(cfg.vmc.float64):
        problem = Problem.build(cfg, run_systems(run_dir, cfg), progress=False)
        group = problem.groups[0]
        trained = problem.init_sampler(group, params, jnp.asarray(stored["walkers"])).replace(
            step_size=jnp.asarray(stored["step_size"], runs.float_dtype(cfg.vmc.float64)))
        fresh = problem.fresh_sampler(group, params, jax.random.PRNGKey(1), hf_calls)
        for name, sampler, key in (("from_training_walkers", trained, 3), ("from_fresh_walkers", fresh, 4)):
            series = sample_series(problem, group, params, sampler, jax.random.PRNGKey(key), n_calls)
            result[name] = {**summary(series[skip:]),
                            "blocks_of_100": [float(series[i:i + 100].mean()) for i in range(0, n_calls, 100)]}
            print(name, json.dumps(result[name]), flush=True)
    train_10, walkers = result["training"]["last_10_percent"], result["from_training_walkers"]
    result["bias_mha"] = 1000 * (train_10["energy"] - walkers["energy"])
    result["bias_error_mha"] = 1000 * float(np.hypot(train_10["energy_error"], walkers["energy_error"]))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="H2O")
    parser.add_argument("--steps", type=int, default=4246)
    parser.add_argument("--run-dir", help="the run's directory (kept; default: a temporary one)")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--hf-calls", type=int, default=200)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a further setting of the training run (as vmc train --set), repeatable")
    parser.add_argument("--label", help="result file label")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = args.run_dir or os.path.join(scratch, "run")
        training_command = train(args.system, run_dir, args.steps, args.settings)
        result = measure(run_dir, args.calls, args.hf_calls)
    command = ["python", "experiments/training_energy_bias.py", "--system", args.system, "--steps", str(args.steps),
               "--calls", str(args.calls), "--hf-calls", str(args.hf_calls),
               *[item for setting in args.settings for item in ("--set", setting)],
               *(["--label", args.label] if args.label else [])]
    result = {"benchmark": "training_energy_bias", "command": " ".join(command), "machine": machine_info(),
              "versions": {name: metadata.version(name) for name in ("jax", "jaxlib", "kfac-jax", "folx")},
              "system": args.system,
              "training_command": " ".join(training_command).replace(run_dir, "RUN"), **result}
    path = result_stem(f"training_energy_bias_{args.system.lower()}", args.label, jax.default_backend()) + ".json"
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("training", "bias_mha", "bias_error_mha")}, indent=1))
    print("wrote", os.path.relpath(path, ROOT))


if __name__ == "__main__":
    main()
