"""Experiment: a base model pretrained over a set of systems, fine-tuned on a new (larger)
system, against training the same network from scratch on it.

1. Base model: ``vmc pretrain`` on --base (HF fit, then shared VMC), resumable.
2. Fine-tuned: every weight of the base reused, VMC on --target (no HF fit).
3. From scratch: the same network and settings on --target, HF fit then VMC.
Both target runs are evaluated with fresh walkers (blocking error bars) at every step count of
--eval-at (0: the zero-shot base model, and the scratch model after the HF fit only).
Writes experiments/results/finetuning_<name>_<platform>.json and a PNG of energy vs steps;
with --reference, a pyscf CCSD(T) energy of the target in a large basis is added.

    .venv/bin/python experiments/finetuning.py --name h6_to_h10 --base hchains:6@1.6,1.8,2.0,2.2 \
        --target H10 --base-steps 2000 --eval-at 0 100 250 500 1000 --reference cc-pvtz
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from machine import machine_info  # noqa: E402
from molfoundation import runs  # noqa: E402
from vmc import evaluate, train  # noqa: E402
from vmc.config import PRESET_NAMES, ScheduleConfig, SystemsConfig, finetuning_config, preset_config  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def command_line(argv) -> str:
    """The command that made a result, without the output locations (--runs, --results)."""
    kept, skip = [os.path.join("experiments", os.path.basename(argv[0]))], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg in ("--runs", "--results"):
            skip = True
        else:
            kept.append(arg)
    return "python " + " ".join(kept)


def ccsd_t_energy(system, basis: str) -> float:
    """pyscf CCSD(T) total energy of ``system`` in ``basis``, hartree."""
    from pyscf import cc, scf

    mol = system.to_pyscf(basis)
    mf = (scf.RHF(mol) if system.spin == 0 else scf.ROHF(mol)).run(conv_tol=1e-10)
    solver = cc.CCSD(mf).run(conv_tol=1e-8)
    return float(solver.e_tot + solver.ccsd_t())


def curve(run_dir, config, eval_at, eval_steps, eval_walkers=None):
    """Training ``run_dir`` up to each step count of ``eval_at`` and evaluating it there: a list
    of {steps, energy, error, variance, systems} with the mean over the run's systems (and its
    error) and each system's own energy and error."""
    points = []
    for steps in eval_at:
        train.train(run_dir, config, max_steps=steps, progress=False)
        results = evaluate.evaluate_run(run_dir, n_steps=eval_steps, n_walkers=eval_walkers, progress=False).systems
        energy = float(np.mean([r.energy for r in results]))
        error = float(np.sqrt(np.sum([r.error**2 for r in results])) / len(results))
        points.append({"steps": steps, "energy": energy, "error": error,
                       "variance": float(np.mean([r.variance for r in results])),
                       "systems": {r.name: {"energy": r.energy, "error": r.error} for r in results}})
        print(f"  {os.path.basename(run_dir)} step {steps}: {energy:.5f} +- {error:.5f}", flush=True)
    return points


def plot(path, record):
    fig, ax = runs.figure()
    # The axis covers the trained points (step > 0) and the reference; starting points far
    # above (a zero-shot model, say) are written at the top edge instead.
    trained = [p["energy"] for points in record["curves"].values() for p in points if p["steps"] > 0]
    if record.get("reference"):
        trained.append(record["reference"]["energy"])
    low, high = min(trained), max(trained)
    margin = 0.15 * (high - low) + 1e-3
    top = high + margin
    for k, (label, points) in enumerate(record["curves"].items()):
        steps = np.maximum(np.array([p["steps"] for p in points], float), 1)
        energy = np.array([p["energy"] for p in points])
        off_scale = energy > top
        error = np.where(off_scale, 0.0, [p["error"] for p in points])
        line = ax.errorbar(steps, np.minimum(energy, top), error, marker="o", capsize=3, label=label)
        for x, e in zip(steps[off_scale], energy[off_scale]):
            ax.annotate(f"{label} {e:.3f} (off scale)", (x, top), xytext=(6, -12 * (k + 1)),
                        textcoords="offset points", fontsize="small", color=line.lines[0].get_color())
    if record.get("reference"):
        ax.axhline(record["reference"]["energy"], color="k", ls="--", lw=1,
                   label=f"CCSD(T)/{record['reference']['basis']}")
    ax.set_ylim(low - margin, top + 0.02 * margin)
    ax.set_xscale("log")
    ax.set_xlabel("VMC steps on the target (0 plotted at 1)")
    ax.set_ylabel(f"energy of {record['target']} (hartree)")
    ax.legend()
    runs.save_figure(fig, path)


def write_result(results_dir: str, name: str, record: dict) -> None:
    """``<name>_<platform>.json`` and its PNG in ``results_dir``; the curves printed."""
    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, f"{name}_{jax.devices()[0].platform}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
    plot(stem + ".png", record)
    print(f"wrote {stem}.json")
    width = max(len(label) for label in record["curves"])
    for label, points in record["curves"].items():
        print(f"{label:>{width}}: " + "  ".join(f"{p['steps']}: {p['energy']:.4f}({1e4 * p['error']:.0f})"
                                               for p in points))


def replot(json_path: str) -> None:
    """Redraw the PNG of a result JSON."""
    with open(json_path) as f:
        plot(json_path[: -len(".json")] + ".png", json.load(f))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="Name of the result files.")
    parser.add_argument("--base", required=True, help="System set of the base model.")
    parser.add_argument("--target", required=True, help="System (or set) to fine-tune on.")
    parser.add_argument("--preset", default="small", choices=PRESET_NAMES)
    parser.add_argument("--walkers", type=int, help="Walkers per geometry [the preset's].")
    parser.add_argument("--geometries-per-step", type=int, default=1)
    parser.add_argument("--min-visit-share", type=float, default=ScheduleConfig.min_visit_share,
                        help="Base model's schedule: see vmc.config.ScheduleConfig (0: spread alone).")
    parser.add_argument("--base-steps", type=int, default=1000)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[0, 50, 100, 200])
    parser.add_argument("--eval-steps", type=int, default=200)
    parser.add_argument("--eval-walkers", type=int)
    parser.add_argument("--reference", metavar="BASIS", help="Add a CCSD(T) reference in this basis.")
    parser.add_argument("--runs", default="runs/finetuning")
    parser.add_argument("--results", default=RESULTS, help="Where the JSON and PNG go.")
    parser.add_argument("--fresh", action="store_true", help="Delete earlier runs of this name first.")
    args = parser.parse_args()

    root = os.path.join(args.runs, args.name)
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
    sampling = {} if args.walkers is None else {"n_walkers": args.walkers}
    schedule = ScheduleConfig(args.geometries_per_step, min_visit_share=args.min_visit_share)
    base_config = preset_config(args.preset, SystemsConfig(args.base), schedule, **sampling)
    started = time.perf_counter()
    base_dir = os.path.join(root, "base")
    print(f"base model on {args.base}: {args.base_steps} steps", flush=True)
    base = train.train(base_dir, base_config, max_steps=args.base_steps)
    base_seconds = time.perf_counter() - started

    finetune_config = finetuning_config(base_dir, args.target)
    scratch_config = dataclasses.replace(base_config, systems=SystemsConfig(args.target))
    eval_at = sorted(set(args.eval_at))
    curves, seconds = {}, {}
    for label, config in (("fine-tuned", finetune_config), ("from scratch", scratch_config)):
        t = time.perf_counter()
        run_dir = os.path.join(root, label.replace(" ", "_").replace("-", "_"))
        curves[label] = curve(run_dir, config, eval_at, args.eval_steps, args.eval_walkers)
        seconds[label] = time.perf_counter() - t

    record = {
        "experiment": "fine-tuning a base model vs training from scratch",
        "command": command_line(sys.argv),
        "base": {"systems": args.base, "steps": base.steps, "hf_fit_steps": base.hf_fit_steps,
                 "final_energies": base.energies, "seconds": base_seconds},
        "target": args.target,
        "config": base_config.to_record(),
        "eval": {"steps": args.eval_steps, "walkers": args.eval_walkers or base_config.vmc.n_walkers},
        "curves": curves,
        "seconds": seconds,
        "machine": machine_info(),
    }
    if args.reference:
        system = SystemsConfig(args.target).load()[0]
        record["reference"] = {"method": "CCSD(T)", "basis": args.reference,
                               "energy": ccsd_t_energy(system, args.reference)}
    write_result(args.results, f"finetuning_{args.name}", record)


if __name__ == "__main__":
    main()
