"""Experiment: PhiSNet-predicted orbitals instead of Hartree-Fock as the input of the
transferable wavefunction.

The same network and settings are trained on the same geometries twice: with orbital features
(and HF-fit targets) from minimal-basis Hartree-Fock, and from a trained PhiSNet model's
predicted F and S (projected onto the minimal basis, no SCF at all). Both runs are evaluated
with fresh walkers at every step count of --eval-at; the mean energy over the geometries is
compared, with the smallest principal cosine between the HF and predicted occupied spaces as a
measure of how far the inputs differ. Writes experiments/results/predicted_orbitals_<name>_
<platform>.json and a PNG of energy vs steps.

    .venv/bin/python experiments/predicted_orbitals.py --name water --phisnet runs/transfer/hf \
        --systems molecules:H2Ox2 --eval-at 0 100 300

With --init-from BASE_RUN both runs are fine-tuned from that base model instead (every weight
reused, no HF fit), as ``vmc finetune`` does; --set-seed draws other geometries than
the base model's.
"""

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from finetuning import ccsd_t_energy, command_line, curve, write_result  # noqa: E402
from machine import machine_info  # noqa: E402
from phisnet_jax.evaluate import load_trained_model  # noqa: E402
from vmc import orbitals  # noqa: E402
from vmc.config import PRESET_NAMES, SystemsConfig, finetuning_config, preset_config  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def input_similarity(system_set, phisnet_run: str) -> dict:
    """Per system: the smallest principal cosine between the HF and the predicted occupied
    spaces (1 = the same space) and the largest coefficient difference of matching orbitals."""
    trained = load_trained_model(phisnet_run)
    similarity = {}
    for system in system_set:
        hf = orbitals.hartree_fock(system)
        predicted = orbitals.predicted_orbitals(system, trained)
        s = system.to_pyscf(orbitals.DEFAULT_BASIS).intor_symmetric("int1e_ovlp")
        cosines = np.linalg.svd(hf.up.T @ s @ predicted.up, compute_uv=False)
        similarity[system.name] = {"min_principal_cosine": float(cosines.min()),
                                   "max_coefficient_difference": float(np.abs(hf.up - predicted.up).max())}
    return similarity


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--phisnet", required=True, help="Run directory of a trained PhiSNet model.")
    parser.add_argument("--systems", default="molecules:H2Ox2")
    parser.add_argument("--preset", default="small", choices=PRESET_NAMES)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[0, 100, 300])
    parser.add_argument("--eval-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="Seed of parameters, walkers and sampling.")
    parser.add_argument("--set-seed", type=int, default=0, help="Seed of the generated geometries.")
    parser.add_argument("--init-from", metavar="BASE_RUN", help="Fine-tune both runs from this base model.")
    parser.add_argument("--reference", metavar="BASIS", help="Add CCSD(T) references in this basis.")
    parser.add_argument("--runs", default="runs/predicted_orbitals")
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()

    root = os.path.join(args.runs, args.name)
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
    system_set = SystemsConfig(args.systems, seed=args.set_seed).load()
    eval_at = sorted(set(args.eval_at))
    curves, seconds = {}, {}
    for label, source in (("Hartree-Fock orbitals", None), ("PhiSNet orbitals", os.path.abspath(args.phisnet))):
        if args.init_from:
            config = finetuning_config(args.init_from, args.systems, set_seed=args.set_seed,
                                              orbitals_from=source, seed=args.seed)
        else:
            systems = SystemsConfig(args.systems, seed=args.set_seed, orbitals=source)
            config = preset_config(args.preset, systems, seed=args.seed)
        t = time.perf_counter()
        curves[label] = curve(os.path.join(root, "phisnet" if source else "hf"), config, eval_at, args.eval_steps)
        seconds[label] = time.perf_counter() - t
    record = {
        "experiment": "PhiSNet-predicted vs Hartree-Fock orbitals as wavefunction input",
        "command": command_line(sys.argv),
        "target": f"mean over {args.systems}",
        "set_seed": args.set_seed,
        "init_from": args.init_from,
        "input_similarity": input_similarity(system_set, args.phisnet),
        "curves": curves,
        "seconds": seconds,
        "machine": machine_info(),
    }
    if args.reference:
        energies = [ccsd_t_energy(s, args.reference) for s in system_set]
        record["reference"] = {"method": "CCSD(T)", "basis": args.reference, "energy": float(np.mean(energies)),
                               "systems": {s.name: e for s, e in zip(system_set, energies)}}
    write_result(args.results, f"predicted_orbitals_{args.name}", record)


if __name__ == "__main__":
    main()
