"""The BLAS libraries' own thread pools, beside XLA's.

On CPU, XLA runs a compiled program on a pool of one thread per core, and hands its LAPACK
calls (Cholesky, LU, eigh) to jaxlib's kernels, which call the BLAS that scipy ships. That
BLAS (OpenBLAS in scipy's wheels) starts its own pool of one thread per core for a call, and
its threads spin for a while after the call returns: they take the cores from XLA's threads.
A VMC step with KFAC, whose factor inverses (one Cholesky per factor) are recomputed every 4th
step, took 40.9 ms against 31.7 ms with the BLAS on one thread, and 45.5 against 32.3 ms with
the inverses recomputed every step (LiH small preset, 2 CPU cores; experiments/blas_threads.py):
the steps after a recomputation were slow too. A LAPACK call inside an XLA program already runs
on one of XLA's threads, so one BLAS thread loses nothing.
"""

import contextlib
import importlib

import threadpoolctl


@contextlib.contextmanager
def one_blas_thread():
    """Within the block, every loaded BLAS library computes on one thread (its setting is put
    back on leaving). For code that runs XLA programs on the CPU; host-side numpy and pyscf
    work inside the block also runs on one BLAS thread."""
    # Loads the BLAS that jaxlib's LAPACK kernels call (they take scipy's LAPACK), so that the
    # limit covers it even before the first program with a LAPACK call is compiled.
    importlib.import_module("scipy.linalg")
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield
