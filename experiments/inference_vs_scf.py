"""Benchmark: PhiSNet inference (with the eigen-solve) against a pyscf SCF of the same molecule.

For each molecule (RDKit geometry) and model configuration, in one run on one machine:
- model: the jitted prediction of F and S for one molecule (batch 1), followed by the Roothaan
  solve F C = S C eps and the density matrix, float32; also per molecule within a batch
  (vmapped), and the host-side input preparation (neighbour lists, padding) separately;
- pyscf: a restricted SCF at the level of theory (PBE/def2-SVP by default, the paper's) from the
  minao guess at pyscf's default thresholds, the wall time of ``kernel()`` (median of repeats).
The ratio SCF time / inference time is what the paper reports (over 1000 x on a GPU). The
speed of a model does not depend on its weights, so freshly initialised models are timed.
Writes experiments/results/inference_vs_scf_<platform>.json.

    .venv/bin/python experiments/inference_vs_scf.py [--configs small paper] [--molecules water ethanol]
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from machine import machine_info  # noqa: E402
from phisnet_speed import timed  # noqa: E402
from molfoundation import molecules  # noqa: E402
from phisnet_jax import observables  # noqa: E402
from phisnet_jax.model import MODEL_PRESETS, MoleculeInputs, PhiSNetConfig, make_inputs, make_phisnet  # noqa: E402
from phisnet_jax.reference import LevelOfTheory, make_scf  # noqa: E402
from phisnet_jax.train import cast_inputs  # noqa: E402


def scf_seconds(molecule: molecules.Molecule, level: LevelOfTheory, repeats: int) -> dict:
    """Median wall time of a converged pyscf SCF from the minao guess, and its iterations."""
    mol = molecules.to_pyscf(molecule, level.basis)
    times, cycles = [], []
    for _ in range(repeats):
        mf = make_scf(mol, level)
        t0 = time.perf_counter()
        mf.kernel()
        times.append(time.perf_counter() - t0)
        cycles.append(int(mf.cycles))
        if not mf.converged:
            raise RuntimeError(f"pyscf SCF did not converge for {molecule}")
    return {"scf_seconds": statistics.median(times), "scf_iterations": cycles[0]}


def model_seconds(preset: str, molecule: molecules.Molecule, basis: str, batch: int, repeats: int) -> dict:
    """Inference timings of one freshly initialised configuration on one molecule."""
    elements = tuple(sorted({int(z) for z in molecule.atomic_numbers}))
    cfg = dataclasses.replace(PhiSNetConfig(elements=elements, basis=basis),
                              **MODEL_PRESETS[preset])
    model = make_phisnet(cfg)
    n_occupied = molecule.n_electrons // 2

    t0 = time.perf_counter()
    for _ in range(repeats):
        single = cast_inputs(make_inputs(cfg, molecule.atomic_numbers, molecule.positions), np.float32)
    prepare = (time.perf_counter() - t0) / repeats
    params = model.init(jax.random.PRNGKey(0), single)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))

    def predict(params, inputs):
        out = model.apply(params, inputs)
        eps, coefficients = observables.roothaan(out["fock"], out["overlap"])
        return eps, observables.density_matrix(coefficients, n_occupied)

    one = jax.jit(predict)
    first, latency, _ = timed(one, params, single, repeats=repeats)
    stacked = MoleculeInputs(**{k: np.repeat(np.asarray(v)[None], batch, 0) for k, v in vars(single).items()})
    many = jax.jit(jax.vmap(predict, in_axes=(None, 0)))
    _, batch_time, _ = timed(many, params, jax.tree.map(jnp.asarray, stacked), repeats=max(1, repeats // 4))
    return {
        "config": preset, "parameters": n_params, "n_ao": int(single.ao_mask.shape[0]),
        "input_preparation_ms": 1e3 * prepare, "compile_seconds": first - latency,
        "inference_ms_batch1": 1e3 * latency, "batch": batch,
        "inference_ms_per_molecule_batched": 1e3 * batch_time / batch,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small", "paper"], choices=sorted(MODEL_PRESETS))
    parser.add_argument("--molecules", nargs="+", default=["water", "ethanol"])
    parser.add_argument("--method", default="pbe", help="'hf' or a functional [default: pbe]")
    parser.add_argument("--basis", default="def2-svp")
    parser.add_argument("--batch", type=int, default=32, help="molecules per batched call")
    parser.add_argument("--repeats", type=int, default=20, help="timed model calls")
    parser.add_argument("--scf-repeats", type=int, default=3)
    parser.add_argument("--output", help="JSON path [default: experiments/results/inference_vs_scf_<platform>.json]")
    args = parser.parse_args()
    # pyscf's default thresholds: what a user's SCF run would do.
    level = LevelOfTheory(method=args.method, basis=args.basis, conv_tol=1e-9, conv_tol_grad=np.sqrt(1e-9))
    rows = []
    for name in args.molecules:
        molecule = molecules.from_name(name)
        scf = scf_seconds(molecule, level, args.scf_repeats)
        for preset in args.configs:
            row = {"molecule": name, **model_seconds(preset, molecule, args.basis, args.batch, args.repeats),
                   **scf}
            row["scf_over_inference_batch1"] = row["scf_seconds"] / (1e-3 * row["inference_ms_batch1"])
            row["scf_over_inference_batched"] = row["scf_seconds"] / (1e-3 * row["inference_ms_per_molecule_batched"])
            row["scf_over_inference_with_preparation"] = row["scf_seconds"] / (
                1e-3 * (row["inference_ms_batch1"] + row["input_preparation_ms"]))
            print(json.dumps(row), flush=True)
            rows.append(row)
    platform = jax.devices()[0].platform
    result = {
        "benchmark": "PhiSNet inference (F, S, Roothaan solve, density; float32) vs pyscf SCF from minao",
        "level_of_theory": f"{level.method}/{level.basis}, conv_tol {level.conv_tol:g}, grid level {level.grid_level}",
        "command": "python experiments/inference_vs_scf.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(), "jax": jax.__version__, "results": rows,
    }
    path = args.output or os.path.join(os.path.dirname(__file__), "results", f"inference_vs_scf_{platform}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
