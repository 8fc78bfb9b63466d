"""Orbax checkpoints of whole training states, shared by both pillars.

A checkpoint directory keeps the two newest states. States are restored replicated over this
process's devices, whatever topology saved them; callers re-shard what they split."""

from __future__ import annotations

import functools
import logging
import os
import sys
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
    return max(all_steps(directory), default=None)


def all_steps(directory: str) -> list[int]:
    """The steps of the checkpoints in ``directory``, ascending (empty if none)."""
    if not os.path.isdir(directory):
        return []
    return sorted(manager(directory).all_steps())


def restore_latest(directory: str, template: Callable[[], Any], step: int | None = None) -> Any | None:
    """The newest state in ``directory``, or the one of ``step`` (None if there is none).
    ``template()`` gives the state's structure, shapes and dtypes (e.g. through
    ``jax.eval_shape``); it is only called when there is a checkpoint to restore."""
    import orbax.checkpoint as ocp

    @functools.cache
    def restore_args():
        replicated = FirstAxisSharding("restore").replicated
        return ocp.args.StandardRestore(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), template()))

    return _restore(directory, restore_args, step)


def restore_raw(directory: str, step: int | None = None) -> dict:
    """The newest state in ``directory``, or the one of ``step``, as saved (nested dicts of
    arrays), without a template."""
    import orbax.checkpoint as ocp

    # Replicated here, whatever topology (number of processes and devices) saved it.
    replicated = FirstAxisSharding("restore").replicated
    state = _restore(directory, lambda: ocp.args.StandardRestore(fallback_sharding=replicated), step)
    if state is None:
        raise InputError(f"no checkpoint in {directory}")
    return state


def _restore(directory: str, restore_args: Callable[[], Any], step: int | None) -> Any | None:
    """Checkpoint ``step`` of ``directory``, the newest if None (None if there is none); if it
    cannot be read, an InputError that says why and whether an older checkpoint there can
    (never restored silently in its place)."""
    if not os.path.isdir(directory):
        return None
    checkpoint_manager = manager(directory)
    steps = sorted(checkpoint_manager.all_steps())
    if step is not None and step not in steps:
        raise InputError(f"no checkpoint {step} in {directory} (there: {', '.join(map(str, steps)) or 'none'})")
    if not steps:
        return None
    wanted = steps[-1] if step is None else step
    _quiet_abandoned_reads()
    try:
        return checkpoint_manager.restore(wanted, args=restore_args())
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        reason = reason if len(reason) <= 200 else reason[:200] + "..."  # storage errors quote whole specs
        message = f"cannot restore checkpoint {wanted} in {directory}: {reason}"
    for older in reversed(steps):
        if older >= wanted:
            continue
        try:
            checkpoint_manager.restore(older, args=restore_args())
        except Exception:
            continue
        message += (f"; checkpoint {older} there is intact: load it explicitly (--checkpoint {older}), or delete "
                    f"{os.path.join(directory, str(wanted))} to resume training from step {older}")
        break
    raise InputError(message)


def _quiet_abandoned_reads() -> None:
    """When a restore fails, the checkpoint library closes its event loop while reads it
    started are still in flight. As they finish, the storage library's threads report each one
    (through ``sys.excepthook`` or ``sys.unraisablehook``: "Event loop is closed") and the
    garbage collector reports their failed tasks and futures (the ``asyncio`` logger: "Task
    exception was never retrieved", "Future exception ..."): dozens of tracebacks after the
    real error, through whichever channel the timing picks. Those reports, and only those, are
    dropped; installed once per process, before the first restore."""
    if getattr(sys.excepthook, "quiet_abandoned_reads", False):
        return

    def abandoned(exc) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, traceback):
        if not abandoned(value):
            previous_excepthook(kind, value, traceback)

    def unraisablehook(unraisable):
        if not abandoned(unraisable.exc_value):
            previous_unraisablehook(unraisable)

    def unretrieved_read(record: logging.LogRecord) -> bool:
        # a storage error quotes the tensorstore spec of the read that failed
        return not ("exception was never retrieved" in str(record.msg)
                    and record.exc_info is not None and "tensorstore_spec" in str(record.exc_info[1]))

    excepthook.quiet_abandoned_reads = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    logging.getLogger("asyncio").addFilter(unretrieved_read)


def save(checkpoint_manager, state, step: int) -> None:
    """Save ``state`` as ``step`` and wait until it is on disk."""
    import orbax.checkpoint as ocp

    checkpoint_manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
    checkpoint_manager.wait_until_finished()
