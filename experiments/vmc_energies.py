"""Benchmark: VMC energies of small systems against exact and near-exact references.

For each system: fit to the HF orbitals and optimise by VMC (resumable run directory
under --runs), then evaluate the final parameters with fresh walkers (blocking error bar).
References: the literature's exact energy where known (vmc.references) and a pyscf calculation
in a large basis (CCSD, exact for two electrons, or CCSD(T): basis-set-limited estimates).
Each run is named <system>_<label> (label: --label, default <preset>_<optimizer>), both as its
run directory and as its record in experiments/results/vmc_energies_<platform>.json, next to
its energy-curve PNG vmc_energy_<system>_<label>_<platform>.png.

    .venv/bin/python experiments/vmc_energies.py --systems H2 LiH --preset small \
        --steps 20000 --time-budget 1200 --eval-walkers 1024 --eval-steps 1000
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

from machine import machine_info  # noqa: E402
from molfoundation.settings import apply_settings  # noqa: E402
from vmc import evaluate, orbitals, systems, train  # noqa: E402
from vmc.config import PRESET_NAMES, SystemsConfig, preset_config, run_directory  # noqa: E402
from vmc.references import EXACT_ENERGIES, exact_energy  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# Large-basis references computed with pyscf: (method, basis) per system. CCSD is exact (FCI)
# for two electrons.
PYSCF_REFERENCES = {
    "H2": ("ccsd", "cc-pv5z"),
    "LiH": ("ccsd(t)", {"Li": "cc-pcvqz", "H": "cc-pvqz"}),
    "Li": ("ccsd(t)", "cc-pcvqz"),
    "Be": ("ccsd(t)", "cc-pcvqz"),
    "H6": ("ccsd(t)", "cc-pvqz"),
    "H2O": ("ccsd(t)", {"O": "cc-pcvtz", "H": "cc-pvtz"}),
}


def pyscf_reference(system: systems.System) -> dict | None:
    """Total energy (hartree) of ``system`` from the large-basis method of PYSCF_REFERENCES."""
    if system.name not in PYSCF_REFERENCES:
        return None
    from pyscf import cc, scf

    method, basis = PYSCF_REFERENCES[system.name]
    mol = system.to_pyscf("sto-3g")
    mol.basis = basis  # a name or a per-element dict
    mol.build()
    mf = (scf.RHF(mol) if system.spin == 0 else scf.ROHF(mol)).run(conv_tol=1e-10)
    solver = cc.CCSD(mf).run(conv_tol=1e-9)
    energy = solver.e_tot + (solver.ccsd_t() if method == "ccsd(t)" else 0.0)
    return {"method": method, "basis": basis, "energy": float(energy)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=["H2", "LiH"])
    parser.add_argument("--preset", default="small", choices=PRESET_NAMES)
    parser.add_argument("--optimizer", default="kfac", choices=["kfac", "adam"])
    parser.add_argument("--walkers", type=int, help="training walkers [default: the preset's]")
    parser.add_argument("--steps", type=int, default=20000, help="VMC steps (in all, per system)")
    parser.add_argument("--time-budget", type=float, help="seconds of training per system and call")
    parser.add_argument("--eval-walkers", type=int, default=1024)
    parser.add_argument("--eval-steps", type=int, default=1000)
    parser.add_argument("--eval-burn-in", type=int, help="MCMC calls before evaluation "
                        "[default: vmc.evaluate.evaluation_burn_in]")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, as `vmc train --set` (repeatable)")
    parser.add_argument("--label", help="run name after the system [default: <preset>_<optimizer>]")
    parser.add_argument("--runs", default="runs/vmc", help="parent of the run directories")
    args = parser.parse_args()

    path = os.path.join(RESULTS, f"vmc_energies_{jax.default_backend()}.json")
    records = {}
    for name in args.systems:
        sampling = dict(optimizer=args.optimizer)
        if args.walkers:
            sampling["n_walkers"] = args.walkers
        config = preset_config(args.preset, SystemsConfig(name), **sampling)
        config = apply_settings(config, args.settings)
        run_name = f"{name}_{args.label or f'{args.preset}_{args.optimizer}'}"
        run_dir = os.path.join(args.runs, run_name)
        t0 = time.perf_counter()
        result = train.train(run_dir, config, max_steps=args.steps, time_budget=args.time_budget)
        train_seconds = time.perf_counter() - t0
        log = run_directory(run_dir).read_log("vmc")
        run_evaluation = evaluate.evaluate_run(run_dir, n_steps=args.eval_steps, n_walkers=args.eval_walkers,
                                               burn_in_sweeps=args.eval_burn_in)
        evaluation = run_evaluation.systems[0]
        system = systems.from_name(name)
        exact = exact_energy(system)
        reference = pyscf_reference(system)
        hartree_fock = orbitals.hartree_fock(system, basis=config.systems.basis).energy
        record = {
            "system": name,
            "run": run_name,
            "command": "python experiments/vmc_energies.py " + " ".join(sys.argv[1:]),
            "config": config.to_record(),
            "vmc_steps": result.steps,
            "hf_fit_steps": result.hf_fit_steps,
            "training_seconds_total": sum(e["seconds"] for e in log),
            "training_seconds_this_call": train_seconds,
            "mean_step_seconds": sum(e["seconds"] for e in log[-100:]) / max(1, len(log[-100:])),
            "evaluation": dataclasses.asdict(run_evaluation),
            "energy": evaluation.energy,
            "error_bar": evaluation.error,
            "hartree_fock_minimal_basis": hartree_fock,
            "exact": exact,
            "exact_source": EXACT_ENERGIES[name][1] if exact is not None else None,
            "pyscf_reference": reference,
        }
        if exact is not None:
            record["error_vs_exact_mha"] = 1000 * (evaluation.energy - exact)
            record["correlation_energy_recovered"] = (hartree_fock - evaluation.energy) / (hartree_fock - exact)
        if reference is not None:
            record["error_vs_pyscf_reference_mha"] = 1000 * (evaluation.energy - reference["energy"])
        records[run_name] = record
        shutil.copyfile(os.path.join(run_dir, "energy.png"),
                        os.path.join(RESULTS, f"vmc_energy_{run_name}_{jax.default_backend()}.png"))
        print(json.dumps({k: record[k] for k in ("system", "vmc_steps", "energy", "error_bar", "exact")
                          if k in record}), flush=True)
    # Read the stored results only now, so that runs of other systems in parallel are kept.
    previous = json.load(open(path)) if os.path.exists(path) else {}
    out = {
        "benchmark": "vmc_energies",
        "machine": machine_info(),
        "systems": {**previous.get("systems", {}), **records},
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
