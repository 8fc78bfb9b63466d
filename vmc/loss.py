"""The VMC energy as a loss whose gradient is the variational-Monte-Carlo gradient.

With walkers r_k drawn from |psi|^2, the energy <E_L> and its gradient with respect to the
parameters are estimated by

    E       = mean_k E_L(r_k)
    grad E  = 2 mean_k [(E_L(r_k) - E) grad log|psi(r_k)|],

which needs no derivative of the local energy itself (that term has zero expectation for a
real wavefunction). Plain autodiff of ``mean(E_L)`` would give a different, noisier and far
more expensive quantity, so the loss is a ``jax.custom_jvp`` function: its value is the mean
local energy, its tangent (derivative along a parameter direction dp) is

    2 mean_k [(E_L^clip(r_k) - mean_j E_L^clip(r_j)) * d log|psi(r_k)|[dp]],

where E_L^clip are the local energies clipped to median +- clip_scale x the mean absolute
deviation from the median. Clipping applies to the gradient only; the reported energy is the
unclipped mean. Heavy tails of E_L near nodes and nuclei otherwise make single steps explode.

The loss carries no KFAC registration: KFAC takes its curvature from a separate log|psi|
function (:func:`vmc.optimizers.make_kfac`), so the gradient here can use the cheapest batched
log|psi|.

Walkers whose local energy is not finite (NaN or +-inf) are left out of the mean, the variance,
the median, and the gradient, and are counted in the statistics; deciding what to do about
them (stop, warn, resample) is the caller's business. Averaging NaN in would silently turn the
whole step into NaN.

Several geometries in one step (shared training): when the local energies and log|psi| come
as (n_geometries, n_walkers) arrays, every statistic (median, clipping window, mean, centring)
is taken per geometry along the last axis, the loss is the mean of the per-geometry energies
and its gradient the mean of the per-geometry VMC gradients. Centring on the overall mean
would be wrong: geometries differ in energy by far more than the spread within one.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Params = Any
LogPsi = Callable[[Params, jax.Array], jax.Array]
BatchedLocalEnergy = Callable[[Params, jax.Array], jax.Array]
# loss(params, walkers) -> (energy, EnergyStats)
EnergyLoss = Callable[[Params, jax.Array], tuple[jax.Array, "EnergyStats"]]

DEFAULT_CLIP_SCALE = 5.0


@flax.struct.dataclass
class EnergyStats:
    """Per-step statistics of the local energies (the loss's auxiliary output).

    Every field has the leading shape of the local energies without their walker axis:
    scalars for one system, (n_geometries,) for a batch of geometries.

    Attributes:
        energy: hartree, mean local energy over the finite walkers (unclipped).
        variance: hartree^2, variance of the finite local energies (unclipped).
        clipped_fraction: fraction of the finite walkers whose local energy was clipped for
            the gradient.
        n_nonfinite: int32, walkers whose local energy was NaN or infinite.
        local_energies: (..., n_walkers) hartree, as computed (non-finite values included).
    """

    energy: jax.Array
    variance: jax.Array
    clipped_fraction: jax.Array
    n_nonfinite: jax.Array
    local_energies: jax.Array


def clip_local_energies(
    local_energies: jax.Array, finite: jax.Array, clip_scale: float | None
) -> jax.Array:
    """Local energies (..., n_walkers) clipped to median +- clip_scale x mean |E_L - median|,
    with median and deviation taken along the walker axis over the ``finite`` walkers (bool
    mask of the same shape), separately for every leading index.

    ``clip_scale`` None or <= 0 switches clipping off. Entries outside ``finite`` are returned
    as they are; callers mask them.
    """
    if clip_scale is None or clip_scale <= 0:
        return local_energies
    masked = jnp.where(finite, local_energies, jnp.nan)
    median = jnp.nanmedian(masked, axis=-1, keepdims=True)
    deviation = jnp.nanmean(jnp.abs(masked - median), axis=-1, keepdims=True)
    clipped = jnp.clip(local_energies, median - clip_scale * deviation,
                       median + clip_scale * deviation)
    return jnp.where(finite, clipped, local_energies)


def _masked_mean(values: jax.Array, mask: jax.Array, count: jax.Array) -> jax.Array:
    """Mean along the walker (last) axis over ``mask``; ``count`` the mask's sum there."""
    # where() before the sum, not a multiplication by the mask: 0 * NaN would still be NaN.
    return jnp.sum(jnp.where(mask, values, 0.0), axis=-1) / count


def make_energy_loss(
    log_psi: LogPsi,
    local_energy_batched: BatchedLocalEnergy,
    clip_scale: float | None = DEFAULT_CLIP_SCALE,
    batched_log_psi: BatchedLocalEnergy | None = None,
) -> EnergyLoss:
    """The VMC energy loss.

    Args:
        log_psi: ``log_psi(params, electrons: (n_electrons, 3) bohr) -> log|psi|`` (scalar);
            used only for the default ``batched_log_psi``.
        local_energy_batched: ``fn(params, walkers: (n_walkers, n_electrons, 3) bohr) ->
            (n_walkers,)`` hartree, e.g. :func:`vmc.hamiltonian.make_batched_local_energy`.
            For several geometries per step, ``fn(params, batch) -> (n_geometries,
            n_walkers)`` with any pytree ``batch`` (then pass ``batched_log_psi`` too).
        clip_scale: local energies are clipped at median +- clip_scale x mean absolute
            deviation for the gradient; None or 0 for no clipping.
        batched_log_psi: ``fn(params, walkers) -> (n_walkers,)`` (or ``fn(params, batch) ->
            (n_geometries, n_walkers)``) log|psi|, used for the tangent; default
            ``vmap(log_psi)``.

    Returns:
        ``loss(params, walkers: (n_walkers, n_electrons, 3) bohr) -> (energy, EnergyStats)``:
        energy is the mean local energy (hartree; for a batch of geometries the mean of their
        energies, with per-geometry values in the stats) and the derivative with respect to
        ``params`` is the clipped VMC gradient. Use with ``jax.grad(..., has_aux=True)``. The
        walkers are data: the tangent ignores any derivative with respect to them.
    """
    if batched_log_psi is None:
        batched_log_psi = jax.vmap(log_psi, in_axes=(None, 0))

    @jax.custom_jvp
    def loss(params, walkers):
        local_energies = local_energy_batched(params, walkers)
        finite = jnp.isfinite(local_energies)
        count = _finite_count(finite, local_energies.dtype)
        energy = _masked_mean(local_energies, finite, count)
        variance = _masked_mean((local_energies - energy[..., None]) ** 2, finite, count)
        clipped = clip_local_energies(local_energies, finite, clip_scale)
        n_clipped = jnp.sum(finite & (clipped != local_energies), axis=-1)
        stats = EnergyStats(
            energy=energy,
            variance=variance,
            clipped_fraction=n_clipped.astype(local_energies.dtype) / count,
            n_nonfinite=jnp.sum(~finite, axis=-1).astype(jnp.int32),
            local_energies=local_energies,
        )
        return jnp.mean(energy), stats

    @loss.defjvp
    def loss_jvp(primals, tangents):
        params, walkers = primals
        params_tangent, _ = tangents
        energy, stats = loss(params, walkers)
        local_energies = stats.local_energies
        finite = jnp.isfinite(local_energies)
        count = _finite_count(finite, local_energies.dtype)
        clipped = clip_local_energies(local_energies, finite, clip_scale)
        # Centring on the mean of the clipped energies (not the unclipped mean) keeps the
        # baseline exactly the mean of what multiplies grad log|psi|, so the estimator's
        # control variate cancels exactly.
        baseline = _masked_mean(clipped, finite, count)[..., None]
        centred = jnp.where(finite, clipped - baseline, 0.0)
        centred = jax.lax.stop_gradient(centred)

        _, log_psi_tangent = jax.jvp(
            lambda p: batched_log_psi(p, walkers), (params,), (params_tangent,)
        )
        # A walker without a finite energy may also have a non-finite tangent: mask it out
        # rather than multiply it by zero.
        log_psi_tangent = jnp.where(finite, log_psi_tangent, 0.0)
        energy_tangent = 2.0 * jnp.mean(jnp.sum(centred * log_psi_tangent, axis=-1) / count)
        return (energy, stats), (energy_tangent, _zero_tangents(stats))

    return loss


def _finite_count(finite: jax.Array, dtype) -> jax.Array:
    """Finite walkers per geometry (at least 1, so an all-NaN geometry gives no 0/0)."""
    return jnp.maximum(jnp.sum(finite, axis=-1), 1).astype(dtype)


def _zero_tangents(tree):
    """Zero tangents of ``tree`` (float0 for integer leaves, as JAX requires)."""

    def zero(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, dtype=jax.dtypes.float0)

    return jax.tree_util.tree_map(zero, tree)
