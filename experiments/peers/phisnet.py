"""Benchmark: this project's PhiSNet against the original PhiSNet code, on the same machine, in the same run.

The original (Unke et al. 2021, PyTorch) is driven through its network class,
``nn.NeuralNetwork``, with the training recipe of its ``train.py``: the loss MSE + MAE of F and S
(its ``compute_error_dict``), AdamW with AMSGrad (lr 1e-3, betas 0.99 / 0.999), gradient
clipping at norm 1, its ``ExponentialMovingAverage`` (decay 0.999) and halving of the learning
rate after 10 validations without improvement. Both networks get the same architecture
(--preset of this project; the original's order, features, radial functions, modules and
residual stacks set to match), the same geometries in bohr and the same cutoff (15 bohr). Each
code runs in a fresh process of its own, one after the other. The original's real spherical
harmonics differ from pyscf's AO order and signs: the map between them is fitted
(``molfoundation.basis.fit_pyscf_shell_map``) and checked by rotating a molecule through the
original's network with random parameters (``convention_check``, float64: its matrices, taken to pyscf
order, must transform with pyscf's AO rotation).

``speed`` (experiments/results/peer_phisnet[_<label>]_<platform>.json), for each --configs
preset, water (24 AOs in def2-SVP), random targets (speed does not depend on the values):

- ``train_step_seconds``: one training step at --batch molecules (loss, gradient, clipping,
  optimiser, moving average), the mean of --repeats after one warm-up step;
- ``inference_seconds``: one prediction of F and S for one molecule (no gradient);
- ``parameters``: all parameters of each network (the original also builds core-Hamiltonian
  heads, which these runs do not use: ``parameters_trained`` counts those that get a gradient);
- ``peak_rss_mib``: peak resident memory of each code's process;
- ``train_step_ratio``, ``inference_ratio``: ours / original.

``budget`` (experiments/results/budget_water[_<label>]_<platform>.json): each code trains on
the same split of --dataset (--train / --valid, seed 42 as in the paper, the rest is test) for
--seconds of wall-clock time from its process's start (start-up and compilation included),
with --batch-size and a validation every --validate-every steps; then both codes' final
moving-average parameters predict the test set, and the same function
(``phisnet_jax.evaluate.matrix_accuracy``) scores both: ``ours.mae_f_uha`` and
``original.mae_f_uha``, with the orbital-energy MAE (eps) and orbital similarity (psi), and
``mae_f_ratio`` (ours / original). ``--schedule`` sets this project's learning-rate schedule
(the paper's reduce-on-plateau, or ``budget``: linear decay over the budget). ``--codes`` runs
one code alone: its row joins those already in the result file if that file's settings and
training geometries (``dataset.positions_sha256``) are the same (otherwise the run is refused:
give another --label), so each code can run in its own environment, on different days; every
row records its own command, machine and versions (``environment``).

The original is not part of this repository. Its code as published with the paper targets
PyTorch 1.8; a public fork runs on PyTorch 2 (measured with PyTorch 2.13.0, CPU build):

    git clone https://github.com/rhjvanworkum/phisnet_fork PEER        # measured at 67cc968
    python3.11 -m venv .venv-peers
    .venv-peers/bin/python requirements/override.py requirements/oldest-jax.txt > .venv-peers/req.txt
    .venv-peers/bin/pip install -r .venv-peers/req.txt torch==2.13.0 apsw
    .venv-peers/bin/pip install --no-deps -e .
    .venv-peers/bin/python experiments/peers/phisnet.py speed --phisnet PEER
    .venv-peers/bin/phisnet generate water -n 1200 -j 2 -o data/water.h5
    .venv-peers/bin/python experiments/peers/phisnet.py budget --phisnet PEER --dataset data/water.h5 --seconds 5400

This project's row alone, in its own environment (no PyTorch, no peer source needed):

    .venv/bin/python experiments/peers/phisnet.py budget --codes ours --dataset data/water.h5 --seconds 5400
"""

import dataclasses
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import harness  # noqa: E402
from harness import arrays_path, launch, mode_parsers, run_child, write_result  # noqa: E402

MOLECULE = "water"
CODES = ("original", "ours")
# The packages each code's process runs on (the original's also reads data with this project's).
PACKAGES = {"ours": ("jax", "jaxlib", "flax", "optax", "e3nn-jax"),
            "original": ("jax", "jaxlib", "flax", "optax", "e3nn-jax", "torch")}
SPLIT_SEED = 42  # the paper's
RESIDUAL_STACKS = ("pre_x", "post_x", "pre_vi", "pre_vj", "post_v", "output", "pc", "pn", "ii", "ij")
HEAD_STACKS = ("full_ii", "full_ij", "core_ii", "core_ij", "over_ij")


def model_config(preset: str, elements: tuple[int, ...], basis: str):
    from phisnet_jax.model import MODEL_PRESETS, PhiSNetConfig

    return dataclasses.replace(PhiSNetConfig(elements=elements, basis=basis), **MODEL_PRESETS[preset])


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# The original, inside its own process.


def import_peer(path: str):
    """The original's ``nn`` and ``training`` packages (top-level names in its source tree)."""
    sys.path.insert(0, path)
    import nn as peer_nn
    import training as peer_training

    return peer_nn, peer_training


def peer_network(peer_nn, cfg, layout, atomic_numbers):
    """The original's network for one molecule with ``cfg``'s architecture, predicting F and S
    (float32, as its train.py converts it)."""
    import torch

    orbitals = tuple(tuple((int(atomic_numbers[a]), l) for l in layout.atom_shell_l(a))
                     for a in range(layout.n_atoms))
    model = peer_nn.NeuralNetwork(
        orbitals=orbitals, order=cfg.max_order, num_features=cfg.features,
        num_basis_functions=cfg.num_radial, num_modules=cfg.num_modules,
        **{f"num_residual_{k}": cfg.residual_blocks for k in RESIDUAL_STACKS},
        **{f"num_residual_{k}": cfg.head_residual_blocks for k in HEAD_STACKS},
        basis_functions="exp-bernstein", cutoff=cfg.cutoff, activation="swish")
    model.calculate_full_hamiltonian = True
    model.calculate_overlap_matrix = True
    model.calculate_core_hamiltonian = False
    model.calculate_energy = False
    model.calculate_forces = False
    return model.to(torch.float32)


def peer_ao_map(peer_nn, layout):
    """(n_ao, n_ao) orthogonal T: a pyscf-ordered AO matrix M is ``T @ M @ T.T`` in the original's order."""
    import torch

    from molfoundation import basis

    def harmonics(l):
        return lambda points: peer_nn.spherical_harmonics(l, torch.tensor(points, dtype=torch.float64))[l].numpy()

    return basis.block_diagonal(layout, {l: basis.fit_pyscf_shell_map(l, harmonics(l)) for l in set(layout.shell_l)})


def convention_check(peer_nn, cfg, layout, atomic_numbers, positions, ao_map) -> float:
    """Largest |F(R x) - D F(x) D^T| / max |F| of the original's network with random parameters
    (its output layers start at zero, so an untrained one predicts F = 0) in float64, its
    matrices taken to pyscf order (D: pyscf's AO rotation): 8e-13 for water in def2-SVP with
    the fitted map, 1e-4 with the identity in its place."""
    import numpy as np
    import torch
    from scipy.spatial.transform import Rotation

    from molfoundation import basis

    torch.manual_seed(1)
    model = peer_network(peer_nn, cfg, layout, atomic_numbers).to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    rotation = Rotation.random(random_state=7).as_matrix()
    centred = positions - positions.mean(axis=0)
    with torch.no_grad():
        f = [ao_map.T @ model(R=torch.tensor(x[None]))["full_hamiltonian"][0].numpy() @ ao_map
             for x in (centred, centred @ rotation.T)]
    d = basis.ao_rotation(layout, rotation)
    return float(np.abs(f[1] - d @ f[0] @ d.T).max() / np.abs(f[0]).max())


class PeerTrainer:
    """The original's training step: its loss, AdamW with AMSGrad, clipping and moving average."""

    def __init__(self, peer_training, model, learning_rate=1e-3):
        import torch

        self.torch = torch
        self.model = model
        self.training = peer_training
        self.weights = {"full_hamiltonian": 1.0, "core_hamiltonian": 0.0, "overlap_matrix": 1.0,
                        "energy": 0.0, "forces": 0.0}
        self.max_errors = {key: float("inf") for key in self.weights}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, eps=1e-8, betas=(0.99, 0.999),
                                           weight_decay=0.0, amsgrad=True)
        self.average = peer_training.ExponentialMovingAverage(model, decay=0.999, start_epoch=0)

    def loss(self, positions, fock, overlap):
        predictions = self.model(R=positions)
        data = {"full_hamiltonian": fock, "overlap_matrix": overlap}
        return self.training.compute_error_dict(predictions, data, self.weights, self.max_errors)["loss"]

    def step(self, positions, fock, overlap, epoch: int) -> float:
        self.optimizer.zero_grad()
        loss = self.loss(positions, fock, overlap)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.average(epoch)
        return float(loss)


def water_layout(basis_name: str):
    from pyscf import gto

    from molfoundation import molecules
    from molfoundation.basis import AOLayout

    mol = molecules.from_name(MOLECULE)
    pyscf_mol = gto.M(atom=[(int(z), tuple(x)) for z, x in zip(mol.atomic_numbers, mol.positions)],
                      basis=basis_name, unit="Bohr")
    return mol, AOLayout.from_mole(pyscf_mol)


def original_speed(job: dict) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count())
    peer_nn, peer_training = import_peer(job["peer"])
    mol, layout = water_layout(job["basis"])
    cfg = model_config(job["preset"], tuple(sorted(set(mol.atomic_numbers.tolist()))), job["basis"])
    torch.manual_seed(0)
    model = peer_network(peer_nn, cfg, layout, mol.atomic_numbers)
    trainer = PeerTrainer(peer_training, model)
    batch, n_ao = job["batch"], layout.n_ao
    rng = np.random.default_rng(0)
    positions = torch.tensor(np.repeat(mol.positions[None], batch, 0), dtype=torch.float32)
    fock = torch.tensor(rng.normal(size=(batch, n_ao, n_ao)), dtype=torch.float32)
    overlap = torch.tensor(rng.normal(size=(batch, n_ao, n_ao)), dtype=torch.float32)
    model.train()
    trainer.step(positions, fock, overlap, epoch=1)
    trained = sum(p.numel() for p in model.parameters() if p.grad is not None)
    t0 = time.perf_counter()
    for _ in range(job["repeats"]):
        trainer.step(positions, fock, overlap, epoch=1)
    train_step = (time.perf_counter() - t0) / job["repeats"]
    model.eval()
    with torch.no_grad():
        model(R=positions[:1])
        t0 = time.perf_counter()
        for _ in range(max(job["repeats"], 10)):
            model(R=positions[:1])
        inference = (time.perf_counter() - t0) / max(job["repeats"], 10)
    return {"parameters": sum(p.numel() for p in model.parameters()), "parameters_trained": trained,
            "train_step_seconds": train_step, "inference_seconds": inference}


def original_budget(job: dict) -> dict:
    import numpy as np
    import torch

    from phisnet_jax.dataset import read_molecule, split_indices

    torch.set_num_threads(os.cpu_count())
    peer_nn, peer_training = import_peer(job["peer"])
    group = read_molecule(job["dataset"], job["molecule"], fields=("positions", "fock", "overlap"))
    layout = group.layout
    cfg = model_config(job["preset"], tuple(sorted(set(group.atomic_numbers.tolist()))), job["basis"])
    ao_map = peer_ao_map(peer_nn, layout)
    check = convention_check(peer_nn, cfg, layout, group.atomic_numbers, group.arrays["positions"][0], ao_map)
    rows = split_indices(group.n_samples, job["train"], job["valid"], SPLIT_SEED)

    def tensors(name):
        positions = torch.tensor(group.arrays["positions"][rows[name]], dtype=torch.float32)
        to_peer = lambda m: torch.tensor(ao_map @ m[rows[name]] @ ao_map.T, dtype=torch.float32)  # noqa: E731
        return positions, to_peer(group.arrays["fock"]), to_peer(group.arrays["overlap"])

    train, valid, test = tensors("train"), tensors("valid"), tensors("test")
    torch.manual_seed(0)
    model = peer_network(peer_nn, cfg, layout, group.atomic_numbers)
    trainer = PeerTrainer(peer_training, model)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(trainer.optimizer, mode="min", factor=0.5, patience=10)
    order = np.random.default_rng(0)

    def batches(data, shuffle: bool):
        n = len(data[0])
        idx = order.permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, job["batch_size"]):
            take = torch.tensor(idx[start:start + job["batch_size"]])
            yield tuple(x[take] for x in data)

    def validation_loss() -> float:
        trainer.average.swap()
        model.eval()
        with torch.no_grad():
            losses = [float(trainer.loss(*b)) for b in batches(valid, False)]
        trainer.average.swap()
        model.train()
        return float(np.mean(losses))

    step, epoch, stopped = 0, 0, "time_budget"
    steps_started = time.time()
    model.train()
    while time.time() - job["launched"] < job["budget"]:
        for b in batches(train, True):
            if step % job["validate_every"] == 0:
                scheduler.step(validation_loss())
                if trainer.optimizer.param_groups[0]["lr"] < 1e-5:
                    stopped = "min_learning_rate"
                    break
            trainer.step(*b, epoch=epoch)
            step += 1
            if time.time() - job["launched"] >= job["budget"]:
                break
        else:
            epoch += 1
            continue
        break
    trained = time.time()
    trainer.average.swap()
    model.eval()
    fock, overlap = [], []
    with torch.no_grad():
        for positions, _, _ in batches(test, False):
            out = model(R=positions)
            fock.append(out["full_hamiltonian"].double().numpy())
            overlap.append(out["overlap_matrix"].double().numpy())
    back = lambda m: ao_map.T @ np.concatenate(m) @ ao_map  # noqa: E731
    return {"steps": step, "epochs": epoch, "stopped_because": stopped, "trained": trained,
            "first_step": steps_started, "learning_rate": trainer.optimizer.param_groups[0]["lr"],
            "convention_check": check, "parameters": sum(p.numel() for p in model.parameters()),
            "predictions": {"fock": back(fock), "overlap": back(overlap)}}


# ----------------------------------------------------------------------------------------------
# This project, inside its own process.


def ours_speed(job: dict) -> dict:
    from phisnet_speed import measure_model

    mol, _ = water_layout(job["basis"])
    cfg = model_config(job["preset"], tuple(sorted(set(mol.atomic_numbers.tolist()))), job["basis"])
    row = measure_model(cfg, mol, job["batch"], job["repeats"])
    return {"parameters": row["parameters"], "train_step_seconds": row["train_step_ms"] / 1e3,
            "inference_seconds": row["inference_ms_per_molecule"] / 1e3,
            "train_compile_seconds": row["train_compile_seconds"],
            "inference_compile_seconds": row["inference_compile_seconds"]}


def ours_budget(job: dict, run_dir: str) -> dict:
    import jax
    import numpy as np

    from phisnet_jax import train as training
    from phisnet_jax.data import SplitSpec, load_splits
    from phisnet_jax.evaluate import load_trained_model, predict_matrices

    cfg = model_config(job["preset"], tuple(job["elements"]), job["basis"])
    tcfg = training.TrainConfig(batch_size=job["batch_size"], validate_every=job["validate_every"],
                                lr_schedule=job["lr_schedule"])
    dcfg = training.DataConfig(job["dataset"], (job["molecule"],), job["train"], job["valid"])
    result = training.train(run_dir, cfg, tcfg, dcfg, time_budget=job["budget"] - (time.time() - job["launched"]),
                            progress=False)
    trained = time.time()
    test = load_splits(job["dataset"], [job["molecule"]], cfg, SplitSpec(job["train"], job["valid"]))["test"]
    model = load_trained_model(run_dir)
    fock, overlap = predict_matrices(model, test.inputs)
    return {"steps": result.steps, "stopped_because": result.stopped_because, "trained": trained,
            "learning_rate": result.learning_rate,
            "parameters": int(sum(x.size for x in jax.tree.leaves(model.params))),
            "predictions": {"fock": np.asarray(fock, np.float64), "overlap": np.asarray(overlap, np.float64)}}


def child(job: dict, out_path: str) -> None:
    import numpy as np

    work = os.path.dirname(out_path)
    if job["mode"] == "speed":
        out = (ours_speed if job["code"] == "ours" else original_speed)(job)
    else:
        out = ours_budget(job, os.path.join(work, "run")) if job["code"] == "ours" else original_budget(job)
        np.savez(arrays_path(out_path), **out.pop("predictions"))
    out["peak_rss_mib"] = peak_rss_mib()
    with open(out_path, "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------------------------
# The harness.


def header(args, benchmark: str) -> dict:
    return harness.header(__file__, benchmark, args.phisnet, PACKAGES["original"])


def speed(args, job: dict) -> None:
    results = {}
    for preset in args.configs:
        row = {}
        for code in CODES:
            raw = launch(__file__, dict(job, code=code, preset=preset))
            row[code] = {k: v for k, v in raw.items() if k != "launched"}
            print(json.dumps({"config": preset, "code": code, **row[code]}), flush=True)
        row["train_step_ratio"] = row["ours"]["train_step_seconds"] / row["original"]["train_step_seconds"]
        row["inference_ratio"] = row["ours"]["inference_seconds"] / row["original"]["inference_seconds"]
        results[preset] = row
    first = results[args.configs[0]]
    out = header(args, "peer_phisnet") | {
        "molecule": MOLECULE, "basis": job["basis"], "batch": args.batch, "repeats": args.repeats,
        "train_step_ratio": first["train_step_ratio"], "inference_ratio": first["inference_ratio"],
        "ratios_config": args.configs[0], "configs": results,
    }
    write_result("peer_phisnet", args.label, out)
    print(json.dumps({k: out[k] for k in ("train_step_ratio", "inference_ratio")}))


def budget(args, job: dict) -> None:
    import hashlib

    import numpy as np

    from molfoundation.errors import InputError
    from phisnet_jax.data import SplitSpec, load_splits
    from phisnet_jax.dataset import read_file_info, read_molecule
    from phisnet_jax.evaluate import matrix_accuracy

    info = read_file_info(args.dataset)
    group = read_molecule(args.dataset, args.molecule, fields=("positions",))
    elements = sorted({int(z) for z in group.atomic_numbers})
    cfg = model_config(args.preset, tuple(elements), info.level.basis)
    test = load_splits(args.dataset, [args.molecule], cfg, SplitSpec(args.train, args.valid))["test"]
    # Rows of runs made apart (each code in its own environment) share a file only if they
    # trained on the same geometries: the file records a digest of them (to 1e-6 bohr). Adding
    # 0.0 turns -0.0 into 0.0: a planar molecule's out-of-plane coordinates are round-off around
    # zero whose sign differs between builds of the same libraries.
    digest = hashlib.sha256((np.round(group.arrays["positions"], 6) + 0.0).tobytes()).hexdigest()
    settings = {
        "budget_seconds": args.seconds,
        "dataset": {"level": dataclasses.asdict(info.level), "molecule": args.molecule, "positions_sha256": digest},
        "preset": args.preset, "split": {"train": args.train, "valid": args.valid, "test": len(test), "seed": SPLIT_SEED},
        "batch_size": args.batch_size, "validate_every": args.validate_every,
    }
    path = harness.result_path("budget_water", args.label)
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        if {k: record.get(k) for k in settings} != settings:
            raise InputError(f"{path} holds runs of other settings or data; give another --label")
        rows = {code: record[code] for code in CODES if code in record}
    job = dict(job, dataset=os.path.abspath(args.dataset), molecule=args.molecule, basis=info.level.basis,
               elements=elements, budget=args.seconds, train=args.train, valid=args.valid,
               batch_size=args.batch_size, validate_every=args.validate_every, lr_schedule=args.schedule)
    for code in args.codes:
        raw = launch(__file__, dict(job, code=code))
        predictions = raw.pop("arrays")
        metrics = matrix_accuracy(predictions["fock"], predictions["overlap"], test.fock, test.overlap,
                                  test.inputs.ao_mask.sum(axis=-1), test.n_occupied)
        row = {k: v for k, v in raw.items() if k not in ("launched", "trained", "first_step")}
        row.update(train_seconds=raw["trained"] - raw["launched"], mae_f_uha=metrics["fock_mae_uha"],
                   mae_eps_uha=metrics["orbital_energy_mae_uha"], psi=metrics["orbital_cosine_similarity"],
                   mae_s=metrics["overlap_mae"], test_samples=metrics["samples"])
        if code == "ours":
            row["lr_schedule"] = args.schedule
        environment = harness.header(__file__, "budget_water", args.phisnet if code == "original" else None,
                                     PACKAGES[code])
        row["environment"] = {k: v for k, v in environment.items() if k != "benchmark"} | {"finished": time.time()}
        rows[code] = row
        print(json.dumps({"code": code, **row}), flush=True)
        out = {"benchmark": "budget_water", "commands": [rows[c]["environment"]["command"] for c in CODES if c in rows],
               **settings, **rows}
        if len(rows) == len(CODES):
            out["mae_f_ratio"] = rows["ours"]["mae_f_uha"] / rows["original"]["mae_f_uha"]
        write_result("budget_water", args.label, out)  # after each code: a failure later keeps this row


def main():
    if run_child(child):
        return
    from molfoundation.errors import InputError
    from phisnet_jax.model import MODEL_PRESETS

    parser, subs = mode_parsers(__doc__.splitlines()[0], "phisnet", "path of the original's source (the directory with nn/)",
                                optional_in=("budget",))
    subs["speed"].add_argument("--configs", nargs="+", default=["paper", "small"], choices=sorted(MODEL_PRESETS))
    subs["speed"].add_argument("--batch", type=int, default=50, help="molecules per training step (the paper's for water)")
    subs["speed"].add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
    sub = subs["budget"]
    sub.add_argument("--dataset", required=True, help="HDF5 reference data (phisnet generate)")
    sub.add_argument("--molecule", default=MOLECULE, help="group in the dataset")
    sub.add_argument("--preset", default="small", choices=sorted(MODEL_PRESETS))
    sub.add_argument("--seconds", type=float, default=5400.0, help="wall-clock budget of each training")
    sub.add_argument("--train", type=int, default=500)
    sub.add_argument("--valid", type=int, default=500)
    sub.add_argument("--batch-size", type=int, default=10)
    sub.add_argument("--validate-every", type=int, default=500)
    sub.add_argument("--codes", nargs="+", default=list(CODES), choices=CODES,
                     help="which codes to run (rows of another run with the same settings and data are kept)")
    sub.add_argument("--schedule", default="plateau", choices=("plateau", "budget"),
                     help="this project's learning-rate schedule (phisnet_jax.train.TrainConfig.lr_schedule)")
    args = parser.parse_args()
    if args.mode == "speed" or "original" in args.codes:
        if not args.phisnet or not os.path.isfile(os.path.join(args.phisnet, "nn", "neural_network.py")):
            parser.error(f"--phisnet {args.phisnet} holds no PhiSNet source (nn/neural_network.py)")
    job = {"peer": args.phisnet and os.path.abspath(args.phisnet), "mode": args.mode, "basis": "def2-svp",
           "batch": getattr(args, "batch", None), "repeats": getattr(args, "repeats", None),
           "preset": getattr(args, "preset", None)}
    try:
        speed(args, job) if args.mode == "speed" else budget(args, job)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
