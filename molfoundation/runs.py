"""The run layer both pillars train through.

A run directory holds

- ``config.json``: the resolved configuration, stamped with the ``kind`` of run and the
  ``schema_version`` of its format; a directory of another kind or version is refused with a
  one-line error that names what it holds and what this version reads;
- ``log.jsonl``: one JSON object per logged step, each with its ``phase``, ``step`` and
  ``time`` (Unix seconds when the step's line was written: wall-clock per step, checkpoints
  and logging included, is the difference of consecutive lines). When a
  phase starts or resumes, lines written after the checkpoint it starts from (and lines of
  later phases) are dropped, so a log never repeats a step and never keeps a line torn by a
  kill;
- ``checkpoints/<phase>``: orbax checkpoints of the whole training state (:mod:`checkpoints`);
- plots drawn from the log.

:class:`Phase` runs a step function to a step total or a time budget with a progress bar and
checkpoints periodically and on the way out; Ctrl-C (SIGINT) during a phase ends it after the
step in progress, with that step logged and saved, and raises KeyboardInterrupt, so the
command line exits with code 130 (a second Ctrl-C interrupts at once);
when a step raises :class:`molfoundation.errors.TrainingDiverged` the last checkpoint is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from molfoundation import checkpoints, distributed
from molfoundation.blas_threads import one_blas_thread
from molfoundation.errors import InputError, TrainingDiverged

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"


def write_json(path: str, record: Any) -> None:
    """Write ``record`` to ``path`` atomically: a reader sees the old file or the new one. In
    a multi-process run only process 0 writes (:mod:`molfoundation.distributed`)."""
    if not distributed.is_writer():
        return
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


def as_json(record: Any) -> Any:
    """``record`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(record))


def precision(float64: bool):
    """float64 (JAX's x64 mode) for the duration of a block when asked for."""
    return jax.enable_x64(True) if float64 else contextlib.nullcontext()


def float_dtype(float64: bool):
    return jnp.float64 if float64 else jnp.float32


class RunDirectory:
    """A run directory of one ``kind`` of run (``label``: its name in messages) whose
    configuration format is ``schema_version``; ``phases``: its training phases in the order
    they run (log lines carry them)."""

    def __init__(self, path: str, kind: str, label: str, schema_version: int, phases: tuple[str, ...]):
        self.path, self.kind, self.label = path, kind, label
        self.schema_version, self.phases = schema_version, phases

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, CONFIG_FILE)

    @property
    def log_path(self) -> str:
        return os.path.join(self.path, LOG_FILE)

    def has_config(self) -> bool:
        return os.path.isfile(self.config_path)

    def read_config(self) -> dict:
        """The stored configuration record (without the stamp). InputError if there is none, it
        does not parse, or it is of another kind or schema version."""
        if not self.has_config():
            raise InputError(f"{self.path} is not a {self.label} run directory (no {CONFIG_FILE})")
        try:
            with open(self.config_path) as f:
                record = json.load(f)
        except ValueError as exc:
            raise InputError(f"corrupt run configuration {self.config_path}: {exc}") from None
        if not isinstance(record, dict):
            raise InputError(f"corrupt run configuration {self.config_path}: not a JSON object")
        kind, version = record.pop("kind", None), record.pop("schema_version", None)
        if kind != self.kind:
            raise InputError(f"{self.path} holds a {kind or 'unknown'} run, not a {self.label} run")
        if version != self.schema_version:
            made = "an unversioned configuration" if version is None else f"schema version {version}"
            raise InputError(f"{self.path} holds {made}; this version of the code reads {self.label} "
                             f"runs of schema version {self.schema_version} (start a new run directory)")
        return record

    def parse_config(self, from_record: Callable[[dict], Any]) -> Any:
        """``from_record`` of the stored configuration; a record it cannot take is an InputError."""
        record = self.read_config()
        try:
            return from_record(record)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"corrupt run configuration {self.config_path}: {exc}") from None

    def check(self, record: dict, ignore: Iterable[str] = ()) -> None:
        """InputError if the directory holds a run other than the one ``record`` describes
        (keys in ``ignore`` aside); nothing if it holds this run or none."""
        if self.has_config():
            stored = {k: v for k, v in self.read_config().items() if k not in ignore}
            if stored != as_json({k: v for k, v in record.items() if k not in ignore}):
                raise InputError(f"{self.path} holds a run with another configuration; use a new run directory")

    def claim(self, record: dict, ignore: Iterable[str] = ()) -> None:
        """Make this the directory of the run ``record`` describes: :meth:`check`, then write
        ``config.json`` if there is none."""
        self.check(record, ignore)
        if self.has_config():
            return
        os.makedirs(self.path, exist_ok=True)
        write_json(self.config_path, {"kind": self.kind, "schema_version": self.schema_version, **record})

    def checkpoint_dir(self, phase: str) -> str:
        return os.path.join(self.path, "checkpoints", phase)

    def latest_step(self, phase: str) -> int | None:
        """The step of the newest checkpoint of ``phase``, None if there is none."""
        return checkpoints.latest_step(self.checkpoint_dir(phase))

    def restore(self, phase: str, template: Callable[[], Any], step: int | None = None) -> Any | None:
        """The newest state of ``phase``, or the one of ``step``; ``template()`` gives its
        shapes. None when the phase has not started; InputError when its checkpoints are
        missing although the log shows that it ran (a phase saves its step-0 state before it
        logs anything), when ``step`` has no checkpoint, or when the state cannot be read."""
        state = checkpoints.restore_latest(self.checkpoint_dir(phase), template, step)
        if state is None:
            order = self.phases.index(phase)
            if any(self.phases.index(e["phase"]) >= order for e in self.read_log()):
                raise InputError(f"the {phase} checkpoints of {self.path} are missing, but its log shows that "
                                 f"{phase} ran; restore them or start a new run directory")
        return state

    def read_log(self, phase: str | None = None) -> list[dict]:
        """The log's entries (of ``phase`` only, if given); a line torn by a kill is skipped."""
        if not os.path.exists(self.log_path):
            return []
        entries = []
        with open(self.log_path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if phase is None or entry.get("phase") == phase:
                    entries.append(entry)
        return entries

    def trim_log(self, phase: str, step: int) -> None:
        """Keep the entries of earlier phases and those of ``phase`` up to ``step``: what was
        logged after the checkpoint that ``phase`` continues from goes."""
        if not os.path.exists(self.log_path) or not distributed.is_writer():
            return
        order = self.phases.index(phase)
        kept = [e for e in self.read_log() if self.phases.index(e["phase"]) < order
                or (e["phase"] == phase and e["step"] <= step)]
        with open(self.log_path + ".tmp", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in kept)
        os.replace(self.log_path + ".tmp", self.log_path)


def is_deleted(tree) -> bool:
    """Whether any array of ``tree`` was donated to a computation (and is gone)."""
    return any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(tree))


def all_finite(tree) -> jax.Array:
    """Scalar bool: every element of every leaf of ``tree`` is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@contextlib.contextmanager
def deferred_interrupt():
    """Within the block, the first SIGINT only sets the flag yielded (a list that becomes
    non-empty) and the handler before the block comes back, so a second one acts at once. An
    interrupt that arrives while Python runs a callback of its own (garbage collection, say)
    would otherwise be lost; here the caller acts on it at a point of its choosing."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = signal.getsignal(signal.SIGINT)

    def request(signum, frame):
        requested.append(signum)
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, request)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


class Phase:
    """One training phase of a run: ``total`` steps (None: no limit) or until ``time_budget``
    seconds after ``started`` (a ``time.perf_counter()`` value; default now), checkpoints
    every ``checkpoint_every`` steps, a progress bar showing the keys ``shown`` of the newest
    log entry. The steps run with the BLAS libraries on one thread
    (:func:`molfoundation.blas_threads.one_blas_thread`)."""

    def __init__(self, run: RunDirectory, name: str, total: int | None, *, checkpoint_every: int,
                 time_budget: float | None = None, started: float | None = None, progress: bool = True,
                 shown: tuple[str, ...] = ("loss",)):
        self.run, self.name, self.total, self.checkpoint_every = run, name, total, checkpoint_every
        self.time_budget, self.shown, self.progress = time_budget, shown, progress
        self.started = time.perf_counter() if started is None else started

    def elapsed(self) -> float:
        """Seconds since ``started``, by process 0's clock in a multi-process run: the processes
        must take the same decisions (stop at the same step, set the same learning rate), as
        each waits for the others in every step."""
        seconds = time.perf_counter() - self.started
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            seconds = float(multihost_utils.broadcast_one_to_all(np.asarray(seconds)))
        return seconds

    def out_of_time(self) -> bool:
        return self.time_budget is not None and self.elapsed() >= self.time_budget

    def __call__(self, state, step_fn: Callable, stop: Callable | None = None) -> tuple[Any, str]:
        """Run ``step_fn(state) -> (state, log entries)`` from ``state`` (whose ``step`` is the
        phase's step count) until the step total, the time budget, or ``stop(state)`` returns
        a reason. Returns (state, why it stopped: "max_steps", "time_budget" or the reason)."""
        from tqdm import tqdm

        run = self.run
        run.trim_log(self.name, int(state.step))
        manager = checkpoints.manager(run.checkpoint_dir(self.name))

        def save(state):
            if int(state.step) != manager.latest_step():
                checkpoints.save(manager, state, int(state.step))

        if manager.latest_step() is None:
            save(state)  # the state the phase starts from: a resume before the first periodic checkpoint

        bar = tqdm(total=self.total, initial=int(state.step), desc=self.name, unit="step", file=sys.stderr,
                   disable=None if self.progress else True, dynamic_ncols=True)
        stopped = "max_steps"
        try:
            # Every process computes the same entries; process 0 writes them.
            with (open(run.log_path if distributed.is_writer() else os.devnull, "a") as log,
                  deferred_interrupt() as interrupted, one_blas_thread()):
                while self.total is None or int(state.step) < self.total:
                    if self.out_of_time():
                        stopped = "time_budget"
                        break
                    reason = stop(state) if stop is not None else None
                    if reason is not None:
                        stopped = reason
                        break
                    new, entries = step_fn(state)
                    now = time.time()
                    log.writelines(json.dumps({"phase": self.name, **e, "time": now}) + "\n" for e in entries)
                    log.flush()
                    state = new  # logged: from here on, a checkpoint of it matches the log
                    bar.update(1)
                    if entries:
                        bar.set_postfix({k: f"{entries[-1][k]:.5g}" for k in self.shown
                                         if isinstance(entries[-1].get(k), (int, float))})
                    if int(state.step) % self.checkpoint_every == 0:
                        save(state)
                    if interrupted:
                        raise KeyboardInterrupt
        except TrainingDiverged as exc:
            # The failed step may have consumed (donated) the last state: keep the checkpoint.
            raise TrainingDiverged(f"{exc}; the last checkpoint ({self.name} step "
                                   f"{manager.latest_step()}) is kept") from None
        except KeyboardInterrupt:
            if not is_deleted(state):
                save(state)
            raise
        else:
            save(state)
        finally:
            bar.close()
        return state, stopped


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib's object interface: the caller's plotting backend is left alone).


def figure(width: float = 6.0, height: float = 4.0):
    """A new (figure, axes) pair that draws without pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def save_figure(fig, path: str) -> None:
    """Write ``fig`` as a PNG (process 0 alone in a multi-process run)."""
    if not distributed.is_writer():
        return
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def running_mean(values: np.ndarray, parts: int = 20) -> tuple[int, np.ndarray]:
    """(window, means over ``window`` consecutive values): a window of 1/``parts`` of the
    series; the means belong to the window's last element onwards."""
    window = max(1, len(values) // parts)
    return window, np.convolve(values, np.ones(window) / window, mode="valid")
