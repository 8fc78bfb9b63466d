"""Data parallelism shared by both pillars: global arrays split along their first axis over
all devices of all processes (one process per host after ``jax.distributed.initialize()``)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def device_mesh(axis: str) -> Mesh:
    """A one-dimensional mesh over every device of every process."""
    return Mesh(np.array(jax.devices()), (axis,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def split_first_axis(sharding: NamedSharding, x) -> jax.Array:
    """A global array sharded by ``sharding`` (along axis 0) from the full array ``x`` that
    every process holds: each process contributes its own contiguous slice."""
    x = np.asarray(x)
    n_processes = jax.process_count()
    local = np.array_split(x, n_processes)[jax.process_index()] if n_processes > 1 else x
    return jax.make_array_from_process_local_data(sharding, local, x.shape)
