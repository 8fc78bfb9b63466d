"""Compile time: functions a run calls once, and compiled programs kept on disk between runs."""

import os
import threading

import jax

# Compiled programs of all runs, least recently used dropped first beyond this size.
_CACHE_BYTES = 4 << 30

# XLA's backend (LLVM) optimisations off: the code runs once, so optimising it only costs time.
_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}


def jit_once(fn, **jit_options):
    """``jax.jit(fn, **jit_options)``, compiled without XLA's backend optimisations.

    For parameter initialisation: every parameter's random draw is its own kernel, and
    optimising a few hundred of them took longer than anything else a short run compiles
    (time to the first parameters on 2 CPU cores, nothing cached: PhiSNet's small preset 64 s
    optimised against 33 s, the VMC small preset 9.0 s against 5.0 s;
    experiments/init_compile.py). The draws are the same; only the rounding of their
    floating-point transformation may differ from an optimised build (by 1.2e-7 in float32)."""
    return jax.jit(fn, compiler_options=_RUN_ONCE_OPTIONS, **jit_options)


def use_persistent_cache() -> str | None:
    """Keep compiled programs on disk, so that a resumed or repeated run skips compiling them.

    The directory is ``$JAX_COMPILATION_CACHE_DIR`` when that is set (JAX's own setting; set
    empty, no cache), else ``molfoundation/jax`` under ``$XDG_CACHE_HOME`` (``~/.cache``).
    Programs that compiled in under a second are not kept (JAX's default); beyond 4 GiB the
    least recently used go. A run still traces its functions (the cache key is the program),
    so a cache hit saves the compilation only. Returns the directory, or None when off."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        directory = os.environ["JAX_COMPILATION_CACHE_DIR"] or None
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        directory = os.path.join(base, "molfoundation", "jax")
    if directory is not None:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_compilation_cache_max_size", _CACHE_BYTES)
    return directory


def can_compile_ahead() -> bool:
    """Whether a run may compile its step with :func:`compile_ahead`: in a single process only
    (where processes compile together, one compiling in a thread is untried)."""
    return jax.process_count() == 1


def compile_ahead(calls) -> "Background":
    """Compiles jitted functions for exactly the arguments of ``calls``, a sequence of
    ``(jitted, args)``, while the calling thread goes on: each is traced and lowered here,
    and XLA compiles the lowered programs in a :class:`Background` thread (returned; the
    caller waits for it). A later ``jitted(*args)`` with arguments of the same shapes,
    dtypes and placement finds its program compiled (jit's caches are shared by the AOT path
    and all threads, keyed also by the x64 mode, which the thread therefore takes from the
    calling thread). Tracing stays in the calling thread because JAX's tracing is not safe in
    two threads at once (two traces through the same custom-JVP function can collide).

    What overlaps is the compilation with the calling thread's tracing and computing: XLA's
    CPU compilations in one process mostly wait for one another (on 2 CPU cores a one-add
    program compiled in the calling thread took 0.5-2.7 s instead of 0.02 s while a 7 s
    program compiled in the thread; experiments/results/compile_overlap_cpu.json): what the
    calling thread compiles meanwhile waits."""
    lowered = [jitted.lower(*args) for jitted, args in calls]
    x64 = jax.config.jax_enable_x64  # this thread's, which may differ from the process's

    def compile_all():
        with jax.enable_x64(x64):
            return [program.compile() for program in lowered]

    return Background(compile_all)


class Background:
    """``fn(*args)`` run in another thread from construction; :meth:`result` waits for it and
    returns its value or raises its exception.

    For compiling ahead while the calling thread computes: XLA compiles without holding
    Python's GIL, and compiled programs land in jit's caches, which all threads share. JAX's
    configuration contexts (``jax.enable_x64`` and the like) are per thread: ``fn`` enters the
    ones it needs itself. The caller must :meth:`wait` before its process exits, also after an
    error or Ctrl-C: a process that ends while the thread is inside XLA crashes. A daemon
    thread, so that a second Ctrl-C, which interrupts that wait, still ends the process."""

    def __init__(self, fn, *args):
        self._outcome: tuple = ()
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args):
        try:
            self._outcome = (True, fn(*args))
        except BaseException as error:  # re-raised in the thread that asks for the result
            self._outcome = (False, error)

    def wait(self) -> None:
        """Waits for ``fn`` to end, whatever its outcome."""
        self._thread.join()

    def result(self):
        self.wait()
        done, value = self._outcome
        if not done:
            raise value
        return value
