"""The BLAS thread pools while XLA programs run: one thread inside a training phase, as started
outside it (threadpoolctl's reading of each library's own thread count)."""

import importlib
import os
from typing import NamedTuple

import jax.numpy as jnp
import pytest
import threadpoolctl

from molfoundation import runs
from molfoundation.blas_threads import one_blas_thread


def blas_threads() -> dict[str, int]:
    return {lib["filepath"]: lib["num_threads"] for lib in threadpoolctl.threadpool_info()
            if lib["user_api"] == "blas"}


@pytest.fixture(scope="module")
def started():
    importlib.import_module("scipy.linalg")  # the BLAS under jaxlib's LAPACK kernels, loaded
    threads = blas_threads()
    if max(threads.values()) == 1:
        pytest.skip("the BLAS libraries start with one thread here (one core or a limit set outside)")
    return threads


def test_one_blas_thread_limits_every_library_and_restores(started):
    with one_blas_thread():
        inside = blas_threads()
    assert set(inside) == set(started)
    assert set(inside.values()) == {1}
    assert blas_threads() == started


class Counter(NamedTuple):
    step: jnp.ndarray


def test_phase_steps_run_on_one_blas_thread(started, tmp_path):
    run = runs.RunDirectory(str(tmp_path), "test", "test", 1, ("phase",))
    seen = []

    def step_fn(state):
        seen.append(blas_threads())
        return Counter(state.step + 1), [{"step": int(state.step) + 1}]

    final, stopped = runs.Phase(run, "phase", 2, checkpoint_every=10, progress=False)(
        Counter(jnp.zeros((), jnp.int32)), step_fn)
    assert (int(final.step), stopped) == (2, "max_steps")
    assert [set(s) for s in seen] == [set(started)] * 2
    assert all(set(s.values()) == {1} for s in seen)
    assert blas_threads() == started
    assert os.path.getsize(run.log_path) > 0
