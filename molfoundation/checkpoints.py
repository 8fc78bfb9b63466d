"""Orbax checkpoints of whole training states, shared by both pillars.

A checkpoint directory keeps the two newest states. States are restored replicated over this
process's devices, whatever topology saved them; callers re-shard what they split.

Layout of a saved state: orbax spends about 2 ms per array it writes, and a training state
holds hundreds of small ones (the VMC state of the small preset: 383 arrays, 0.71 s a save
array by array, 0.05 s packed; experiments/checkpoint_speed.py). So every array that is
replicated (the same on every device: parameters, optimiser state, counters) is written into
one flat array per dtype, ``packed/<dtype>``; the arrays split over devices (walkers) stay
arrays of their own, ``split/<i>``; ``layout`` is a JSON record (as bytes) of each leaf's key
path, shape, dtype and place, from which :func:`restore_raw` rebuilds the state without a
template."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable

import jax
import numpy as np

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
    saved = _restore(directory, step)
    if saved is None:
        return None
    expected = template()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
    layout = _read_layout(saved)
    if [entry["path"] for entry in layout] != [_path_names(path) for path, _ in leaves]:
        raise InputError(f"the checkpoint in {directory} holds another state than this run's "
                         f"({len(layout)} arrays, expected {len(leaves)})")
    restored = _unpack(saved, layout)
    for entry, (_, want), got in zip(layout, leaves, restored):
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise InputError(f"the checkpoint in {directory} holds {'/'.join(entry['path'])} as "
                             f"{got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}")
    return jax.tree_util.tree_unflatten(treedef, restored)


def restore_raw(directory: str, step: int | None = None) -> dict:
    """The newest state in ``directory``, or the one of ``step``, as saved (nested dicts of
    arrays), without a template."""
    saved = _restore(directory, step)
    if saved is None:
        raise InputError(f"no checkpoint in {directory}")
    layout = _read_layout(saved)
    state: dict = {}
    for entry, leaf in zip(layout, _unpack(saved, layout)):
        *parents, name = entry["path"]
        node = state
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = leaf
    return state


def _path_names(path) -> list[str]:
    """A leaf's key path as names: dict keys, dataclass fields and sequence indices."""
    names = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                names.append(str(getattr(key, attribute)))
                break
        else:
            raise TypeError(f"cannot name the key {key!r} of a checkpointed state")
    return names


def _host(x) -> np.ndarray:
    """A replicated array's value on this host (one local copy; every process has one)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def _pack(state) -> dict:
    """``state`` in the saved layout (module docstring)."""
    layout, packed, split = [], {}, {}
    sizes: dict[str, int] = {}  # elements packed so far, per dtype
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        entry = {"path": _path_names(path), "shape": list(np.shape(leaf))}
        if isinstance(leaf, jax.Array) and not leaf.is_fully_replicated:
            entry.update(dtype=str(leaf.dtype), split=str(len(split)))
            split[entry["split"]] = leaf
        else:
            value = _host(leaf)
            chunks = packed.setdefault(str(value.dtype), [])
            entry.update(dtype=str(value.dtype), offset=sizes.get(str(value.dtype), 0))
            sizes[str(value.dtype)] = entry["offset"] + value.size
            chunks.append(value.ravel())
        layout.append(entry)
    saved = {"layout": np.frombuffer(json.dumps(layout).encode(), np.uint8)}
    if packed:
        saved["packed"] = {dtype: np.concatenate(chunks) for dtype, chunks in packed.items()}
    if split:
        saved["split"] = split
    return saved


def _read_layout(saved: dict) -> list[dict]:
    return json.loads(_host(saved["layout"]).tobytes().decode())


def _unpack(saved: dict, layout: list[dict]) -> list[jax.Array]:
    """The state's leaves, in flattening order, replicated over this process's devices."""
    replicated = FirstAxisSharding("restore").replicated
    packed = {dtype: _host(flat) for dtype, flat in saved.get("packed", {}).items()}
    leaves = []
    for entry in layout:
        if "split" in entry:
            leaves.append(saved["split"][entry["split"]])
            continue
        size = int(np.prod(entry["shape"], dtype=int))
        value = packed[entry["dtype"]][entry["offset"]:entry["offset"] + size].reshape(entry["shape"])
        leaves.append(jax.make_array_from_callback(value.shape, replicated, lambda index, v=value: v[index]))
    return leaves


def _restore(directory: str, step: int | None) -> Any | None:
    """The saved form (:func:`_pack`) of checkpoint ``step`` of ``directory``, the newest if
    None (None if there is none), every array replicated here whatever topology saved it; if
    it cannot be read, an InputError that says why and whether an older checkpoint there can
    (never restored silently in its place)."""
    import orbax.checkpoint as ocp

    def restore_args():
        return ocp.args.StandardRestore(fallback_sharding=FirstAxisSharding("restore").replicated)

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

    checkpoint_manager.save(int(step), args=ocp.args.StandardSave(_pack(state)), force=True)
    checkpoint_manager.wait_until_finished()
