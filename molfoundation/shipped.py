"""Trained models shipped inside a package, loadable by name: the storage both pillars share.

A shipped model is a directory ``<package>/models/<name>/`` holding ``model.json`` (its
``kind``, ``schema_version``, configuration and model card), ``params.npz`` (one array per
parameter path "a/b/c") and whatever other ``.npz`` files the pillar's format names (held-out
samples on which the test suite reproduces the card). Each pillar states its kind and schema
version in one :class:`ModelShelf`; a record of another kind or version is refused with the
version this code reads, never half-read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np

from molfoundation import runs
from molfoundation.errors import InputError

MODEL_FILE, PARAMS_FILE = "model.json", "params.npz"


def flatten_params(params) -> dict[str, np.ndarray]:
    """A nested dict of arrays as {"a/b/c": array}."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in leaves}


def unflatten_params(arrays) -> dict:
    """The inverse of :func:`flatten_params` (``arrays``: a mapping or an open ``.npz``)."""
    params: dict = {}
    for key in arrays:
        *parents, leaf = key.split("/")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.asarray(arrays[key])
    return params


@dataclasses.dataclass(frozen=True)
class ModelShelf:
    """The shipped models of one ``kind`` (schema ``schema_version``) in ``directory``."""

    kind: str
    schema_version: int
    directory: str

    def names(self) -> list[str]:
        """The names of the models on this shelf."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(n for n in os.listdir(self.directory)
                      if os.path.isfile(os.path.join(self.directory, n, MODEL_FILE)))

    def has(self, name: str) -> bool:
        return name in self.names()

    def is_shipped(self, run_or_name: str) -> bool:
        """Whether ``run_or_name``, where a run directory or a model name is accepted, means a
        model on this shelf: no such path exists and a model has that name."""
        return not os.path.exists(run_or_name) and self.has(run_or_name)

    def path(self, name: str, file: str) -> str:
        return os.path.join(self.directory, name, file)

    def read_record(self, name: str) -> dict:
        """The ``model.json`` record of ``name``; InputError for another kind or version."""
        path = self.path(name, MODEL_FILE)
        with open(path) as f:
            record = json.load(f)
        if record.get("kind") != self.kind or record.get("schema_version") != self.schema_version:
            raise InputError(f"{path} is a {record.get('kind')} of schema version {record.get('schema_version')}; "
                             f"this version of the code reads {self.kind}s of schema version {self.schema_version}")
        return record

    def read_arrays(self, name: str, file: str) -> dict[str, np.ndarray]:
        with np.load(self.path(name, file)) as z:
            return {k: z[k] for k in z.files}

    def read_params(self, name: str) -> dict:
        """The parameters of ``name`` as a nested dict of numpy arrays."""
        return unflatten_params(self.read_arrays(name, PARAMS_FILE))

    def write(self, name: str, record: dict, params, arrays: dict[str, dict[str, np.ndarray]],
              copies: dict[str, str] | None = None) -> None:
        """Write the model ``name``: ``record`` (kind and schema version added) as ``model.json``,
        ``params``, each entry of ``arrays`` ({file name: {key: array}}) and a copy of each file
        of ``copies`` ({file name: source path}). The directory is assembled next to its place
        and moved there whole, replacing an older one."""
        target = os.path.join(self.directory, name)
        tmp = target + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        np.savez(os.path.join(tmp, PARAMS_FILE), **flatten_params(params))
        for file, content in arrays.items():
            np.savez(os.path.join(tmp, file), **content)
        for file, source in (copies or {}).items():
            shutil.copyfile(source, os.path.join(tmp, file))
        runs.write_json(os.path.join(tmp, MODEL_FILE),
                        {"kind": self.kind, "schema_version": self.schema_version, "name": name, **record})
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
