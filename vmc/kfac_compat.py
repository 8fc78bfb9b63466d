"""Keeps kfac-jax 0.0.8 working on newer JAX releases.

kfac-jax 0.0.8 (the newest release) was written against JAX up to 0.9.1. Four later changes
in JAX break it:

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
3. JAX 0.11 merged ``ClosedJaxpr`` into ``Jaxpr`` (a jaxpr now carries its constants;
   ``jax.extend.core.ClosedJaxpr`` is ``Jaxpr`` itself), whose constructor no longer takes
   kfac-jax's ``ClosedJaxpr(jaxpr=..., consts=...)``. kfac-jax builds closed jaxprs that way in
   its graph matcher and its tracer. :class:`ClosedJaxpr` below accepts that call and returns
   the merged type; it is installed as the graph matcher's ``ClosedJaxpr`` and, through a view
   of ``jax.extend`` that differs in that one name, as the tracer's. The graph matcher's
   ``to_closed_jaxpr`` wraps any ``Jaxpr`` as a closed jaxpr without constants; now that every
   jaxpr is closed that would turn its constants into arguments, so it is replaced by
   :func:`to_closed_jaxpr`, which returns the jaxpr as it is.
4. JAX 0.11 and 0.12 removed names from ``jax.core`` that kfac-jax reads, some of them while
   its modules are imported (``jax.core.Effects`` in an annotation, ``jax.core.DebugInfo``):
   ``import kfac_jax`` itself fails. JAX still provides all of them, publicly, in
   ``jax.extend.core``; :func:`restore_jax_core_names` puts the missing ones back on
   ``jax.core`` (the same objects), which must happen before kfac-jax is first imported.

One more change concerns kfac-jax 0.0.8 on every JAX release:

5. Its tracer collects the inputs of all layer tags as ``list(set(...))`` of jaxpr variables,
   whose hashes are their ids, so their order, and with it the order of independent operations
   in the compiled KFAC step, differs from one process to the next. The results are the same,
   but the program's text is not, and JAX's persistent compilation cache, keyed by that text,
   never finds a KFAC step compiled by another process: every ``vmc train`` compiled its step
   anew. :class:`FirstSeenSet` is a set that iterates in the order its items were given; it is
   installed as the tracer module's ``set``.

:func:`ensure_compatible` installs those replacements, changes 1 to 4 each only when the
running JAX needs it (decided by behaviour: what ``get_bind_params`` returns, whether
``jax.device_put_replicated`` exists, whether ``ClosedJaxpr`` is ``Jaxpr``, which names
``jax.core`` lacks; not by version strings), change 5 always, and each only once. On JAX 0.9.1
it installs only change 5. Import kfac-jax through :func:`load` (which calls it first), never
with a plain ``import kfac_jax``.

Nothing else of kfac-jax is touched; newer JAX releases may need more, which the KFAC and VMC
training tests (run on the newest JAX as well as on the pinned one by ``make test``) are there
to reveal.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Sequence

import jax
import jax.extend
import jax.extend.core
import jax.numpy as jnp
import numpy as np

# Set on every function this module installs, so that a second call recognises its own work.
_MARK = "_vmc_kfac_compat"
# Axis name of the replicated arrays' mesh; the same name JAX's own function used, so the
# shardings compare equal to what kfac-jax got from JAX 0.9.
REPLICATION_AXIS = "_device_put_replicated"


def _mark(fn):
    setattr(fn, _MARK, True)
    return fn


# --- 3. ClosedJaxpr merged into Jaxpr --------------------------------------------------------


def closed_jaxpr_is_jaxpr() -> bool:
    """Whether this JAX has merged ``ClosedJaxpr`` into ``Jaxpr`` (JAX >= 0.11)."""
    return jax.extend.core.ClosedJaxpr is jax.extend.core.Jaxpr


class _ClosedJaxprType(type):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, jax.extend.core.Jaxpr)

    def __call__(cls, jaxpr, consts=()):
        # A Jaxpr given where the constvars go is copied, with these constants attached.
        return jax.extend.core.Jaxpr(jaxpr, consts=list(consts))


class ClosedJaxpr(metaclass=_ClosedJaxprType):
    """``ClosedJaxpr(jaxpr=..., consts=...)`` as JAX <= 0.10 took it, returning the merged
    ``Jaxpr`` of JAX >= 0.11; ``isinstance(x, ClosedJaxpr)`` holds for every jaxpr."""


_mark(ClosedJaxpr)


class _ModuleView(types.ModuleType):
    """A module's attributes, with some replaced: handed to one kfac-jax module in place of a
    JAX module, so that the replacement reaches that module alone."""

    def __init__(self, base: types.ModuleType, **replaced):
        super().__init__(base.__name__)
        self.__dict__.update(replaced)
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)


def to_closed_jaxpr(jaxpr):
    """kfac-jax's ``tag_graph_matcher.to_closed_jaxpr`` for JAX >= 0.11, where every jaxpr
    is closed (it carries its own constants)."""
    return jaxpr


_mark(to_closed_jaxpr)


def extend_with_closed_jaxpr() -> types.ModuleType:
    """``jax.extend`` whose ``core.ClosedJaxpr`` is :class:`ClosedJaxpr`."""
    view = _ModuleView(jax.extend, core=_ModuleView(jax.extend.core, ClosedJaxpr=ClosedJaxpr))
    return _mark(view)


# --- 4. names removed from jax.core ---------------------------------------------------------

# What kfac-jax 0.0.8 reads from ``jax.core`` and JAX >= 0.11 keeps only in ``jax.extend.core``.
JAX_CORE_NAMES = ("DebugInfo", "DropVar", "Effects", "gensym", "new_jaxpr_eqn", "no_effects")


def missing_jax_core_names() -> list[str]:
    """Those of :data:`JAX_CORE_NAMES` that this JAX's ``jax.core`` lacks."""
    # Asking must not warn where a name is deprecated but still present.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return [name for name in JAX_CORE_NAMES if not hasattr(jax.core, name)]


def restore_jax_core_names() -> list[str]:
    """Set each missing name of :data:`JAX_CORE_NAMES` on ``jax.core`` to the object of the
    same name in ``jax.extend.core``; returns the names set (``jax.core.Effects``, ...)."""
    restored = []
    for name in missing_jax_core_names():
        setattr(jax.core, name, getattr(jax.extend.core, name))
        restored.append(f"jax.core.{name}")
    return restored


# --- 5. the order of the layer-tag inputs ------------------------------------------------------


class FirstSeenSet(frozenset):
    """A frozenset that iterates over its items in the order they were first given (a plain
    set of jaxpr variables iterates in the order of their ids)."""

    def __new__(cls, items=()):
        order = tuple(dict.fromkeys(items))
        self = super().__new__(cls, order)
        self._order = order
        return self

    def __iter__(self):
        return iter(self._order)


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


_mark(eval_jaxpr_eqn)
_mark(replicate_all_local_devices)


def is_patched(fn) -> bool:
    """Whether ``fn`` is one of this module's replacements."""
    return getattr(fn, _MARK, False)


def ensure_compatible(force: bool = False) -> list[str]:
    """Install the replacements into kfac-jax where this JAX needs them; idempotent.

    Args:
        force: install the replacements of changes 1 and 2 even where this JAX does not need
            them (they are behaviour-preserving there); for tests of the installed path on an
            old JAX. Those of changes 3 and 4 only work where JAX has made the change, so they
            are installed only there.

    Returns:
        The attributes set by this call (empty when nothing was needed or all was already
        done), e.g. ``["jax.core.Effects", "tag_graph_matcher.eval_jaxpr_eqn"]``.
    """
    replaced = restore_jax_core_names()
    from kfac_jax._src import tag_graph_matcher, tracer
    from kfac_jax._src import utils as kfac_utils
    from kfac_jax._src.utils import parallel

    # kfac-jax's tracer calls ``tag_graph_matcher.eval_jaxpr_eqn`` through the module
    # attribute, so replacing the attribute reaches every caller.
    if (force or not get_bind_params_returns_pair()) and not is_patched(
        tag_graph_matcher.eval_jaxpr_eqn
    ):
        tag_graph_matcher.eval_jaxpr_eqn = eval_jaxpr_eqn
        replaced.append("tag_graph_matcher.eval_jaxpr_eqn")
    if closed_jaxpr_is_jaxpr() and not is_patched(tag_graph_matcher.ClosedJaxpr):
        tag_graph_matcher.ClosedJaxpr = ClosedJaxpr
        tag_graph_matcher.to_closed_jaxpr = to_closed_jaxpr
        tracer.jex = extend_with_closed_jaxpr()
        replaced += ["tag_graph_matcher.ClosedJaxpr", "tag_graph_matcher.to_closed_jaxpr",
                     "tracer.jex.core.ClosedJaxpr"]
    if getattr(tracer, "set", None) is not FirstSeenSet:
        tracer.set = FirstSeenSet
        replaced.append("tracer.set")
    # Callers inside kfac-jax go through ``parallel.``; the package also re-exports the
    # function under ``kfac_jax.utils``, bound at import time, so that name is replaced too.
    if (force or not has_device_put_replicated()) and not is_patched(
        parallel.replicate_all_local_devices
    ):
        parallel.replicate_all_local_devices = replicate_all_local_devices
        kfac_utils.replicate_all_local_devices = replicate_all_local_devices
        replaced.append("utils.parallel.replicate_all_local_devices")
    return replaced


def load():
    """The ``kfac_jax`` module, imported after :func:`ensure_compatible`; use it instead of
    ``import kfac_jax``, which fails on JAX >= 0.11 unless this module has run first."""
    ensure_compatible()
    import kfac_jax

    return kfac_jax
