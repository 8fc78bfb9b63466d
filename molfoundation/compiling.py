"""Compilation for functions a run calls once, where compile time, not run time, is what counts."""

import jax

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
