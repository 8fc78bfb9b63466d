"""Benchmark: PhiSNet training throughput, inference latency, compile time and parameter count.

For each configuration (paper / small) and molecule (water 24 AOs, ethanol 72 AOs at
def2-SVP), times the jitted training step (loss, gradient, optimiser, EMA) at a batch size and
the jitted single-molecule prediction (batch 1), separately from compilation. Inputs are the
molecule's RDKit geometry with random targets: speed does not depend on the values.
Writes experiments/results/phisnet_speed_<platform>.json.

    .venv/bin/python experiments/phisnet_speed.py [--configs paper small] [--batch N] [--repeats 5]
        [--output PATH]
"""

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from machine import machine_info  # noqa: E402
from molfoundation import molecules  # noqa: E402
from phisnet_jax.model import MODEL_PRESETS, MoleculeInputs, PhiSNetConfig, make_inputs, make_phisnet  # noqa: E402
from phisnet_jax.train import TrainConfig, cast_inputs, init_state, make_optimizer, make_train_step  # noqa: E402


def timed(fn, *args, repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    compile_and_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn(*args))
    return compile_and_first, (time.perf_counter() - t0) / repeats, out


def measure(preset: str, molecule: str, batch: int, repeats: int) -> dict:
    cfg = dataclasses.replace(PhiSNetConfig(elements=(1, 6, 8)), **MODEL_PRESETS[preset])
    row = measure_model(cfg, molecules.from_name(molecule), batch, repeats)
    row = {"config": preset, "molecule": molecule, **row}
    print(json.dumps(row), flush=True)
    return row


def training_problem(cfg: PhiSNetConfig, mol: molecules.Molecule, batch: int):
    """The model ``cfg``, one molecule's float32 inputs, ``batch`` copies of them, random
    float32 targets (F, S) of the batch, and the training configuration with its optimiser."""
    model = make_phisnet(cfg)
    single = cast_inputs(make_inputs(cfg, mol.atomic_numbers, mol.positions), np.float32)
    batched = MoleculeInputs(**{k: np.repeat(np.asarray(v)[None], batch, 0) for k, v in vars(single).items()})
    n_ao = single.ao_mask.shape[0]
    rng = np.random.default_rng(0)
    fock = jnp.asarray(rng.normal(size=(batch, n_ao, n_ao)), jnp.float32)
    overlap = jnp.asarray(rng.normal(size=(batch, n_ao, n_ao)), jnp.float32)
    tcfg = TrainConfig(batch_size=batch)
    return model, single, batched, (fock, overlap), tcfg, make_optimizer(tcfg)


def measure_model(cfg: PhiSNetConfig, mol: molecules.Molecule, batch: int, repeats: int) -> dict:
    """Parameters, init, training-step and inference times of the model ``cfg`` on ``batch``
    copies of ``mol`` (random float32 targets), compile times apart."""
    model, single, batched, (fock, overlap), tcfg, optimizer = training_problem(cfg, mol, batch)
    n_ao = single.ao_mask.shape[0]
    t0 = time.perf_counter()
    state = jax.block_until_ready(init_state(model, tcfg, batched, optimizer))
    init_seconds = time.perf_counter() - t0
    n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))

    step = jax.jit(make_train_step(model, tcfg, optimizer))
    train_first, train_step, _ = timed(lambda s: step(s, batched, fock, overlap)[1]["loss"], state, repeats=repeats)
    apply = jax.jit(model.apply)
    infer_first, infer_time, _ = timed(apply, state.params, single, repeats=max(repeats, 10))
    return {
        "n_ao": int(n_ao), "parameters": n_params, "batch": batch, "init_seconds": init_seconds,
        "train_compile_seconds": train_first - train_step, "train_step_ms": 1e3 * train_step,
        "train_molecules_per_second": batch / train_step,
        "inference_compile_seconds": infer_first - infer_time, "inference_ms_per_molecule": 1e3 * infer_time,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["paper", "small"], choices=sorted(MODEL_PRESETS))
    parser.add_argument("--molecules", nargs="+", default=["water", "ethanol"])
    parser.add_argument("--batch", type=int, help="batch size [default: the paper's, water 50, ethanol 10]")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="JSON path [default: experiments/results/phisnet_speed_<platform>.json]")
    args = parser.parse_args()
    paper_batch = {"water": 50, "ethanol": 10, "malondialdehyde": 10, "uracil": 5}
    rows = [measure(c, m, args.batch or paper_batch.get(m, 10), args.repeats)
            for c in args.configs for m in args.molecules]
    platform = jax.devices()[0].platform
    result = {
        "benchmark": "PhiSNet training throughput and inference latency (float32)",
        "command": "python experiments/phisnet_speed.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(), "jax": jax.__version__, "results": rows,
    }
    path = args.output or os.path.join(os.path.dirname(__file__), "results", f"phisnet_speed_{platform}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
