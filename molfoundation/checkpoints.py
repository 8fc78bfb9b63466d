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
    if not os.path.isdir(directory):
        return None
    return manager(directory).latest_step()


def restore_latest(directory: str, template: Callable[[], Any]) -> Any | None:
    """The newest state in ``directory`` (None if there is none). ``template()`` gives the
    state's structure, shapes and dtypes (e.g. through ``jax.eval_shape``); it is only called
    when there is a checkpoint to restore."""
    import orbax.checkpoint as ocp

    @functools.cache
    def restore_args():
        replicated = FirstAxisSharding("restore").replicated
        return ocp.args.StandardRestore(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), template()))

    return _restore_newest(directory, restore_args)


def restore_raw(directory: str) -> dict:
    """The newest state in ``directory`` as saved (nested dicts of arrays), without a template."""
    import orbax.checkpoint as ocp

    state = _restore_newest(directory, ocp.args.StandardRestore)
    if state is None:
        raise InputError(f"no checkpoint in {directory}")
    return state


def _restore_newest(directory: str, restore_args: Callable[[], Any]) -> Any | None:
    """The newest checkpoint of ``directory`` (None if there is none); if it cannot be read,
    an InputError that says why and whether an older checkpoint there can (never restored
    silently in its place)."""
    if not os.path.isdir(directory):
        return None
    checkpoint_manager = manager(directory)
    steps = sorted(checkpoint_manager.all_steps(), reverse=True)
    if not steps:
        return None
    newest, *older = steps
    _quiet_abandoned_reads()
    try:
        return checkpoint_manager.restore(newest, args=restore_args())
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        reason = reason if len(reason) <= 200 else reason[:200] + "..."  # storage errors quote whole specs
        message = f"cannot restore checkpoint {newest} in {directory}: {reason}"
    for step in older:
        try:
            checkpoint_manager.restore(step, args=restore_args())
        except Exception:
            continue
        message += (f"; checkpoint {step} there is intact: to go back to it, delete "
                    f"{os.path.join(directory, str(newest))} (a training run then resumes from step {step})")
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
