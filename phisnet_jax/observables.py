"""Observables from a Fock and overlap matrix: orbitals, densities, charges, dipoles.

Everything here is a differentiable JAX function of (F, S) in pyscf's AO order, so gradients
flow from any observable back into a model that predicts F and S.

- ``roothaan(F, S)`` solves F C = S C eps by canonical orthogonalisation: S = U s U^T with the
  eigenvalues s clamped from below (a predicted S that is slightly indefinite stays usable),
  X = U s^-1/2, and eigh(X^T F X).
- Eigenvector gradients contain 1 / (lambda_i - lambda_j), which is infinite for degenerate
  eigenvalues (symmetric molecules, padded AOs). ``safe_eigh`` broadens that factor to
  (lambda_i - lambda_j) / ((lambda_i - lambda_j)^2 + eta^2): exact away from degeneracies, finite at them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BROADENING = 1e-10  # hartree^2-scale eta^2 in the broadened eigen-gradient
DEFAULT_MIN_OVERLAP_EIGENVALUE = 1e-6


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def safe_eigh(matrix: jnp.ndarray, broadening: float = DEFAULT_BROADENING):
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix with finite derivatives."""
    return jnp.linalg.eigh(matrix)


@safe_eigh.defjvp
def _safe_eigh_jvp(broadening, primals, tangents):
    (a,), (da,) = primals, tangents
    w, v = jnp.linalg.eigh(a)
    da = 0.5 * (da + da.T)
    vt_da_v = v.T @ da @ v
    gap = w[None, :] - w[:, None]  # gap[i, j] = w_j - w_i
    factor = gap / (gap**2 + broadening)  # = 1 / gap away from degeneracies, 0 on the diagonal
    dw = jnp.diagonal(vt_da_v)
    dv = v @ (factor * vt_da_v)
    return (w, v), (dw, dv)


def roothaan(fock: jnp.ndarray, overlap: jnp.ndarray, min_overlap_eigenvalue: float = DEFAULT_MIN_OVERLAP_EIGENVALUE):
    """Orbital energies (M,) hartree and coefficients (M, M) (columns) of F C = S C eps.

    The coefficients are S-orthonormal: C^T S C = 1 (with S's clamped eigenvalues).
    """
    s, u = safe_eigh(overlap)
    s = jnp.maximum(s, min_overlap_eigenvalue)
    x = u / jnp.sqrt(s)[None, :]
    eps, c_orth = safe_eigh(x.T @ fock @ x)
    return eps, x @ c_orth


def density_matrix(coefficients: jnp.ndarray, n_occupied: int) -> jnp.ndarray:
    """(M, M) closed-shell AO density matrix 2 C_occ C_occ^T."""
    occ = coefficients[:, :n_occupied]
    return 2.0 * occ @ occ.T


def homo_lumo_gap(orbital_energies: jnp.ndarray, n_occupied: int) -> jnp.ndarray:
    """eps_LUMO - eps_HOMO, hartree."""
    return orbital_energies[n_occupied] - orbital_energies[n_occupied - 1]


def mulliken_charges(density: jnp.ndarray, overlap: jnp.ndarray, ao_atom: np.ndarray,
                     charges: jnp.ndarray) -> jnp.ndarray:
    """(n_atoms,) Mulliken partial charges Z_A - sum_{mu on A} (P S)_mu,mu, in e."""
    populations = jnp.diagonal(density @ overlap)
    n_atoms = charges.shape[0]
    electrons_on_atom = jax.ops.segment_sum(populations, jnp.asarray(ao_atom), num_segments=n_atoms)
    return charges - electrons_on_atom


def dipole_moment(density: jnp.ndarray, dipole_integrals: jnp.ndarray, charges: jnp.ndarray,
                  positions: jnp.ndarray) -> jnp.ndarray:
    """(3,) dipole moment about the origin, atomic units (e bohr).

    ``dipole_integrals``: (3, M, M) <mu| r |nu> about the origin (pyscf ``int1e_r``).
    """
    nuclear = jnp.einsum("a,ax->x", charges, positions)
    electronic = jnp.einsum("xij,ji->x", dipole_integrals, density)
    return nuclear - electronic


def nuclear_repulsion(charges: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """sum_{A<B} Z_A Z_B / |R_A - R_B|, hartree; finite gradients (no self-pairs in the norm)."""
    i, j = np.triu_indices(charges.shape[0], k=1)
    return jnp.sum(charges[i] * charges[j] / jnp.linalg.norm(positions[i] - positions[j], axis=-1))


def total_energy(fock: jnp.ndarray, overlap: jnp.ndarray, core_hamiltonian: jnp.ndarray, n_occupied: int,
                 charges: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """E = E_nuc + sum_{k occupied} (eps_k + (C^T H_core C)_kk), hartree (PhiSNet's energy).

    For Hartree-Fock matrices this is exactly the HF total energy; for a model it is the energy
    whose H_core head is trained on reference energies and (through autodiff) forces.
    """
    eps, coefficients = roothaan(fock, overlap)
    occ = coefficients[:, :n_occupied]
    one_electron = jnp.einsum("mk,mn,nk->", occ, core_hamiltonian, occ)
    return nuclear_repulsion(charges, positions) + jnp.sum(eps[:n_occupied]) + one_electron


def dipole_integrals(mol) -> np.ndarray:
    """(3, M, M) position integrals about the origin for a pyscf ``Mole``."""
    with mol.with_common_orig((0.0, 0.0, 0.0)):
        return np.asarray(mol.intor_symmetric("int1e_r", comp=3))


def write_cube_files(mol, density: np.ndarray, coefficients: np.ndarray, orbitals: list[int],
                     prefix: str, resolution: float = 0.2) -> list[str]:
    """Electron density and selected orbitals on a grid as Gaussian cube files (pyscf cubegen).

    Returns the written paths: ``<prefix>_density.cube`` and ``<prefix>_orbital<k>.cube``.
    Each file is written to a temporary name and renamed, so none is ever left half-written.
    """
    import os

    from pyscf.tools import cubegen

    paths = []
    target = f"{prefix}_density.cube"
    cubegen.density(mol, target + ".tmp", np.asarray(density), resolution=resolution)
    os.replace(target + ".tmp", target)
    paths.append(target)
    for k in orbitals:
        target = f"{prefix}_orbital{k}.cube"
        cubegen.orbital(mol, target + ".tmp", np.asarray(coefficients)[:, k], resolution=resolution)
        os.replace(target + ".tmp", target)
        paths.append(target)
    return paths
