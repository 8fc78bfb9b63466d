"""Trained PhiSNet models shipped inside the package, loadable by name.

A shipped model is a directory ``phisnet_jax/models/<name>/`` (stored as
:mod:`molfoundation.shipped` describes) of three files:

- ``model.json``: ``kind`` and ``schema_version`` (this module reads version
  ``SCHEMA_VERSION`` only), the model and training configurations, the training step, the
  interatomic distances it was trained on, and its card: the data, the commands that made it,
  its metrics on the run's test split, and the metrics on the samples of ``check.npz``;
- ``params.npz``: the EMA parameters;
- ``check.npz``: a few held-out samples (padded model inputs, reference F and S, occupied
  orbitals) on which the test suite reproduces the card's check metrics.

``phisnet export RUN_DIR NAME`` writes one from a training run; ``load_trained_model(NAME)``
(and every command that takes a run directory) loads it when no directory of that name exists.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from molfoundation import runs
from molfoundation.errors import InputError
from molfoundation.shipped import ModelShelf

KIND, SCHEMA_VERSION = "phisnet model", 2
CHECK_FILE = "check.npz"
MODELS = ModelShelf(KIND, SCHEMA_VERSION, os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))


def load_shipped(name: str):
    """The shipped model ``name`` as a ``TrainedModel``."""
    from phisnet_jax.evaluate import TrainedModel
    from phisnet_jax.model import PhiSNetConfig, make_phisnet
    from phisnet_jax.train import TrainConfig

    record = MODELS.read_record(name)
    model_cfg = PhiSNetConfig(**{**record["model"], "elements": tuple(record["model"]["elements"])})
    train_cfg = TrainConfig(**record["train"])
    params = MODELS.read_params(name)
    with runs.precision(train_cfg.float64):
        params = jax.tree.map(lambda x: jax.numpy.asarray(x), params)
    return TrainedModel(model_cfg, train_cfg, make_phisnet(model_cfg), params, int(record["step"]),
                        record["distance_ranges"])


def level_of_theory(name: str):
    """The ``LevelOfTheory`` of the data the shipped model ``name`` was trained on."""
    from phisnet_jax.reference import LevelOfTheory

    return LevelOfTheory(*MODELS.read_record(name)["card"]["data"]["level_of_theory"].split("/"))


def check_data(name: str):
    """The held-out samples of a shipped model's ``check.npz`` as ``HamiltonianData``."""
    from phisnet_jax.data import HamiltonianData
    from phisnet_jax.model import MoleculeInputs

    arrays = MODELS.read_arrays(name, CHECK_FILE)
    fields = [f.name for f in dataclasses.fields(MoleculeInputs)]
    n = arrays["fock"].shape[0]
    return HamiltonianData(MoleculeInputs(**{k: arrays[k] for k in fields}), arrays["fock"], arrays["overlap"],
                           arrays["n_occupied"], np.zeros(n, np.int64), np.arange(n), ("check",))


def export(run_dir: str, name: str, made_by: str, n_check: int = 5, shelf: ModelShelf | None = None) -> dict:
    """Write the latest EMA parameters of a training run as the shipped model ``name`` (onto
    ``shelf``, default the package's), with its card; returns the record. ``made_by``: the
    commands that made the run (data generation and training). The card's metrics are those of
    the run's test split, and of its first ``n_check`` test samples, which go into ``check.npz``."""
    from phisnet_jax.dataset import read_file_info
    from phisnet_jax.evaluate import accuracy, load_trained_model, run_split
    from phisnet_jax.train import load_run_config

    trained = load_trained_model(run_dir)
    _, _, data_cfg = load_run_config(run_dir)
    test = run_split(trained.config, data_cfg, "test")
    if len(test) < n_check:
        raise InputError(f"the test split of {run_dir} has {len(test)} samples, fewer than {n_check}")
    check = test.take(np.arange(n_check))
    level = read_file_info(data_cfg.dataset).level
    record = {
        "model": runs.as_json(dataclasses.asdict(trained.config)),
        "train": runs.as_json(dataclasses.asdict(trained.train_config)),
        "step": trained.step, "distance_ranges": trained.distance_ranges,
        "card": {
            "data": {"level_of_theory": f"{level.method}/{level.basis}", "molecules": list(data_cfg.molecules),
                     "n_train": data_cfg.n_train, "n_valid": data_cfg.n_valid, "split_seed": data_cfg.split_seed},
            "made_by": made_by,
            "test_metrics": accuracy(trained, test),
            "check_metrics": accuracy(trained, check),
        },
    }
    check_arrays = {**{k: np.asarray(v) for k, v in vars(check.inputs).items()},
                    "fock": check.fock, "overlap": check.overlap, "n_occupied": check.n_occupied}
    (shelf or MODELS).write(name, record, trained.params, {CHECK_FILE: check_arrays})
    return record
