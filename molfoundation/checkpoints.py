"""Orbax checkpoints of whole training states, shared by both pillars.

A checkpoint directory keeps the two newest states. States are restored replicated over this
process's devices, whatever topology saved them; callers re-shard what they split."""

from __future__ import annotations

import os
from typing import Any, Callable

import jax

from molfoundation.errors import InputError
from molfoundation.sharding import FirstAxisSharding


def manager(directory: str):
    """An orbax CheckpointManager for ``directory`` (created if missing)."""
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )


def latest_step(directory: str) -> int | None:
    """The step of the newest checkpoint in ``directory``, None if there is none."""
    if not os.path.isdir(directory):
        return None
    return manager(directory).latest_step()


def restore_latest(directory: str, template: Callable[[], Any]) -> Any | None:
    """The newest state in ``directory`` (None if there is none). ``template()`` gives the
    state's structure, shapes and dtypes (e.g. through ``jax.eval_shape``); it is only called
    when there is a checkpoint to restore."""
    import orbax.checkpoint as ocp

    step = latest_step(directory)
    if step is None:
        return None
    replicated = FirstAxisSharding("restore").replicated
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), template())
    try:
        return manager(directory).restore(step, args=ocp.args.StandardRestore(target))
    except Exception as exc:
        raise InputError(f"cannot restore checkpoint {step} in {directory}: {str(exc).splitlines()[0]}") from None


def restore_raw(directory: str) -> dict:
    """The newest state in ``directory`` as saved (nested dicts of arrays), without a template."""
    import orbax.checkpoint as ocp

    step = latest_step(directory)
    if step is None:
        raise InputError(f"no checkpoint in {directory}")
    try:
        return manager(directory).restore(step, args=ocp.args.StandardRestore())
    except Exception as exc:
        raise InputError(f"cannot read checkpoint {step} in {directory}: {str(exc).splitlines()[0]}") from None


def save(checkpoint_manager, state, step: int) -> None:
    """Save ``state`` as ``step`` and wait until it is on disk."""
    import orbax.checkpoint as ocp

    checkpoint_manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
    checkpoint_manager.wait_until_finished()
