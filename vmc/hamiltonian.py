"""The molecular Hamiltonian in the Born-Oppenheimer approximation, as a local energy.

For a real wavefunction psi the local energy at one electron configuration r is

    E_L(r) = (H psi)(r) / psi(r) = -1/2 (laplacian log|psi| + |grad log|psi||^2) + V(r),

in hartree, with all coordinates in bohr. Working with log|psi| keeps every term finite where
|psi| under- or overflows, and the sign of psi drops out of both derivatives.

A wavefunction is a function ``log_psi(params, electrons) -> log|psi|`` (a scalar) of ONE
configuration ``electrons: (n_electrons, 3)`` bohr, spin-up electrons first. Atoms are
``charges: (n_atoms,)`` in units of the elementary charge and ``atom_positions: (n_atoms, 3)``
bohr.

Two interchangeable ways to get the Laplacian are provided:

- ``"folx"``: the forward Laplacian (Li et al. 2023, the ``folx`` package), which carries value,
  gradient and Laplacian through the network in a single forward pass. The fast method.
- ``"hessian"``: the sum of the 3N diagonal entries of the Hessian, each one a forward-mode
  derivative of the gradient, evaluated one after the other in a loop. Slow but simple, it is
  the reference the fast method is checked against.
"""

from __future__ import annotations

from typing import Any, Callable

import folx
import jax
import jax.numpy as jnp

Params = Any
LogPsi = Callable[[Params, jax.Array], jax.Array]
LocalEnergy = Callable[[Params, jax.Array], jax.Array]

METHODS = ("folx", "hessian")

# folx keeps a Jacobian sparse as long as each entry depends on at most this many input
# coordinates. Six covers one electron (3) and one electron pair (6), i.e. the one- and
# two-electron streams of a FermiNet-like embedding, which then cost O(N) instead of O(N^2)
# memory each; anything mixing more electrons (determinants, sums over electrons) is stored
# dense, which avoids repeated materialisation of nearly dense Jacobians.
SPARSITY_THRESHOLD = 6

# Below this many electrons the dense Jacobians (3N columns) are so small that tracking
# sparsity costs more than it saves: folx then traces its index bookkeeping eagerly, op by op,
# and the step carries gathers and scatters. Measured for a KFAC training step of the small
# preset (experiments/folx_sparsity.py): dense is faster per step and starts faster for LiH
# (4 electrons), H6 and H8; sparse is faster per step for H2O (10 electrons).
SPARSE_FROM_ELECTRONS = 10


def folx_sparsity_threshold(n_electrons: int) -> int:
    """folx's sparsity threshold for a wavefunction of ``n_electrons``: 0 (dense Jacobians)
    below :data:`SPARSE_FROM_ELECTRONS`, else :data:`SPARSITY_THRESHOLD`."""
    return 0 if n_electrons < SPARSE_FROM_ELECTRONS else SPARSITY_THRESHOLD


def _pair_distances(x: jax.Array) -> jax.Array:
    """Distances |x_i - x_j| for i < j, shape (n (n - 1) / 2,); empty for n < 2.

    Only the upper triangle is formed, so no zero distance (i = i) is ever passed to a norm:
    the square root's derivative at zero would otherwise turn gradients into NaN.
    """
    i, j = jnp.triu_indices(x.shape[0], k=1)
    return jnp.linalg.norm(x[i] - x[j], axis=-1)


def electron_electron_energy(electrons: jax.Array) -> jax.Array:
    """sum_{i<j} 1 / |r_i - r_j|; electrons: (n_electrons, 3) bohr. Scalar, hartree."""
    return jnp.sum(1.0 / _pair_distances(electrons))


def electron_nuclear_energy(
    electrons: jax.Array, atom_positions: jax.Array, charges: jax.Array
) -> jax.Array:
    """-sum_{i,I} Z_I / |r_i - R_I|. Scalar, hartree.

    electrons: (n_electrons, 3) bohr; atom_positions: (n_atoms, 3) bohr; charges: (n_atoms,).
    """
    atom_positions = jnp.asarray(atom_positions, electrons.dtype)
    charges = jnp.asarray(charges, electrons.dtype)
    r_ei = jnp.linalg.norm(electrons[:, None, :] - atom_positions[None, :, :], axis=-1)
    return -jnp.sum(charges[None, :] / r_ei)


def nuclear_repulsion_energy(atom_positions: jax.Array, charges: jax.Array) -> jax.Array:
    """sum_{I<J} Z_I Z_J / |R_I - R_J|. Scalar, hartree; zero for a single atom.

    atom_positions: (n_atoms, 3) bohr; charges: (n_atoms,).
    """
    atom_positions = jnp.asarray(atom_positions)
    charges = jnp.asarray(charges, atom_positions.dtype)
    i, j = jnp.triu_indices(charges.shape[0], k=1)
    return jnp.sum(charges[i] * charges[j] / _pair_distances(atom_positions))


def potential_energy(
    electrons: jax.Array, atom_positions: jax.Array, charges: jax.Array
) -> jax.Array:
    """Total Coulomb energy of one configuration: electron-electron, electron-nucleus and
    nucleus-nucleus terms. Scalar, hartree, in the dtype of ``electrons``.

    electrons: (n_electrons, 3) bohr; atom_positions: (n_atoms, 3) bohr; charges: (n_atoms,).
    """
    # Atoms are cast to the electrons' dtype so that float64 atoms never promote a float32
    # calculation (and float32 atoms never truncate a float64 one, given float64 inputs).
    atom_positions = jnp.asarray(atom_positions, electrons.dtype)
    return (
        electron_electron_energy(electrons)
        + electron_nuclear_energy(electrons, atom_positions, charges)
        + nuclear_repulsion_energy(atom_positions, charges)
    )


def _laplacian_and_gradient_folx(
    f: Callable[[jax.Array], jax.Array], x: jax.Array, sparsity_threshold: int | float
) -> tuple[jax.Array, jax.Array]:
    # folx's own jit is disabled: under it, the index arrays of a Jacobian that stays sparse up
    # to the output (e.g. log|psi| of a single electron) come back as tracers, and folx cannot
    # then materialise the gradient. Without it the sparsity pattern stays a static numpy
    # array; callers jit the whole local energy instead.
    out = folx.forward_laplacian(f, sparsity_threshold=sparsity_threshold, disable_jit=True)(x)
    return out.laplacian, out.jacobian.dense_array.reshape(-1)


def _laplacian_and_gradient_hessian(
    f: Callable[[jax.Array], jax.Array], x: jax.Array
) -> tuple[jax.Array, jax.Array]:
    shape = x.shape
    flat = x.reshape(-1)
    n = flat.shape[0]
    # Linearising the gradient once stores what the forward-mode derivatives share; each loop
    # iteration then costs one Hessian-vector product, and only one row of the Hessian is alive
    # at any time (never the full 3N x 3N matrix).
    gradient, hessian_times = jax.linearize(jax.grad(lambda y: f(y.reshape(shape))), flat)

    def add_diagonal_entry(k, total):
        unit = jnp.zeros_like(flat).at[k].set(1.0)
        return total + hessian_times(unit)[k]

    laplacian = jax.lax.fori_loop(0, n, add_diagonal_entry, jnp.zeros((), flat.dtype))
    return laplacian, gradient


def make_kinetic_energy(
    log_psi: LogPsi,
    method: str = "folx",
    sparsity_threshold: int | float | None = None,
) -> LocalEnergy:
    """Local kinetic energy -1/2 (laplacian log|psi| + |grad log|psi||^2).

    Args:
        log_psi: ``log_psi(params, electrons) -> log|psi|`` for one configuration.
        method: ``"folx"`` (forward Laplacian, fast) or ``"hessian"`` (loop over the 3N
            diagonal Hessian entries, reference).
        sparsity_threshold: folx's sparsity threshold (0: dense), used by ``"folx"`` only;
            None: :func:`folx_sparsity_threshold` of the configuration's electron count.

    Returns:
        ``fn(params, electrons: (n_electrons, 3) bohr) -> scalar`` hartree; meant to be jitted
        (eagerly, folx runs operation by operation).
    """
    if method not in METHODS:
        raise ValueError(f"unknown kinetic-energy method {method!r}; expected one of {METHODS}")

    def kinetic_energy(params: Params, electrons: jax.Array) -> jax.Array:
        f = lambda x: log_psi(params, x)  # noqa: E731
        if method == "folx":
            threshold = (folx_sparsity_threshold(electrons.shape[0]) if sparsity_threshold is None
                         else sparsity_threshold)
            laplacian, gradient = _laplacian_and_gradient_folx(f, electrons, threshold)
        else:
            laplacian, gradient = _laplacian_and_gradient_hessian(f, electrons)
        return -0.5 * (laplacian + jnp.sum(gradient**2))

    return kinetic_energy


def make_local_energy(
    log_psi: LogPsi,
    atom_positions: jax.Array,
    charges: jax.Array,
    method: str = "folx",
    sparsity_threshold: int | float | None = None,
) -> LocalEnergy:
    """Local energy E_L = (H psi) / psi of one configuration.

    Args:
        log_psi: ``log_psi(params, electrons) -> log|psi|`` for one configuration.
        atom_positions: (n_atoms, 3) bohr.
        charges: (n_atoms,) nuclear charges.
        method: ``"folx"`` or ``"hessian"``; see :func:`make_kinetic_energy`.
        sparsity_threshold: see :func:`make_kinetic_energy`.

    Returns:
        ``fn(params, electrons: (n_electrons, 3) bohr) -> scalar`` hartree; jit-able.
    """
    kinetic_energy = make_kinetic_energy(log_psi, method, sparsity_threshold)

    def local_energy(params: Params, electrons: jax.Array) -> jax.Array:
        return kinetic_energy(params, electrons) + potential_energy(
            electrons, atom_positions, charges
        )

    return local_energy


def batch_over_walkers(local_energy: LocalEnergy) -> LocalEnergy:
    """The same function over a batch: ``fn(params, walkers: (n_walkers, n_electrons, 3) bohr)
    -> (n_walkers,)`` hartree, with ``params`` shared by all walkers."""
    return jax.vmap(local_energy, in_axes=(None, 0))


def make_batched_local_energy(
    log_psi: LogPsi,
    atom_positions: jax.Array,
    charges: jax.Array,
    method: str = "folx",
    sparsity_threshold: int | float | None = None,
) -> LocalEnergy:
    """:func:`make_local_energy` over walkers: ``fn(params, walkers: (n_walkers, n_electrons,
    3) bohr) -> (n_walkers,)`` hartree."""
    return batch_over_walkers(
        make_local_energy(log_psi, atom_positions, charges, method, sparsity_threshold)
    )
