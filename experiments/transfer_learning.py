"""Experiment: PhiSNet transfer learning from Hartree-Fock to CCSD(T) on water (the PhiSNet idea).

1. Data: ``phisnet generate water --method hf --basis def2-svp --ccsd-t -n SAMPLES`` (run by this
   script): HF F, S and H_core, HF energies and forces, CCSD(T) energies and forces per geometry.
2. HF model: the small preset with the core-Hamiltonian head, trained on HF F, S and H_core
   (split train / valid / test, seed 42) for a fixed training-time budget.
3. Fine-tuned model: the HF model's EMA parameters, trained with a fresh optimiser on the CCSD(T)
   energies and forces of only the first --finetune-train geometries of the HF training split
   (the same seed-42 permutation, so a subset of it), for a fixed training-time budget.
4. On the HF run's test geometries (never trained on): energy MAE (hartree and kcal/mol) and force
   MAE (hartree/bohr) against CCSD(T) for plain HF (the dataset's HF energies and forces), the HF
   model and the fine-tuned model. Energies are reported raw and after subtracting each method's
   mean error over the fine-tuning geometries (the only CCSD(T) labels the method may use); the
   HF-CCSD(T) difference is dominated by a nearly constant correlation energy.

Writes experiments/results/transfer_learning_<molecule>[_<label>]_<platform>.json and .png. Re-running the
same command continues an interrupted generation or training (budgets count training seconds,
compilation included, summed over calls from the runs' logs) and, once both budgets are spent,
only evaluates again.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/transfer_learning.py --samples 400 \
        --hf-budget 1200 --finetune-budget 600
"""

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
# Executables loaded from the compilation cache make XLA's C++ logger warn at length.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from machine import machine_info, result_stem  # noqa: E402
from phisnet_jax import train as training  # noqa: E402
from phisnet_jax.data import SplitSpec, load_splits  # noqa: E402
from phisnet_jax.dataset import read_file_info, split_indices  # noqa: E402
from phisnet_jax.evaluate import accuracy, load_trained_model, predict_energies_and_forces  # noqa: E402
from phisnet_jax.model import MODEL_PRESETS, PhiSNetConfig  # noqa: E402

KCAL_PER_MOL_PER_HARTREE = 627.509474
LABELS = ("energy", "forces", "ccsd_t_energy", "ccsd_t_forces")


def seconds_spent(run_dir: str) -> float:
    """Training seconds already spent in a run, summed over calls: each call's log clock starts at 0."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return 0.0
    total = last = 0.0
    with open(path) as f:
        for line in f:
            try:
                seconds = float(json.loads(line)["seconds"])
            except (ValueError, KeyError):  # a line cut short by a kill
                continue
            if seconds < last:
                total += last
            last = seconds
    return total + last


def train_for(run_dir, model_cfg, train_cfg, data_cfg, budget, init_from=None) -> dict:
    """Train until ``budget`` seconds are spent in ``run_dir`` (nothing if already spent)."""
    remaining = budget - seconds_spent(run_dir)
    if remaining > 0:
        training.train(run_dir, model_cfg, train_cfg, data_cfg, time_budget=remaining, init_from=init_from)
    trained = load_trained_model(run_dir)
    return {"run_dir": run_dir, "steps": trained.step, "training_seconds": seconds_spent(run_dir),
            "budget_seconds": budget, "train": dataclasses.asdict(train_cfg),
            "data": {"n_train": data_cfg.n_train, "n_valid": data_cfg.n_valid, "split_seed": data_cfg.split_seed}}


def errors(energy, forces, data, offset_rows) -> dict:
    """Energy and force errors against CCSD(T) of predictions for ``data``'s rows.

    energy: (n,) hartree; forces: (n, N, 3) hartree/bohr; offset_rows: the rows whose mean
    energy error is the constant subtracted in the offset-removed MAE (fine-tuning geometries).
    """
    energy_error = energy - data.labels["ccsd_t_energy"]
    test_rows = np.setdiff1d(np.arange(len(data)), offset_rows)
    offset = float(energy_error[offset_rows].mean())
    atoms = np.asarray(data.inputs.atom_mask)[test_rows]
    force_error = (forces - data.labels["ccsd_t_forces"])[test_rows][atoms]
    raw = float(np.abs(energy_error[test_rows]).mean())
    removed = float(np.abs(energy_error[test_rows] - offset).mean())
    return {
        "energy_mae_hartree": raw, "energy_mae_kcal_per_mol": raw * KCAL_PER_MOL_PER_HARTREE,
        "mean_energy_error_on_finetune_geometries_hartree": offset,
        "energy_mae_offset_removed_hartree": removed,
        "energy_mae_offset_removed_kcal_per_mol": removed * KCAL_PER_MOL_PER_HARTREE,
        "forces_mae_hartree_per_bohr": float(np.abs(force_error).mean()),
    }


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import textwrap

    names = [textwrap.fill(r["method"], 20) for r in rows]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar(x - 0.2, [r["energy_mae_kcal_per_mol"] for r in rows], 0.4, label="raw")
    ax1.bar(x + 0.2, [r["energy_mae_offset_removed_kcal_per_mol"] for r in rows], 0.4,
            label="mean error on fine-tuning geometries removed")
    ax1.set_yscale("log")
    ax1.set_ylim(top=30 * max(r["energy_mae_kcal_per_mol"] for r in rows))  # room for the legend
    ax1.set_ylabel("energy MAE vs CCSD(T), kcal/mol")
    ax1.legend(fontsize=8, loc="upper right")
    ax2.bar(x, [r["forces_mae_hartree_per_bohr"] for r in rows], 0.5, color="C2")
    ax2.set_yscale("log")
    ax2.set_ylabel("force MAE vs CCSD(T), hartree/bohr")
    for ax in (ax1, ax2):
        ax.set_xticks(x, names, fontsize=8)
    fig.suptitle("water, def2-SVP, held-out test geometries")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="runs/transfer/water_hf_def2svp_ccsdt.h5")
    parser.add_argument("--molecule", default="water")
    parser.add_argument("--basis", default="def2-svp")
    parser.add_argument("--samples", type=int, default=400, help="geometries to generate (HF + CCSD(T))")
    parser.add_argument("--work-dir", default="runs/transfer", help="where the two run directories go")
    parser.add_argument("--preset", default="small", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--label", help="Suffix of the result files.")
    parser.add_argument("--train", type=int, default=250, help="HF training geometries")
    parser.add_argument("--valid", type=int, default=50, help="HF validation geometries (the rest is test)")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--validate-every", type=int, default=250)
    parser.add_argument("--hf-budget", type=float, default=1200.0, help="seconds of HF training")
    parser.add_argument("--finetune-train", type=int, default=25, help="CCSD(T)-labelled training geometries")
    parser.add_argument("--finetune-batch-size", type=int, default=5)
    parser.add_argument("--finetune-learning-rate", type=float, default=1e-5,
                        help="constant (no validation split, so no reduce-on-plateau); 1e-3 wrecks the HF model")
    parser.add_argument("--finetune-validate-every", type=int, default=100, help="checkpoint interval")
    parser.add_argument("--energy-weight", type=float, default=1.0, help="per hartree^2")
    parser.add_argument("--forces-weight", type=float, default=1.0, help="per (hartree/bohr)^2")
    parser.add_argument("--finetune-budget", type=float, default=600.0, help="seconds of fine-tuning")
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's informational messages
    if args.finetune_train > args.train:
        parser.error("--finetune-train must not exceed --train (the fine-tuning set is part of the HF training set)")
    # Identical computations (the second model's evaluation, a resumed run) load from disk.
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(args.work_dir, "jax_cache")))

    os.makedirs(os.path.dirname(os.path.abspath(args.dataset)), exist_ok=True)
    generate_cmd = ["phisnet", "generate", args.molecule, "--method", "hf", "--basis", args.basis, "--ccsd-t",
                    "-n", str(args.samples), "-o", args.dataset, "--json"]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "phisnet_jax", *generate_cmd[1:]], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"generation failed: {out.stderr.strip()}")
    generation = json.loads(out.stdout.strip().splitlines()[-1])
    generation["seconds_this_call"] = time.perf_counter() - t0

    info = read_file_info(args.dataset)
    model_cfg = PhiSNetConfig(elements=(1, 8), basis=info.level.basis, core_hamiltonian=True,
                              **MODEL_PRESETS[args.preset])
    dataset = os.path.abspath(args.dataset)
    hf_data = training.DataConfig(dataset, (args.molecule,), args.train, args.valid)
    hf_train = training.TrainConfig(batch_size=args.batch_size, validate_every=args.validate_every)
    hf_dir = os.path.join(args.work_dir, "hf")
    hf_phase = train_for(hf_dir, model_cfg, hf_train, hf_data, args.hf_budget)

    ft_data = training.DataConfig(dataset, (args.molecule,), args.finetune_train, 0)
    ft_train = training.TrainConfig(
        batch_size=args.finetune_batch_size, validate_every=args.finetune_validate_every,
        learning_rate=args.finetune_learning_rate, min_learning_rate=args.finetune_learning_rate / 100,
        fock_mse_weight=0.0, fock_mae_weight=0.0,
        overlap_mse_weight=0.0, overlap_mae_weight=0.0, core_mse_weight=0.0, core_mae_weight=0.0,
        energy_weight=args.energy_weight, forces_weight=args.forces_weight, energy_source="ccsd_t")
    ft_dir = os.path.join(args.work_dir, "finetuned")
    ft_phase = train_for(ft_dir, model_cfg, ft_train, ft_data, args.finetune_budget, init_from=hf_dir)

    # Evaluation rows: the fine-tuning geometries (for the offsets) followed by the test geometries.
    everything = load_splits(args.dataset, [args.molecule], model_cfg, SplitSpec(0, 0), labels=LABELS)["test"]
    n = len(everything)
    test_rows = split_indices(n, args.train, args.valid)["test"]
    ft_rows = split_indices(n, args.finetune_train, 0)["train"]
    assert np.all(np.isin(ft_rows, split_indices(n, args.train, args.valid)["train"]))
    data = everything.take(np.concatenate([ft_rows, test_rows]))
    offset_rows = np.arange(len(ft_rows))
    test_only = everything.take(test_rows)

    rows = [{"method": "HF (pyscf, the dataset's labels)",
             **errors(data.labels["energy"], data.labels["forces"], data, offset_rows)}]
    models = {"PhiSNet trained on HF matrices": hf_dir, "PhiSNet fine-tuned on CCSD(T)": ft_dir}
    vs_hf, matrices = {}, {}
    for name, run_dir in models.items():
        trained = load_trained_model(run_dir)
        energy, forces = predict_energies_and_forces(trained, data)
        rows.append({"method": name, **errors(energy, forces, data, offset_rows)})
        test = slice(len(ft_rows), None)
        atoms = np.asarray(data.inputs.atom_mask)[test]
        vs_hf[name] = {
            "energy_mae_hartree": float(np.abs(energy[test] - data.labels["energy"][test]).mean()),
            "forces_mae_hartree_per_bohr": float(np.abs((forces[test] - data.labels["forces"][test])[atoms]).mean()),
        }
        matrices[name] = accuracy(trained, test_only)
    for r in rows:
        print(json.dumps(r))

    platform = jax.devices()[0].platform
    stem = result_stem(f"transfer_learning_{args.molecule}", args.label, platform)
    result = {
        "benchmark": f"PhiSNet transfer learning HF -> CCSD(T), {args.molecule}, {info.level.basis}",
        "commands": {
            "experiment": "python experiments/transfer_learning.py " + " ".join(sys.argv[1:]),
            "generation (run by the experiment)": " ".join(generate_cmd),
        },
        "machine": machine_info(), "jax": jax.__version__,
        "data": {"dataset": args.dataset, "level_of_theory": f"{info.level.method}/{info.level.basis} + CCSD(T)",
                 "converged_samples": n, "hf_split": {"train": args.train, "valid": args.valid,
                                                      "test": len(test_rows), "seed": 42},
                 "finetune_geometries": len(ft_rows), "generation_this_call": generation},
        "model": dataclasses.asdict(model_cfg),
        "hf_training": hf_phase, "finetuning": {**ft_phase, "init_from": hf_dir},
        "test_vs_ccsd_t": rows,
        "test_vs_hf": vs_hf,
        "test_matrix_accuracy_vs_hf": matrices,
        "definitions": {
            "energy_mae": "mean |E_method - E_CCSD(T)| over the test geometries",
            "mean_energy_error_on_finetune_geometries": "mean of E_method - E_CCSD(T) over the fine-tuning "
                                                        "geometries, i.e. the CCSD(T) labels the fine-tuned model saw",
            "energy_mae_offset_removed": "mean |E_method - E_CCSD(T) - that mean| over the test geometries: "
                                         "the error left after a constant shift fitted on the same CCSD(T) labels",
            "forces_mae": "mean |F_method - F_CCSD(T)| over all Cartesian force components of the test geometries",
            "test_vs_hf": "the models' energies and forces against the dataset's HF labels (test geometries)",
            "test_matrix_accuracy_vs_hf": "phisnet evaluate metrics against the HF matrices (micro-hartree)",
            "training_seconds": "wall-clock seconds of training, compilation included, summed over calls",
        },
    }
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
