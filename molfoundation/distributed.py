"""Several processes (hosts) training one model: joining them, and which of them writes.

A multi-process run starts the same command once per process (per host, or per GPU), each
told the coordinator's address, the number of processes and its own index, or, on a cluster
JAX knows (SLURM, Open MPI), none of them. :func:`join` connects it with
``jax.distributed.initialize``; from then on ``jax.devices()`` lists the devices of every
process, :class:`molfoundation.sharding.FirstAxisSharding` splits batches and walkers over all
of them, and every process runs every step on its own slice. On CPUs the processes exchange
their partial results through gloo (JAX's CPU collectives), so the same code runs on a laptop's
two processes and on a cluster's hosts.

Files: every process computes the same logged values and reaches the same checkpoints (orbax
writes a checkpoint together from all processes); everything else in a run directory (its
configuration, log, plots, side files) is written by process 0 alone (:func:`is_writer`). The
run directory must be on a file system all processes share.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from molfoundation.errors import InputError


@dataclass(frozen=True)
class ProcessGroup:
    """Where a process belongs: the coordinator's ``host:port`` (process 0 listens there), the
    number of processes and this one's index; ``cluster``: take whatever is None from the
    cluster's environment (SLURM, Open MPI) instead."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cluster: bool = False

    @property
    def requested(self) -> bool:
        return self.cluster or any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))


def join(group: ProcessGroup) -> None:
    """Join the processes of ``group`` (nothing when none is requested). InputError when the
    group is incomplete or inconsistent."""
    if not group.requested:
        return
    if not group.cluster:
        missing = [name for name, value in (("coordinator", group.coordinator),
                                            ("number of processes", group.num_processes),
                                            ("process id", group.process_id)) if value is None]
        if missing:
            raise InputError(f"a multi-process run needs the coordinator, the number of processes and the process "
                             f"id (or --cluster); missing: {', '.join(missing)}")
    if group.num_processes is not None and group.num_processes < 1:
        raise InputError(f"the number of processes must be at least 1, not {group.num_processes}")
    if group.process_id is not None and group.num_processes is not None and not (
            0 <= group.process_id < group.num_processes):
        raise InputError(f"process id {group.process_id} is not in 0..{group.num_processes - 1}")
    # CPU devices of different processes talk through gloo; GPUs use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=group.coordinator, num_processes=group.num_processes,
                               process_id=group.process_id)


def is_writer() -> bool:
    """Whether this process writes the run directory's files other than checkpoints."""
    return jax.process_index() == 0
