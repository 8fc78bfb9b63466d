"""Keeps kfac-jax 0.0.8 working on newer JAX releases.

kfac-jax 0.0.8 (the newest release) was written against JAX up to 0.9.1. Two later changes in
JAX break it, each at exactly one call site inside kfac-jax:

1. From JAX 0.9.2 on, ``Primitive.get_bind_params(params)`` returns only the bind parameters,
   where it used to return a pair ``(subfuns, params)``. kfac-jax's graph matcher unpacks the
   pair in ``kfac_jax._src.tag_graph_matcher.eval_jaxpr_eqn`` (the function its tracer uses to
   re-evaluate every equation of the traced loss), so the first KFAC step fails with "too many
   values to unpack". :func:`eval_jaxpr_eqn` below is the same evaluation with an adapter,
   :func:`split_bind_params`, that accepts both forms.
2. JAX 0.10 removed ``jax.device_put_replicated``, which kfac-jax calls in
   ``kfac_jax._src.utils.parallel.replicate_all_local_devices`` (used by its multi-device path
   and its staged accumulators). :func:`device_put_replicated` re-creates that function from
   public API, and :func:`replicate_all_local_devices` is kfac-jax's function with it.

:func:`ensure_compatible` installs those replacements into kfac-jax's modules, each only when
the running JAX needs it (decided by behaviour: what ``get_bind_params`` returns and whether
``jax.device_put_replicated`` exists, not by version strings), and only once. On JAX 0.9.1 it
changes nothing. Call it before building a KFAC optimiser; :mod:`vmc.optimizers` does.

Nothing else of kfac-jax is touched; newer JAX releases may need more, which the KFAC tests
(run on the GPU image's JAX as well as on the pinned one) are there to reveal.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

# Set on every function this module installs, so that a second call recognises its own work.
_MARK = "_vmc_kfac_compat"
# Axis name of the replicated arrays' mesh; the same name JAX's own function used, so the
# shardings compare equal to what kfac-jax got from JAX 0.9.
REPLICATION_AXIS = "_device_put_replicated"


# --- 1. Primitive.get_bind_params -------------------------------------------------------------


def split_bind_params(result: Any) -> tuple[Sequence[Any], dict]:
    """``(subfuns, params)`` from the value of ``Primitive.get_bind_params``, in either form:
    the pair of JAX <= 0.9.1 or the bare params dict of JAX >= 0.9.2 (which then has no
    sub-functions: call-like primitives carry their jaxpr in the params instead)."""
    if isinstance(result, dict):
        return [], result
    subfuns, params = result
    return subfuns, params


def eval_jaxpr_eqn(eqn, in_values: list) -> list:
    """Outputs (a list) of one jaxpr equation applied to ``in_values``; the same contract as
    kfac-jax's own ``tag_graph_matcher.eval_jaxpr_eqn``, for both forms of
    ``get_bind_params``."""
    subfuns, bind_params = split_bind_params(eqn.primitive.get_bind_params(eqn.params))
    # Binding inside the equation's user context keeps its source location in error messages,
    # as the original does.
    with jax.extend.source_info_util.user_context(eqn.source_info.traceback):
        output = eqn.primitive.bind(*subfuns, *in_values, **bind_params)
    return output if isinstance(output, list) else [output]


def get_bind_params_returns_pair() -> bool:
    """Whether this JAX's ``get_bind_params`` still returns ``(subfuns, params)``."""
    return not isinstance(jax.lax.add_p.get_bind_params({}), dict)


# --- 2. jax.device_put_replicated -------------------------------------------------------------


def _uses_legacy_pmap() -> bool:
    # JAX 0.9 switched pmap onto shard_map behind this flag; releases without the flag have
    # only the new pmap.
    if "jax_pmap_shmap_merge" in jax.config.values:
        return not jax.config.jax_pmap_shmap_merge
    return False


def device_put_replicated(tree: Any, devices: Sequence[Any]) -> Any:
    """Every leaf ``x`` of ``tree`` as an array of shape ``(len(devices),) + x.shape`` whose
    i-th slice lives on ``devices[i]``: what ``jax.device_put_replicated`` returned (and the
    input layout ``pmap`` expects), built from public API only.

    The sharding is the one JAX's own function chose: a one-axis mesh over ``devices`` when
    pmap runs on shard_map (the default since JAX 0.9), the legacy pmap sharding otherwise.
    """
    devices = list(devices)
    if not devices:
        raise ValueError("device_put_replicated needs a non-empty sequence of devices")
    n = len(devices)

    def replicate(x):
        x = jnp.asarray(x)
        stacked = jnp.broadcast_to(x[None], (n,) + x.shape)
        if _uses_legacy_pmap():
            # Deprecated together with the legacy pmap it serves; needed exactly as long as
            # that pmap is in use (kfac-jax switches it on when the flag exists).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                sharding = jax.sharding.PmapSharding.default(stacked.shape, 0, devices)
        else:
            mesh = jax.sharding.Mesh(np.array(devices), (REPLICATION_AXIS,))
            spec = jax.sharding.PartitionSpec(REPLICATION_AXIS)
            sharding = jax.sharding.NamedSharding(mesh, spec)
        return jax.device_put(stacked, sharding)

    return jax.tree_util.tree_map(replicate, tree)


def replicate_all_local_devices(obj: Any, axis_name: str | None = None) -> Any:
    """kfac-jax's ``utils.replicate_all_local_devices`` (same arguments and result) with
    :func:`device_put_replicated` in place of the removed JAX function."""
    if not jax.tree_util.tree_leaves(obj):
        return obj
    devices = jax.local_devices()
    if _uses_legacy_pmap() or axis_name is None:
        return device_put_replicated(obj, devices)
    # With a named pmap axis the mesh must carry that name, or pmap rejects the sharding.
    mesh = jax.sharding.Mesh(np.array(devices), (axis_name,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(jnp.stack([jnp.asarray(x)] * len(devices)), sharding), obj
    )


def has_device_put_replicated() -> bool:
    """Whether this JAX still provides ``jax.device_put_replicated``."""
    # JAX 0.9 warns on any access to the deprecated name; asking must not warn.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return hasattr(jax, "device_put_replicated")


# --- installation -----------------------------------------------------------------------------


def _mark(fn):
    setattr(fn, _MARK, True)
    return fn


_mark(eval_jaxpr_eqn)
_mark(replicate_all_local_devices)


def is_patched(fn) -> bool:
    """Whether ``fn`` is one of this module's replacements."""
    return getattr(fn, _MARK, False)


def ensure_compatible(force: bool = False) -> list[str]:
    """Install the replacements into kfac-jax where this JAX needs them; idempotent.

    Args:
        force: install both replacements even where this JAX does not need them (they are
            behaviour-preserving there); for tests of the installed path on an old JAX.

    Returns:
        The kfac-jax attributes replaced by this call (empty when nothing was needed or all was
        already done), e.g. ``["tag_graph_matcher.eval_jaxpr_eqn"]``.
    """
    from kfac_jax._src import tag_graph_matcher
    from kfac_jax._src import utils as kfac_utils
    from kfac_jax._src.utils import parallel

    replaced = []
    # kfac-jax's tracer calls ``tag_graph_matcher.eval_jaxpr_eqn`` through the module
    # attribute, so replacing the attribute reaches every caller.
    if (force or not get_bind_params_returns_pair()) and not is_patched(
        tag_graph_matcher.eval_jaxpr_eqn
    ):
        tag_graph_matcher.eval_jaxpr_eqn = eval_jaxpr_eqn
        replaced.append("tag_graph_matcher.eval_jaxpr_eqn")
    # Callers inside kfac-jax go through ``parallel.``; the package also re-exports the
    # function under ``kfac_jax.utils``, bound at import time, so that name is replaced too.
    if (force or not has_device_put_replicated()) and not is_patched(
        parallel.replicate_all_local_devices
    ):
        parallel.replicate_all_local_devices = replicate_all_local_devices
        kfac_utils.replicate_all_local_devices = replicate_all_local_devices
        replaced.append("utils.parallel.replicate_all_local_devices")
    return replaced
