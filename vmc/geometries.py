"""Geometries as function arguments: one compilation for every geometry of a composition.

Shared training evaluates one network on many molecules and geometries. Everything that
differs between geometries of one *composition* (the same elements in the same order, the
same charge and spin) is an array of one shape: nuclear positions, orbital features and HF
orbital coefficients. These arrays form a :class:`Geometry` pytree that the functions here
take as an argument, stacked along a leading axis for a batch of geometries, so a step on any
G geometries of a composition reuses one compiled function.

Convention: where :mod:`vmc.mcmc` and :mod:`vmc.hamiltonian` expect ``log_psi(params,
electrons)``, the "parameters" are the pair ``(params, geometry)``: the network's parameters
and the geometry it is evaluated on. A batch of walkers over G geometries is a
:class:`GeometryBatch` with walkers (G, W, n_electrons, 3) bohr.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from molfoundation import gaussians
from vmc import ansatz, hamiltonian, optimizers, orbitals
from vmc.systems import System


@flax.struct.dataclass
class Geometry:
    """The geometry-specific arrays of one system (a leading (G,) axis on every leaf when
    stacked).

    Attributes:
      inputs: the ansatz inputs (nuclei and orbital features).
      charges: (n_atoms,) nuclear charges.
      coefficients_up: (n_ao, n_up) AO coefficients of the occupied spin-up HF orbitals.
      coefficients_down: (n_ao, n_down) the same for spin down.
    """

    inputs: ansatz.AnsatzInputs
    charges: jax.Array
    coefficients_up: jax.Array
    coefficients_down: jax.Array

    @property
    def atom_positions(self) -> jax.Array:
        return self.inputs.atom_positions


@flax.struct.dataclass
class GeometryBatch:
    """Walkers on G geometries of one composition: the batch of a shared-training step.

    Attributes:
      walkers: (G, W, n_electrons, 3) bohr, spin-up electrons first.
      geometry: :class:`Geometry` stacked over G.
    """

    walkers: jax.Array
    geometry: Geometry


def composition(system: System) -> tuple:
    """What must agree for two systems to share compiled functions: the atomic numbers in
    order, the charge and the spin."""
    return (tuple(int(z) for z in system.atomic_numbers), system.charge, system.spin)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@dataclasses.dataclass(eq=False)
class GeometryGroup:
    """The geometries of one composition within a system set.

    Attributes:
      members: indices of the group's systems in the system set, in set order.
      systems: the systems themselves.
      hartree_fock: their occupied orbitals (Hartree-Fock, or from another source such as a
        PhiSNet prediction): the HF-fit targets, and the source of the orbital features.
      geometries: :class:`Geometry` stacked over the members (leading axis ``size``).
      ao_values: ``fn(atom_positions (n_atoms, 3), points (P, 3)) -> (P, n_ao)``, the AOs of
        the composition's basis (the same shells for every member).
    """

    members: tuple[int, ...]
    systems: tuple[System, ...]
    hartree_fock: tuple[orbitals.HartreeFockOrbitals, ...]
    geometries: Geometry
    ao_values: Callable

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def n_up(self) -> int:
        return self.systems[0].n_up

    @property
    def n_down(self) -> int:
        return self.systems[0].n_down

    @property
    def n_electrons(self) -> int:
        return self.systems[0].n_electrons

    def select(self, rows) -> Geometry:
        """The geometries at ``rows`` (int array (G,), indices within the group), stacked."""
        return jax.tree.map(lambda x: x[rows], self.geometries)


def geometry_of(hf: orbitals.HartreeFockOrbitals, config: ansatz.AnsatzConfig, dtype) -> Geometry:
    """The :class:`Geometry` of one system from its HF orbitals, floats cast to ``dtype``."""
    inputs = ansatz.inputs_from_hartree_fock(hf, config)
    geometry = Geometry(
        inputs=inputs,
        charges=jnp.asarray(hf.atomic_numbers, dtype),
        coefficients_up=jnp.asarray(hf.up),
        coefficients_down=jnp.asarray(hf.down),
    )
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, geometry
    )


def build_groups(
    system_set: Sequence[System],
    config: ansatz.AnsatzConfig,
    orbital_source: Callable[[System], orbitals.HartreeFockOrbitals] | None = None,
    dtype=jnp.float32,
    progress: bool = True,
) -> list[GeometryGroup]:
    """Occupied orbitals of every system (``orbital_source(system)``, e.g. Hartree-Fock through
    :func:`vmc.orbitals.hartree_fock` or :func:`vmc.orbitals.predicted_orbitals`; default
    Hartree-Fock in the default basis) and the systems grouped by :func:`composition`, groups in
    the order of their first member. Raises InputError for a system the orbital source or the
    ansatz cannot take."""
    from tqdm import tqdm

    if orbital_source is None:
        orbital_source = orbitals.hartree_fock
    by_key: dict[tuple, list[int]] = {}
    solved = []
    for index, system in enumerate(tqdm(system_set, desc="orbitals", unit="system",
                                        file=sys.stderr, disable=None if progress else True)):
        solved.append(orbital_source(system))
        by_key.setdefault(composition(system), []).append(index)
    groups = []
    for members in by_key.values():
        hfs = tuple(solved[i] for i in members)
        groups.append(GeometryGroup(
            members=tuple(members),
            systems=tuple(system_set[i] for i in members),
            hartree_fock=hfs,
            geometries=_stack([geometry_of(hf, config, dtype) for hf in hfs]),
            ao_values=gaussians.make_ao_values(hfs[0].basis),
        ))
    return groups


# ----------------------------------------------------------------------------------------------
# Functions of (params, geometry).


def make_log_psi(config: ansatz.AnsatzConfig) -> Callable:
    """``fn((params, geometry), electrons (n_el, 3) bohr) -> log|psi|``."""
    wavefunction = ansatz.make_wavefunction(config)

    def log_psi(params_geometry, electrons):
        params, geometry = params_geometry
        return wavefunction(params, electrons, geometry.inputs)[1]

    return log_psi


def make_local_energy(config: ansatz.AnsatzConfig, laplacian: str = "folx",
                      sparsity_threshold: int | None = None) -> Callable:
    """``fn((params, geometry), electrons (n_el, 3) bohr) -> E_L`` hartree (``laplacian`` and
    ``sparsity_threshold``: as :func:`vmc.hamiltonian.make_kinetic_energy`)."""
    kinetic_energy = hamiltonian.make_kinetic_energy(make_log_psi(config), laplacian, sparsity_threshold)

    def local_energy(params_geometry, electrons):
        geometry = params_geometry[1]
        return kinetic_energy(params_geometry, electrons) + hamiltonian.potential_energy(
            electrons, geometry.atom_positions, geometry.charges)

    return local_energy


def over_batch(fn: Callable) -> Callable:
    """``fn((params, geometry), electrons) -> scalar`` as ``fn(params, batch: GeometryBatch)
    -> (G, W)``: vmapped over the walkers of every geometry and over the geometries."""
    per_geometry = jax.vmap(fn, in_axes=(None, 0))

    def batched(params, batch: GeometryBatch):
        return jax.vmap(lambda g, w: per_geometry((params, g), w))(batch.geometry, batch.walkers)

    return batched


def every_nth_walker(batch: GeometryBatch, stride: int) -> GeometryBatch:
    """Walkers 0, stride, 2 stride, ... of every geometry: (G, W / stride, n_el, 3). Taken by a
    reshape, so walkers split over devices in contiguous blocks stay where they are."""
    n_geometries, n_walkers = batch.walkers.shape[:2]
    if n_walkers % stride:
        raise ValueError(f"a walker stride of {stride} does not divide {n_walkers} walkers")
    walkers = batch.walkers.reshape((n_geometries, n_walkers // stride, stride) + batch.walkers.shape[2:])
    return GeometryBatch(walkers[:, :, 0], batch.geometry)


def make_kfac_log_psi(config: ansatz.AnsatzConfig, walker_stride: int = 1) -> Callable:
    """``fn(params, batch) -> (G, W / walker_stride)`` log|psi| of every ``walker_stride``-th
    walker (:func:`every_nth_walker`), with every geometry's inputs copied to each of its
    walkers: the curvature function of :func:`vmc.optimizers.make_kfac`.

    Why the copies: under a plain vmap over walkers the orbital half of the network (GNN and
    heads), which does not depend on the electrons, stays unbatched and is evaluated once.
    KFAC's dense-layer blocks need per-walker layer inputs and output derivatives (their
    Kronecker factors are averages over the batch), so kfac-jax rejects unbatched layers.
    Copying the inputs batches every layer; the values are unchanged. The price, the orbital
    half evaluated (and differentiated) once per walker, is paid in the curvature estimate
    only: the loss and its gradient keep the plain vmap."""
    wavefunction = ansatz.make_wavefunction(config)

    def per_walker(params, electrons, inputs):
        return wavefunction(params, electrons, inputs)[1]

    def batched(params, batch: GeometryBatch):
        batch = every_nth_walker(batch, walker_stride)
        n_geometries, n_walkers = batch.walkers.shape[:2]
        copies = jax.tree.map(
            lambda x: jnp.broadcast_to(x[:, None], (n_geometries, n_walkers) + x.shape[1:]).reshape(
                (n_geometries * n_walkers,) + x.shape[1:]),
            batch.geometry.inputs,
        )
        flat_walkers = batch.walkers.reshape((n_geometries * n_walkers,) + batch.walkers.shape[2:])
        values = jax.vmap(per_walker, in_axes=(None, 0, 0))(params, flat_walkers, copies)
        return values.reshape(n_geometries, n_walkers)

    return batched


def make_kfac(energy_loss, config: ansatz.AnsatzConfig, kfac: optimizers.KFACConfig) -> optimizers.Optimizer:
    """KFAC (:func:`vmc.optimizers.make_kfac`) on ``energy_loss(params, batch: GeometryBatch)``,
    its curvature from :func:`make_kfac_log_psi` with ``kfac.curvature_walker_stride``."""
    stride = kfac.curvature_walker_stride
    return optimizers.make_kfac(energy_loss, make_kfac_log_psi(config, stride), kfac,
                                batch_size=lambda batch: walkers_in(batch) // stride)


def make_hartree_fock_log_psi(ao_values: Callable, n_up: int) -> Callable:
    """``fn((params (ignored), geometry), electrons) -> log|det Phi_up det Phi_down|`` of the
    geometry's HF orbitals."""

    def log_psi(params_geometry, electrons):
        geometry = params_geometry[1]
        aos = ao_values(geometry.atom_positions, electrons)
        up = aos[:n_up] @ geometry.coefficients_up.astype(aos.dtype)
        down = aos[n_up:] @ geometry.coefficients_down.astype(aos.dtype)
        return jnp.linalg.slogdet(up)[1] + jnp.linalg.slogdet(down)[1]

    return log_psi


def make_hf_fit_loss(config: ansatz.AnsatzConfig, ao_values: Callable, n_up: int) -> Callable:
    """``fn(params, batch: GeometryBatch) -> mean over geometries and walkers of
    sum_d ||Phi^d - Phi_HF||^2``, the squared distance of every determinant's neural orbital
    matrix from the HF orbital matrix (spin-diagonal blocks; zero spin-mixing blocks)."""
    matrices = ansatz.make_orbital_matrices(config)

    def target(geometry, electrons):
        aos = ao_values(geometry.atom_positions, electrons)
        up = aos[:n_up] @ geometry.coefficients_up.astype(aos.dtype)
        down = aos[n_up:] @ geometry.coefficients_down.astype(aos.dtype)
        return jax.scipy.linalg.block_diag(up, down)

    def one_geometry(params, geometry, walkers):
        predicted = jax.vmap(matrices, in_axes=(None, 0, None))(params, walkers, geometry.inputs)
        reference = jax.vmap(target, in_axes=(None, 0))(geometry, walkers)[:, None]
        return jnp.mean(jnp.sum((predicted - reference) ** 2, axis=(-2, -1)))

    def hf_fit_loss(params, batch: GeometryBatch):
        per_geometry = jax.vmap(one_geometry, in_axes=(None, 0, 0))(
            params, batch.geometry, batch.walkers)
        return jnp.mean(per_geometry)

    return hf_fit_loss


def functions(config: ansatz.AnsatzConfig, laplacian: str,
              sparsity_threshold: int | None = None) -> "GeometryFunctions":
    """The composition-independent functions for ``config``."""
    return GeometryFunctions(
        log_psi=make_log_psi(config),
        local_energy=over_batch(make_local_energy(config, laplacian, sparsity_threshold)),
    )


@dataclasses.dataclass(frozen=True)
class GeometryFunctions:
    """``log_psi((params, geometry), electrons)``; ``local_energy(params, batch) -> (G, W)``."""

    log_psi: Callable
    local_energy: Callable


def walkers_in(batch: GeometryBatch) -> int:
    """G x W, the number of walkers of a batch."""
    return batch.walkers.shape[0] * batch.walkers.shape[1]
