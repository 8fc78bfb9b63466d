"""Radial basis: exponential Bernstein polynomials with a smooth cutoff (PhiSNet)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln


def smooth_cutoff(r: jnp.ndarray, cutoff: float) -> jnp.ndarray:
    """f(r) = exp(-r^2 / ((rc - r)(rc + r))) for r < rc, else 0; smooth to all orders at rc."""
    inside = r < cutoff
    r_safe = jnp.where(inside, r, 0.0)
    return jnp.where(inside, jnp.exp(-(r_safe**2) / ((cutoff - r_safe) * (cutoff + r_safe))), 0.0)


def exponential_bernstein(
    r: jnp.ndarray, num_basis: int, decay: jnp.ndarray, cutoff: float
) -> jnp.ndarray:
    """(..., K) basis b_v(r) = C(K-1, v) x^(K-1-v) (1 - x)^v f_cut(r), x = exp(-decay r).

    Evaluated in log space: the binomial coefficients of K = 128 overflow float32. ``r`` must
    be positive (callers mask self-pairs); ``decay`` is a positive scalar (1/bohr).
    """
    v = np.arange(num_basis)
    k = num_basis - 1
    log_binomial = gammaln(k + 1.0) - gammaln(v + 1.0) - gammaln(k - v + 1.0)
    r = r[..., None]
    log_x = -decay * r
    log_one_minus_x = jnp.log(-jnp.expm1(-decay * r))
    log_b = log_binomial + (k - v) * log_x + v * log_one_minus_x
    return jnp.exp(log_b) * smooth_cutoff(r, cutoff)
