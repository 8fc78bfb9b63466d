"""Optimisers for the VMC energy: KFAC (kfac-jax) with the reference schedules, and Adam.

Both come as an :class:`Optimizer`, a pair of functions with one interface:

    state = optimizer.init(params, key, walkers)
    params, state, stats = optimizer.step(params, state, key, walkers)

where ``walkers: (n_walkers, n_electrons, 3)`` bohr are the current MCMC samples and ``stats``
is a dict of scalars: ``energy``, ``variance``, ``clipped_fraction``, ``n_nonfinite`` (from
:class:`vmc.loss.EnergyStats`), ``learning_rate`` and, for KFAC, ``damping``. ``step`` is
compiled internally (kfac-jax jits its own step; the Adam step is jitted here); do not wrap it
in ``jax.jit``. The optimiser keeps no other state than ``state``: the step counter that drives
the schedules lives inside it.

Schedules (transferable-wavefunction reference recipe, step t counted from 0):

- learning rate  lr(t) = lr_0 / (1 + t / t_lr),        lr_0 = 0.1, t_lr = 20000;
- damping        d(t)  = max(d_min, d_0 exp(-t / t_d)), d_0 = 1,   d_min = 2e-3, t_d = 5000:
  an exponential decay with time constant t_d, floored where the reference damping ends.

Devices: the KFAC optimiser runs kfac-jax with ``multi_device=False`` (no pmap): one device, or
several devices through jit's automatic partitioning when the walkers are given a sharding over
them (tested on two processes of two devices each, tests/test_vmc_shared.py). kfac-jax's own
pmap path (``multi_device=True``) is not used here. Note that importing kfac-jax 0.0.8 switches
JAX's ``jax_pmap_shmap_merge`` flag off for the whole process (legacy pmap), which matters only
to code that uses pmap.

KFAC takes the gradient from the loss and the curvature from a second function, the
per-walker log|psi| of :func:`vmc.geometries.make_kfac_log_psi` (see there why), so the orbital
half of the network is evaluated once per walker only where the curvature needs it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from molfoundation.errors import InputError
from vmc import kfac_compat
from vmc.loss import EnergyLoss

Params = Any
Schedule = Callable[[jax.Array], jax.Array]


class Optimizer(NamedTuple):
    """``init(params, key, walkers) -> state`` and ``step(params, state, key, walkers) ->
    (params, state, stats)``; see the module docstring."""

    init: Callable[[Params, jax.Array, jax.Array], Any]
    step: Callable[[Params, Any, jax.Array, jax.Array], tuple[Params, Any, dict]]


@dataclasses.dataclass(frozen=True)
class KFACConfig:
    """KFAC settings; the defaults are the reference recipe.

    Attributes:
        learning_rate: lr_0 of lr_0 / (1 + t / learning_rate_decay).
        learning_rate_decay: steps t_lr.
        damping: initial damping d_0.
        min_damping: final damping d_min.
        damping_time: time constant t_d (steps) of the exponential damping decay.
        curvature_ema: decay of the moving average of the curvature estimate.
        norm_constraint: bound on the squared norm of the preconditioned update scaled by the
            learning rate (kfac-jax's norm_constraint); FermiNet's value.
        inverse_update_period: steps between recomputations of the factor inverses.
        curvature_walker_stride: the curvature is estimated from every n-th walker of each
            geometry (1: all of them). The estimate is a moving average over about
            1 / (1 - curvature_ema) steps, so a fraction of each step's walkers barely changes
            it, while its cost (the per-walker network, :func:`vmc.geometries.make_kfac_log_psi`)
            falls in proportion; it must divide the walkers per geometry.
    """

    learning_rate: float = 0.1
    learning_rate_decay: float = 20000.0
    damping: float = 1.0
    min_damping: float = 2e-3
    damping_time: float = 5000.0
    curvature_ema: float = 0.99
    norm_constraint: float = 1e-3
    inverse_update_period: int = 1
    curvature_walker_stride: int = 1

    def __post_init__(self):
        if self.inverse_update_period < 1 or self.curvature_walker_stride < 1:
            raise InputError("inverse_update_period and curvature_walker_stride must be at least 1")


@dataclasses.dataclass(frozen=True)
class AdamConfig:
    """Adam settings: the same learning-rate decay shape as KFAC, smaller base rate."""

    learning_rate: float = 1e-3
    learning_rate_decay: float = 20000.0
    b1: float = 0.9
    b2: float = 0.999


def make_learning_rate_schedule(learning_rate: float, decay: float) -> Schedule:
    """``t -> learning_rate / (1 + t / decay)`` (t the step count, from 0)."""

    def schedule(t):
        return learning_rate / (1.0 + jnp.asarray(t, jnp.float32) / decay)

    return schedule


def make_damping_schedule(damping: float, min_damping: float, time_constant: float) -> Schedule:
    """``t -> max(min_damping, damping * exp(-t / time_constant))``."""

    def schedule(t):
        decayed = damping * jnp.exp(-jnp.asarray(t, jnp.float32) / time_constant)
        return jnp.maximum(min_damping, decayed)

    return schedule


def _energy_stats(aux) -> dict:
    return dict(
        energy=aux.energy,
        variance=aux.variance,
        clipped_fraction=aux.clipped_fraction,
        n_nonfinite=aux.n_nonfinite,
    )


@functools.cache
def repeated_dense_block() -> type:
    """kfac-jax's curvature block for dense layers applied over extra axes, safe when no
    repeat reaches the loss.

    kfac-jax scales such a block's curvature by 1 / (average number of repeats whose output
    tangent is non-zero). For a single atom the (atom, atom) pair layers never reach log|psi|,
    that average is 0 and 1/0 made the whole first KFAC update NaN. The block's gradient is
    exactly zero then, so any finite scale leaves those parameters unchanged; 1 is used.
    """
    kfac_jax = kfac_compat.load()

    class RepeatedDenseBlock(kfac_jax.curvature_blocks.RepeatedDenseKroneckerFactored):
        def state_dependent_scale(self, state):
            repeats = state.average_repeats.value
            return jnp.where(repeats > 0, 1.0 / repeats, 1.0)

    return RepeatedDenseBlock


def curvature_value(curvature_log_psi: Callable[[Params, Any], jax.Array]) -> Callable:
    """``fn(params, batch) -> mean log|psi|``, with the per-walker values of
    ``curvature_log_psi`` registered as the means of a normal predictive distribution: the
    function kfac-jax estimates the curvature (the wavefunction's Fisher matrix) from."""
    kfac_jax = kfac_compat.load()

    def value(params, batch):
        values = curvature_log_psi(params, batch)
        kfac_jax.register_normal_predictive_distribution(values.reshape(-1, 1))
        return jnp.mean(values)

    return value


def make_kfac(loss: EnergyLoss, curvature_log_psi: Callable[[Params, Any], jax.Array],
              config: KFACConfig = KFACConfig(),
              batch_size: Callable[[Any], int] | None = None) -> Optimizer:
    """KFAC on ``loss`` (from :func:`vmc.loss.make_energy_loss`), with the curvature of
    ``curvature_log_psi(params, batch)`` (:func:`vmc.geometries.make_kfac_log_psi`; any shape, one value
    per walker, equal to the log|psi| of the loss).

    ``batch_size(batch) -> int`` is the number of walkers in a batch, the count of the
    registered log|psi| values; the default, axis 0 of the batch's first leaf, suits a walker
    array (n_walkers, n_electrons, 3). A batch of several geometries passes its own.

    The gradient is the loss's. The curvature is the Fisher matrix of the wavefunction,
    E[grad log|psi| grad log|psi|^T], estimated from gradients of sampled targets: log|psi| is
    registered as the mean of a normal predictive distribution, kfac-jax finds the dense layers
    of ``curvature_log_psi`` by matching patterns in its traced graph and gives every other
    parameter a generic (full-matrix) block. Dense layers applied over extra axes (atom pairs)
    get :func:`repeated_dense_block`.
    """
    kfac_jax = kfac_compat.load()
    # Exact inverses either way (the damped factors are positive definite); by Cholesky they
    # compile in half the time of kfac-jax's default LU and run faster (LiH small preset, 2
    # CPU cores: experiments/results/kfac_inverse_cpu.json). A kfac-jax setting of the whole
    # process, read when its step is traced.
    kfac_jax.utils.set_use_cholesky_inversion(True)
    learning_rate = make_learning_rate_schedule(config.learning_rate, config.learning_rate_decay)
    damping = make_damping_schedule(config.damping, config.min_damping, config.damping_time)
    optimizer = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss, has_aux=True),
        l2_reg=0.0,
        value_func_has_aux=True,
        value_func_for_estimator=curvature_value(curvature_log_psi),
        learning_rate_schedule=learning_rate,
        # No momentum, as in the reference recipe; kfac-jax wants a schedule or an argument.
        momentum_schedule=lambda t: jnp.zeros([]),
        damping_schedule=damping,
        norm_constraint=config.norm_constraint,
        curvature_ema=config.curvature_ema,
        inverse_update_period=config.inverse_update_period,
        curvature_update_period=1,
        estimation_mode="fisher_gradients",
        # Burn-in steps of the curvature would spend extra evaluations before the first
        # update; the exponential average starting from the first step is enough here.
        num_burnin_steps=0,
        multi_device=False,
        include_norms_in_stats=True,
        layer_tag_to_block_ctor={"repeated_dense": repeated_dense_block()},
        **({} if batch_size is None else {"batch_size_extractor": batch_size}),
    )

    def init(params, key, walkers):
        return optimizer.init(params, key, walkers)

    def step(params, state, key, walkers):
        # kfac-jax reads the step number on the host (a device sync, and not traceable inside
        # an enclosing jit) only to schedule burn-in, damping adaptation and curvature updates
        # less often than every step, none of which is used here; any number then serves.
        params, state, kfac_stats = optimizer.step(params, state, key, batch=walkers, global_step_int=1)
        stats = _energy_stats(kfac_stats["aux"])
        stats.update(
            learning_rate=kfac_stats["learning_rate"],
            damping=kfac_stats["damping"],
            update_norm=kfac_stats["update_norm"],
        )
        return params, state, stats

    return Optimizer(init, step)


@flax.struct.dataclass
class AdamState:
    """optax's Adam state and the number of steps taken (scalar int32)."""

    opt_state: Any
    step: jax.Array


def make_adam(loss: EnergyLoss, config: AdamConfig = AdamConfig()) -> Optimizer:
    """Adam (optax) on ``loss``, with the KFAC interface. The KFAC registration inside the
    loss is an identity outside kfac-jax's tracer, so the same loss serves both."""
    learning_rate = make_learning_rate_schedule(config.learning_rate, config.learning_rate_decay)
    transform = optax.adam(learning_rate, b1=config.b1, b2=config.b2)
    value_and_grad = jax.value_and_grad(loss, has_aux=True)

    def init(params, key, walkers):
        del key, walkers  # same signature as KFAC; Adam needs neither
        return AdamState(transform.init(params), jnp.zeros((), jnp.int32))

    @jax.jit
    def step(params, state, key, walkers):
        del key
        (_, aux), grads = value_and_grad(params, walkers)
        updates, opt_state = transform.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        stats = _energy_stats(aux)
        # The rate this step used: optax evaluates the schedule at the count before the update.
        stats.update(learning_rate=learning_rate(state.step))
        return params, AdamState(opt_state, state.step + 1), stats

    return Optimizer(init, step)
