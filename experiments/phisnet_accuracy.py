"""Benchmark: PhiSNet accuracy on a molecule's reference data, next to the published numbers.

Trains (or resumes) a run with the paper's split (default 500 train / 500 validation / rest
test, seed 42) under a step or time budget, then evaluates the EMA parameters on the test split:
MAE of F and occupied orbital energies (micro-hartree), MAE of S, orbital cosine similarity.
Writes experiments/results/phisnet_accuracy_<molecule>[_<label>]_<platform>.json and, beside it,
the run's learning curve as .png.

    .venv/bin/python experiments/phisnet_accuracy.py --dataset runs/water/water_pbe_def2svp.h5 \
        --molecule water --preset small --batch-size 10 --time-budget 1800 --run-dir runs/water/small
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

from machine import machine_info, result_stem  # noqa: E402
from phisnet_jax import train as training  # noqa: E402
from phisnet_jax.data import SplitSpec, load_splits  # noqa: E402
from phisnet_jax.dataset import read_file_info, read_molecule  # noqa: E402
from phisnet_jax.evaluate import accuracy, load_trained_model  # noqa: E402
from phisnet_jax.model import MODEL_PRESETS, PhiSNetConfig  # noqa: E402

PAPER = {  # Unke et al. 2021, Table 1 (SchNOrb MD17 data, PBE/def2-SVP from ORCA)
    "water": {"fock_mae_uha": 15.67, "orbital_energy_mae_uha": 85.53, "orbital_cosine_similarity": 1.00},
    "ethanol": {"fock_mae_uha": 20.09, "orbital_energy_mae_uha": 102.04, "orbital_cosine_similarity": 0.9994},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--molecule", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--preset", default="small", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--label", help="Suffix of the result file.")
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--valid", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--validate-every", type=int, default=1000)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--time-budget", type=float, help="seconds of training in this call")
    args = parser.parse_args()

    info = read_file_info(args.dataset)
    group = read_molecule(args.dataset, args.molecule, fields=())
    cfg = PhiSNetConfig(elements=tuple(sorted({int(z) for z in group.atomic_numbers})),
                        basis=info.level.basis, **MODEL_PRESETS[args.preset])
    tcfg = training.TrainConfig(batch_size=args.batch_size, validate_every=args.validate_every)
    dcfg = training.DataConfig(os.path.abspath(args.dataset), (args.molecule,), args.train, args.valid)
    t0 = time.perf_counter()
    result = training.train(args.run_dir, cfg, tcfg, dcfg, max_steps=args.steps, time_budget=args.time_budget)
    seconds = time.perf_counter() - t0
    trained = load_trained_model(args.run_dir)
    test = load_splits(args.dataset, [args.molecule], cfg, SplitSpec(args.train, args.valid))["test"]
    metrics = accuracy(trained, test)
    print(json.dumps(metrics))
    out = {
        "benchmark": f"PhiSNet accuracy on {args.molecule} ({info.level.method}/{info.level.basis})",
        "command": "python experiments/phisnet_accuracy.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(), "jax": jax.__version__,
        "model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg),
        "split": {"train": args.train, "valid": args.valid, "test": len(test), "seed": 42},
        "steps": result.steps, "stopped_because": result.stopped_because,
        "training_seconds_this_call": seconds, "learning_rate": result.learning_rate,
        "test": metrics, "paper": PAPER.get(args.molecule),
        "note": "the paper's data are SchNOrb MD17 (ORCA, molecular dynamics); ours are pyscf PBE/def2-SVP "
                "at harmonic 500 K normal-mode geometries, so the numbers compare methods, not identical data",
    }
    platform = jax.devices()[0].platform
    stem = result_stem(f"phisnet_accuracy_{args.molecule}", args.label, platform)
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=2)
    shutil.copyfile(os.path.join(args.run_dir, "learning_curve.png"), stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
