"""Shared fixtures: pyscf calculations are cached per test session.

JAX's persistent compilation cache is switched on (before jax is imported anywhere) so that
identical computations compiled again, by another closure or a CLI subprocess, load from disk.
The tests compile far more than they run, so XLA compiles them without LLVM's optimisations
(backend optimisation level 0): the suite took 8 min 46 s instead of 12 min 31 s on 2 cores,
every test passing either way. Subprocesses inherit both settings.
"""

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
# Loading a cached executable makes XLA's C++ logger warn on stderr; CLI tests read stderr.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from molfoundation import molecules
from phisnet_jax.reference import LevelOfTheory, run_scf


NAMED_GEOMETRIES = os.path.join(os.path.dirname(__file__), "fixtures", "named_geometries.json")


@functools.lru_cache(maxsize=None)
def start_geometry(name: str) -> molecules.Molecule:
    """RDKit/MMFF geometry of a named molecule (``molecules.from_name``), read from
    tests/fixtures/named_geometries.json, so that the tests that need only a geometry also run
    where RDKit is absent (the device check); test_sampling checks the file against RDKit."""
    with open(NAMED_GEOMETRIES) as f:
        geometry = json.load(f)[name]
    return molecules.Molecule(np.asarray(geometry["atomic_numbers"], dtype=np.int64),
                              np.asarray(geometry["positions_bohr"], dtype=np.float64))


def rotated(molecule: molecules.Molecule, rotation: np.ndarray) -> molecules.Molecule:
    """The molecule with positions x -> x @ R.T (rotated about the origin)."""
    return molecule.with_positions(molecule.positions @ rotation.T)


def random_rotation(seed: int, proper: bool = True) -> np.ndarray:
    R = Rotation.random(random_state=seed).as_matrix()
    return R if proper else -R


def scf_fock(molecule: molecules.Molecule, level: LevelOfTheory):
    """Converged (Fock, overlap, mo_energies) at a tight threshold."""
    mf = run_scf(molecule, level)
    assert mf.converged
    return np.asarray(mf.get_fock()), np.asarray(mf.get_ovlp()), np.asarray(mf.mo_energy)


@pytest.fixture(scope="session")
def hf_tight():
    return lambda basis: LevelOfTheory(method="hf", basis=basis, conv_tol=1e-12, conv_tol_grad=1e-8)


def log_lines(run_dir):
    """The JSON lines of a VMC run directory's log.jsonl."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# The longest test files (each 1.5-5 minutes of a fresh run on 2 cores) are handed out first:
# make test's two workers take whole files (--dist loadfile) in collection order, and a long
# file started last leaves the other worker idle until it ends.
LONGEST_FIRST = ("test_vmc_shared.py", "test_vmc_train.py", "test_train.py", "test_generate.py", "test_tour.py",
                 "test_vmc_optim.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays


def assert_vmc_logs_agree(one, two):
    """Two VMC logs (entries paired in order) hold the same losses, energies, variances and
    acceptances to 1e-8 relative: the same float64 run on another device layout."""
    for a, b in zip(one, two):
        for key in ("loss", "energy", "variance", "acceptance"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-8, abs=1e-10), (a, b)


def without_timings(entries):
    return [{k: v for k, v in e.items() if k not in ("seconds", "time")} for e in entries]


def _run_cli(main, args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def run_vmc_cli(args, capsys):
    """(exit code, stdout, stderr) of the ``vmc`` command line run in-process."""
    from vmc import cli

    return _run_cli(cli.main, args, capsys)


def run_phisnet_cli(args, capsys):
    """(exit code, stdout, stderr) of the ``phisnet`` command line run in-process (the
    subprocess entry point ``python -m phisnet_jax`` is exercised by tests/test_generate.py)."""
    from phisnet_jax import cli

    return _run_cli(cli.main, args, capsys)


class ProcessGroupRun:
    """``python -m ARGS`` started as every process of one multi-process run
    (:mod:`molfoundation.distributed`): ``n_processes`` processes on ``devices_per_process``
    forced CPU devices each, joined through a coordinator on 127.0.0.1 and gloo collectives."""

    def __init__(self, args: list[str], n_processes: int = 2, devices_per_process: int = 1):
        with socket.socket() as s:  # a free port for the coordinator
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        group = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n_processes)]
        env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"]
                   + f" --xla_force_host_platform_device_count={devices_per_process}")
        self.processes = [subprocess.Popen([sys.executable, "-m", *args, *group, "--process-id", str(i)], env=env,
                                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                          for i in range(n_processes)]

    def wait(self, timeout: float = 600) -> list[subprocess.CompletedProcess]:
        done = []
        for process in self.processes:
            out, err = process.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
        return done

    def stop(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


class _CompileEvents(logging.Handler):
    """JAX's ``jax_log_compiles`` messages as (event, function name, whether in the main
    thread): "lowered" when jit lowers a function for new argument types, "compiled" when XLA
    compiles the lowered program (or loads it from the persistent cache)."""

    PATTERNS = {"lowered": re.compile(r"Compiling jit\((\w+)\) with global shapes"),
                "compiled": re.compile(r"Finished XLA compilation of jit\((\w+)\)")}

    def __init__(self):
        super().__init__()
        self.events = []

    def emit(self, record):
        for event, pattern in self.PATTERNS.items():
            match = pattern.match(record.getMessage())
            if match:
                self.events.append((event, match[1], record.thread == threading.main_thread().ident))


@contextlib.contextmanager
def compile_events():
    """The list of (event, name, in main thread) of every lowering and compilation in all
    threads while inside (:class:`_CompileEvents`)."""
    import jax

    handler, logger = _CompileEvents(), logging.getLogger("jax")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # jax_log_compiles' level, whatever the root logger's is
    jax.config.update("jax_log_compiles", True)  # global, not per thread
    try:
        yield handler.events
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.setLevel(level)
        logger.removeHandler(handler)


@contextlib.contextmanager
def background_for(request, test_name: str, start):
    """``start()`` (a :class:`ProcessGroupRun`) while the module's tests run if ``test_name`` is
    among the selected tests, else None; stopped (killed if still running) at the end of the
    module."""
    selected = any(item.originalname == test_name for item in request.session.items)
    run = start() if selected else None
    try:
        yield run
    finally:
        if run is not None:
            run.stop()


def interrupt_at_random_moment(args: list[str], log_path: str, signal_number: int, seed: int,
                               last_line: int) -> tuple[bool, subprocess.CompletedProcess]:
    """Run ``python -m ARGS`` and send it ``signal_number`` at a random moment of its training:
    once its log has a number of lines drawn (with ``seed``) between one more than it has now
    and ``last_line``, plus a random fraction of a step. Returns (whether it was still running
    when signalled, the finished process)."""
    rng = random.Random(seed)

    def lines() -> int:
        if not os.path.exists(log_path):
            return 0
        with open(log_path) as f:
            return sum(1 for _ in f)

    target = rng.randint(lines() + 1, last_line)
    process = subprocess.Popen([sys.executable, "-m", *args], text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while process.poll() is None and lines() < target and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.02))
    alive = process.poll() is None
    if alive:
        process.send_signal(signal_number)
    out, err = process.communicate(timeout=600)
    return alive, subprocess.CompletedProcess(process.args, process.returncode, out, err)


def sigint_then_kill_9(args: list[str], log_path: str, last_line: int, seeds: tuple[int, int]) -> None:
    """``python -m ARGS`` stopped by SIGINT (exit 130) and, started again, by SIGKILL, each at a
    random moment of its training (:func:`interrupt_at_random_moment`)."""
    import signal

    for seed, signal_number, code in ((seeds[0], signal.SIGINT, 130), (seeds[1], signal.SIGKILL, -signal.SIGKILL)):
        alive, out = interrupt_at_random_moment(args, log_path, signal_number, seed, last_line)
        assert alive and out.returncode == code, out.stderr[-3000:]


def assert_same_checkpoints(run_a: str, run_b: str, phases: tuple[str, ...]) -> None:
    """The newest checkpoint of every phase is the same state, bit for bit, in both runs."""
    import jax
    import numpy as np

    from molfoundation import checkpoints

    for phase in phases:
        a, b = (checkpoints.restore_raw(os.path.join(r, "checkpoints", phase)) for r in (run_a, run_b))
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def reuse_problems(monkeypatch, *problems) -> None:
    """``vmc.train.Problem.build`` returns one of ``problems`` (already compiled) when asked for
    its configuration and systems, so that CLI tests run in-process do not trace and compile
    the same functions again; any other request builds a new problem."""
    from vmc import train

    build = train.Problem.build

    def build_or_reuse(config, system_set=None, progress=True):
        for problem in problems:
            if problem.config == config and (system_set is None or train.same_systems(problem.system_set, system_set)):
                return problem
        return build(config, system_set, progress)

    monkeypatch.setattr(train.Problem, "build", build_or_reuse)


def directory_digest(path: str) -> dict[str, str]:
    """SHA-256 of every file under ``path``, by relative path."""
    digests = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                digests[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return digests
