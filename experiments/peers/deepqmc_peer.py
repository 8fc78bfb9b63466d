"""Benchmark: this project's VMC against DeepQMC, on the same machine, in the same run.

Both codes train the LiH benchmark of experiments/peers/vmc_benchmark.py (R = 3.015 bohr, 256 walkers,
10 Metropolis steps per update, 100 pretraining steps towards Hartree-Fock in STO-6G, 20
burn-in MCMC calls, KFAC, folx's forward Laplacian with dense Jacobians), each with its own
recommended optimiser settings: DeepQMC's FermiNet ansatz (its ``train_ferminet`` task:
``ansatz=ferminet``, ``decorr_metropolis_ferminet`` sampler, KFAC with learning rate
0.05 / (1 + t / 10000), damping 1e-3, norm constraint 1e-3) at the size of FermiNet's
comparison (--deepqmc-network: 2 interactions, embedding 64, pair stream 16, 4 determinants),
this project with its ``small`` preset (--ours-preset, --set). Every run is a fresh process,
the codes alternating; DeepQMC's runs as its own ``deepqmc`` command would, through its
configuration files, with a metric logger that takes the time of every training step instead
of writing TensorBoard files (its checkpoints and HDF5 log stay on).

``speed`` (experiments/results/peer_deepqmc[_<label>]_<platform>.json): --repeats runs of
--steps steps, with the keys of the FermiNet comparison (experiments/peers/ferminet.py):
``step_seconds``, ``startup_seconds``, ``compile_seconds``, ``trace_seconds``, ``parameters``
per code, ``step_ratio``, ``startup_ratio``, ``compile_ratio`` (ours / DeepQMC); ``versions``:
this project's environment, ``deepqmc.settings.versions``: DeepQMC's.

The peer is not part of this repository. DeepQMC 1.3.0 (PyPI) needs Python >= 3.12 and
JAX < 0.9, below this project's supported range, so it runs in an environment of its own,
whose interpreter --deepqmc-python names (this project's runs use the interpreter running this
script):

    python3.12 -m venv .venv-deepqmc && .venv-deepqmc/bin/pip install deepqmc==1.3.0
    .venv/bin/python experiments/peers/deepqmc_peer.py speed --deepqmc-python .venv-deepqmc/bin/python
"""

import importlib
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import harness  # noqa: E402
from harness import mode_parsers, run_child, write_result  # noqa: E402
from vmc_benchmark import (BURN_IN_CALLS, MCMC_STEPS, PRETRAIN_STEPS, WALKERS, add_arguments,  # noqa: E402
                           benchmark_system, compare_speed, ours_train, record_compile_time, system_record)

PEER_PACKAGES = ("deepqmc", "jax", "jaxlib", "kfac-jax", "folx", "dm-haiku")


# ----------------------------------------------------------------------------------------------
# Inside one measured process.


class StepStamps:
    """A DeepQMC metric logger (its ``MetricLogger`` protocol) that keeps the time and mean
    local energy of every training step; pretraining and equilibration updates carry a prefix
    and are left out."""

    def __init__(self, times: list, energies: list):
        self.times, self.energies = times, energies

    def __call__(self, workdir: str, n_mol: int) -> "StepStamps":
        return self

    def update(self, step, single_device_stats, multi_device_stats, mol_idxs, prefix=None):
        if prefix is None:
            self.times.append(time.time())
            # (molecules, electronic states): one of each here
            self.energies.append(float(np.asarray(single_device_stats["local_energy/mean"]).ravel()[0]))

    def close(self):
        pass


def deepqmc_overrides(job: dict) -> list[str]:
    """The ``deepqmc`` command line's configuration overrides of this benchmark."""
    interactions, embedding, pair, determinants = job["deepqmc_network"]
    gnn = "ansatz.omni_factory.gnn_factory"
    return [
        "task=train_ferminet", "ansatz=ferminet", "hamil=qc_forward_laplacian",
        "task/sampler_factory/elec_sampler=decorr_metropolis_ferminet",
        "hamil.mol.coords=" + json.dumps(benchmark_system("LiH").positions.tolist(), separators=(",", ":")),
        "hamil.mol.unit=bohr",
        f"task.electron_batch_size={WALKERS}", f"task.steps={job['steps']}",
        f"task.pretrain_steps={PRETRAIN_STEPS}", f"+task.max_eq_steps={BURN_IN_CALLS}",
        "+task.eq_allow_early_stopping=false", "task.seed=0",
        f"task.sampler_factory.elec_sampler.samplers.0.length={MCMC_STEPS}",
        f"ansatz.n_determinants={determinants}", f"ansatz.omni_factory.embedding_dim={embedding}",
        f"{gnn}.n_interactions={interactions}", f"{gnn}.two_particle_stream_dim={pair}",
    ]


def deepqmc_train(work: str, job: dict) -> dict:
    import importlib.metadata as md

    import jax
    from hydra import compose, initialize_config_module
    from hydra.utils import call
    from omegaconf import OmegaConf

    overrides = deepqmc_overrides(job)
    with initialize_config_module("deepqmc.conf", version_base=None):
        cfg = compose("config", overrides=overrides)
    os.makedirs(work)
    os.chdir(work)  # as the hydra application does
    cfg.task.workdir = work
    times, energies = [], []
    state = call(OmegaConf.to_object(cfg)["task"], _convert_="all", metric_logger_constructor=StepStamps(times, energies))
    return {"step_times": times, "energies": energies,
            "parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
            "settings": {"overrides": overrides, "versions": {name: md.version(name) for name in PEER_PACKAGES}}}


def child(job: dict, out_path: str) -> None:
    if job["code"] == "deepqmc":
        # Before JAX, as DeepQMC asks; it also registers its configuration resolvers.
        importlib.import_module("deepqmc")
    compile_seconds = record_compile_time()
    place = os.path.join(os.path.dirname(out_path), "run")
    out = (ours_train if job["code"] == "ours" else deepqmc_train)(place, job)
    out.update(trained=time.time(), compile_seconds=compile_seconds)
    with open(out_path, "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------------------------
# The harness.


def speed(args, job: dict) -> None:
    compared = compare_speed(__file__, job, "deepqmc", args.repeats, args.skip, peer_python=args.deepqmc_python)
    out = harness.header(__file__, "peer_deepqmc", None, ("jax", "jaxlib", "kfac-jax", "folx", "flax", "optax")) | {
        "system": system_record("LiH")} | compared
    out["command"] = harness.command_line(__file__, args.deepqmc_python)  # the interpreter as PEER
    write_result("peer_deepqmc", args.label, out)
    print(json.dumps({k: out[k] for k in ("step_ratio", "startup_ratio", "compile_ratio")}))


def main():
    if run_child(child):
        return
    parser, subs = mode_parsers(__doc__.splitlines()[0], "deepqmc-python",
                                "the Python interpreter of an environment with DeepQMC installed",
                                modes=("speed",))
    sub = subs["speed"]
    add_arguments(sub, "speed", systems=("LiH",))  # DeepQMC's configured molecule is LiH
    sub.add_argument("--deepqmc-network", type=int, nargs=4, default=[2, 64, 16, 4],
                     metavar=("INTERACTIONS", "EMBEDDING", "PAIR", "DETERMINANTS"))
    args = parser.parse_args()
    if not os.access(args.deepqmc_python, os.X_OK):
        parser.error(f"{args.deepqmc_python} is not an executable interpreter")
    if not 0 <= args.skip < args.steps - 1:
        parser.error("--skip must be below --steps - 1")
    speed(args, {"system": args.system, "ours_preset": args.ours_preset, "ours_settings": args.ours_settings,
                 "deepqmc_network": args.deepqmc_network, "steps": args.steps, "budget": None})


if __name__ == "__main__":
    main()
