"""Trained VMC wavefunctions shipped inside the package, loadable by name: base models to
fine-tune (``vmc finetune NAME SYSTEMS``) or to evaluate zero-shot (``vmc evaluate NAME
--systems ...``).

A shipped model is a directory ``vmc/models/<name>/`` (stored as :mod:`molfoundation.shipped`
describes) of four files:

- ``model.json``: ``kind`` and ``schema_version`` (this module reads version ``SCHEMA_VERSION``
  only), the run configuration (network, sampling, optimiser, orbitals), the VMC step of the
  parameters, and its card: the systems, the commands that made it, the energies of a fresh
  evaluation with blocking error bars, and the check values below;
- ``params.npz``: the parameters;
- ``systems.xyz``: the systems the model was trained on (the run's own file);
- ``check.npz``: electron configurations sampled from the model on its first system, with
  log|psi| and the local energy there (hartree), which the test suite reproduces.

``vmc export RUN_DIR NAME`` writes one from a run directory; wherever a base run directory is
accepted, a name that is no existing path and names a shipped model loads that model.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from molfoundation import runs
from molfoundation.errors import InputError
from molfoundation.shipped import ModelShelf
from vmc.config import RunConfig

KIND, SCHEMA_VERSION = "vmc model", 2
CHECK_FILE = "check.npz"
MODELS = ModelShelf(KIND, SCHEMA_VERSION, os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))


def load_config(name: str) -> RunConfig:
    return RunConfig.from_record(MODELS.read_record(name)["config"])


def load_systems(name: str) -> list:
    """The systems the shipped model ``name`` was trained on."""
    from vmc.system_sets import read_system_set
    from vmc.train import SYSTEMS_FILE

    return read_system_set(MODELS.path(name, SYSTEMS_FILE))


def load_params(name: str):
    """(network config, parameters, where they come from) of the shipped model ``name``."""
    record = MODELS.read_record(name)
    config = RunConfig.from_record(record["config"])
    with runs.precision(config.vmc.float64):
        params = jax.tree.map(jnp.asarray, MODELS.read_params(name))
    return config.ansatz, params, f"shipped model {name} (vmc step {record['step']})"


def check_values(config: RunConfig, params, system, walkers, problem=None) -> tuple[np.ndarray, np.ndarray]:
    """(log|psi| (W,), local energies (W,) in hartree) of the wavefunction ``params`` of
    ``config`` on ``system`` at the electron configurations ``walkers`` (W, n_el, 3) bohr;
    ``problem``: a :class:`vmc.train.Problem` of ``system`` built before (reused)."""
    from vmc.geometries import GeometryBatch, over_batch
    from vmc.train import Problem

    with runs.precision(config.vmc.float64):
        problem = problem or Problem.build(config, [system], progress=False)
        group = problem.groups[0]
        batch = GeometryBatch(jnp.asarray(walkers, runs.float_dtype(config.vmc.float64))[None], group.geometries)
        log_psi = jax.jit(over_batch(problem.functions.log_psi))(params, batch)[0]
        energies = problem.local_energy(params, batch)[0]
    return np.asarray(log_psi, np.float64), np.asarray(energies, np.float64)


def export(run_dir: str, name: str, made_by: str, eval_steps: int = 200, burn_in: int | None = None,
           check_walkers: int = 16, shelf: ModelShelf | None = None, progress: bool = True) -> dict:
    """Write the latest parameters of the VMC run ``run_dir`` as the shipped model ``name`` (onto
    ``shelf``, default the package's), with its card; returns the record. ``made_by``: the
    command that made the run. The card's energies come from a fresh evaluation of
    ``eval_steps`` MCMC calls on each of the run's systems (after ``burn_in``, default as
    :func:`vmc.evaluate.evaluate_run`'s); ``check_walkers`` configurations
    sampled on its first system go into ``check.npz``."""
    from vmc.config import load_config as load_run_config
    from vmc.config import run_directory
    from vmc.evaluate import evaluate_run, load_model
    from vmc.train import SYSTEMS_FILE, Problem, run_systems

    config = load_run_config(run_dir)
    step = run_directory(run_dir).latest_step("vmc")
    if step is None:
        raise InputError(f"{run_dir} has no VMC checkpoint yet: nothing to ship")
    params = load_model(run_dir, step)[1]
    evaluation = evaluate_run(run_dir, n_steps=eval_steps, burn_in_sweeps=burn_in, progress=progress, step=step)
    system = run_systems(run_dir, config)[0]
    check_config = dataclasses.replace(config, vmc=dataclasses.replace(config.vmc, n_walkers=check_walkers))
    with runs.precision(config.vmc.float64):
        problem = Problem.build(check_config, [system], progress=False)
        walkers = problem.sample_walkers(problem.groups[0], params, config.vmc.burn_in_sweeps + 20,
                                         jax.random.PRNGKey(0))[0]
    log_psi, energies = check_values(config, params, system, walkers, problem)
    record = {
        "config": runs.as_json(dataclasses.replace(config, init_from=None).to_record()),
        "step": step,
        "card": {
            "systems": config.systems.spec, "made_by": made_by,
            "evaluation": runs.as_json(dataclasses.asdict(evaluation)),
            "check": {"system": system.name, "walkers": check_walkers,
                      "mean_local_energy": float(energies.mean()), "mean_log_psi": float(log_psi.mean())},
        },
    }
    shelf = shelf or MODELS
    shelf.write(name, record, params, {CHECK_FILE: {"walkers": walkers, "log_psi": log_psi, "local_energy": energies}},
                copies={SYSTEMS_FILE: os.path.join(run_dir, SYSTEMS_FILE)})
    return record
