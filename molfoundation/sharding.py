"""Data parallelism shared by both pillars: arrays split along their first axis over all
devices of all processes (one process per host after ``jax.distributed.initialize()``),
everything else replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class FirstAxisSharding:
    """A one-dimensional mesh over every device; ``split`` shards axis 0 over it,
    ``replicated`` copies to every device."""

    def __init__(self, axis: str):
        self.mesh = Mesh(np.array(jax.devices()), (axis,))
        self.split = NamedSharding(self.mesh, PartitionSpec(axis))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    def put_split(self, tree, axis: int = 0):
        """Global arrays sharded along ``axis`` (default 0) from the full arrays every process
        holds: each process contributes its own contiguous slice."""
        n_processes, process = jax.process_count(), jax.process_index()
        sharding = self.split if axis == 0 else NamedSharding(
            self.mesh, PartitionSpec(*([None] * axis), self.mesh.axis_names[0]))

        def put(x):
            if _spans_processes(x):  # already a global array: resharded on the devices
                return jax.device_put(x, sharding)
            x = np.asarray(x)
            local = np.array_split(x, n_processes, axis=axis)[process] if n_processes > 1 else x
            return jax.make_array_from_process_local_data(sharding, local, x.shape)

        return jax.tree.map(put, tree)

    def replicate(self, tree):
        """Copies on every device of every process; each process passes the same values."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)
        # Across processes an array is assembled from host data that every process holds.
        return jax.tree.map(lambda x: jax.device_put(x, self.replicated) if _spans_processes(x) else
                            jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree)


def _spans_processes(x) -> bool:
    """Whether ``x`` is a jax.Array with shards on other processes' devices."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable
