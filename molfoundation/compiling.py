"""Compilation for functions a run calls once, where compile time, not run time, is what counts."""

import jax

# XLA's backend (LLVM) optimisations off: the code runs once, so optimising it only costs time.
_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}


def jit_once(fn, **jit_options):
    """``jax.jit(fn, **jit_options)``, compiled without XLA's backend optimisations.

    For parameter initialisation: every parameter's random draw is its own kernel, and
    optimising a few hundred of them took longer than anything else a short run compiles
    (2 CPU cores, from an empty compilation cache: PhiSNet's small preset 76 s against 36 s, the
    VMC tiny preset 9.0 s against 2.7 s). The values drawn are the same integers through the
    same functions; only floating-point rounding of the transformed draws may differ from an
    optimised build."""
    return jax.jit(fn, compiler_options=_RUN_ONCE_OPTIONS, **jit_options)
