"""Hartree-Fock orbitals for the transferable wavefunction, and their values in JAX.

The ansatz is conditioned on the occupied Hartree-Fock orbitals of a molecule in a minimal
basis (STO-6G by default). They are made *reproducible* functions of the geometry:

1. restricted Hartree-Fock for closed shells, restricted open-shell (ROHF) otherwise, so that
   the spin-down orbitals are a subset of the spin-up space;
2. per spin, the occupied orbitals are localised with Foster-Boys (minimal total spread
   sum_k <r^2>_k - |<r>_k|^2), restarted until pyscf's stability analysis finds no descent
   direction (the first optimum it reaches is often a saddle point). Where localisation does
   not lower the spread (a single atom, whose orbitals are all centred on the nucleus) the
   canonical orbitals are kept, since any rotation among them would be equally "local";
3. orbitals are ordered canonically by their estimated energy <phi|F_sigma|phi> (hartree);
   ties (symmetry-equivalent bonds or lone pairs) are broken by their Mulliken atom
   populations, then by their centroids, so that the same geometry always gives the same order;
4. each orbital's sign is fixed so that its AO coefficients sum to a positive number.

Spin-up orbitals are the occupied alpha orbitals (doubly and singly occupied), spin-down ones
the doubly occupied orbitals. Coefficients are in pyscf's AO order; ``AOLayout`` describes the
shells. For supervised pretraining the orbitals are also evaluated at electron positions in
JAX (:func:`molfoundation.gaussians.make_ao_values`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from molfoundation.basis import AOLayout
from molfoundation.errors import InputError
from molfoundation.gaussians import GaussianBasis, make_ao_values
from vmc.systems import System

DEFAULT_BASIS = "sto-6g"
LOCALIZATIONS = ("boys", None)

# Tolerances of the canonical ordering: estimated orbital energies closer than this (hartree)
# are treated as ties (localisation converges them to ~1e-8, symmetry-equivalent orbitals
# are degenerate), and populations/centroids are compared after rounding to this many digits.
ENERGY_TIE_TOLERANCE = 1e-5
TIE_BREAK_DECIMALS = 4
# Localisation must lower the total spread (bohr^2) by more than this to replace canonical
# orbitals; below it the spread is flat in the orbital rotations (e.g. one atom).
MIN_SPREAD_GAIN = 1e-6
MAX_STABILITY_RESTARTS = 10


@dataclasses.dataclass(frozen=True, eq=False)
class HartreeFockOrbitals:
    """Occupied Hartree-Fock orbitals of one geometry, localised, ordered and sign-fixed.

    Attributes:
      coefficients: per spin (up, down), AO coefficients (n_ao, n_up) and (n_ao, n_down) in
        pyscf AO order; column k is orbital k.
      orbital_energies: per spin, (n_up,) and (n_down,) estimated orbital energies
        <phi_k|F_sigma|phi_k>, hartree, non-decreasing.
      layout: shells of the AO basis.
      basis: the contracted GTOs, for evaluating the orbitals (:func:`make_orbital_values`).
      basis_name: the pyscf basis-set name.
      atomic_numbers: (n_atoms,); atom_positions: (n_atoms, 3) bohr.
      energy: Hartree-Fock total energy, hartree.
      method: "RHF" or "ROHF"; "PhiSNet" (or another label) for orbitals of a given Fock matrix.
      localization: "boys" or None (canonical orbitals).
    """

    coefficients: tuple[np.ndarray, np.ndarray]
    orbital_energies: tuple[np.ndarray, np.ndarray]
    layout: AOLayout
    basis: GaussianBasis
    basis_name: str
    atomic_numbers: np.ndarray
    atom_positions: np.ndarray
    energy: float
    method: str
    localization: str | None

    @property
    def up(self) -> np.ndarray:
        return self.coefficients[0]

    @property
    def down(self) -> np.ndarray:
        return self.coefficients[1]


def _spread(mol, coefficients: np.ndarray) -> np.ndarray:
    """(n_orb,) Boys spread <r^2> - |<r>|^2 of each orbital, bohr^2."""
    r = mol.intor_symmetric("int1e_r")
    r2 = mol.intor_symmetric("int1e_r2")
    centroid = np.einsum("xpq,pk,qk->kx", r, coefficients, coefficients)
    return np.einsum("pq,pk,qk->k", r2, coefficients, coefficients) - np.sum(centroid**2, axis=1)


def _centroids(mol, coefficients: np.ndarray) -> np.ndarray:
    """(n_orb, 3) orbital centroids <r>, bohr."""
    r = mol.intor_symmetric("int1e_r")
    return np.einsum("xpq,pk,qk->kx", r, coefficients, coefficients)


def boys_localize(mol, coefficients: np.ndarray, conv_tol: float = 1e-10) -> np.ndarray:
    """Foster-Boys localisation of the orbitals ``coefficients`` (n_ao, n_orb), restarted
    from pyscf's stability analysis until it reaches a minimum of the total spread.

    Returns the canonical input unchanged when localisation gains less than
    ``MIN_SPREAD_GAIN`` bohr^2 of spread (e.g. the orbitals of a single atom).
    """
    from pyscf import lo

    coefficients = np.asarray(coefficients, dtype=np.float64)
    if coefficients.shape[1] <= 1:
        return coefficients.copy()
    localizer = lo.Boys(mol, coefficients)
    localizer.verbose = 0
    localizer.conv_tol = conv_tol
    localized = localizer.kernel()
    for _ in range(MAX_STABILITY_RESTARTS):
        rotated, stable = localizer.stability(return_status=True)
        if stable:
            break
        localized = localizer.kernel(rotated)
    if _spread(mol, localized).sum() > _spread(mol, coefficients).sum() - MIN_SPREAD_GAIN:
        return coefficients.copy()
    return np.asarray(localized)


def fix_signs(coefficients: np.ndarray) -> np.ndarray:
    """Flip orbitals (columns) so that each one's coefficient sum is positive.

    Where the sum vanishes (|sum| < 1e-8, e.g. an orbital odd under a symmetry of its atom's
    shells), the largest coefficient (the first of equals) is made positive instead.
    """
    coefficients = np.array(coefficients, dtype=np.float64)
    for k in range(coefficients.shape[1]):
        c = coefficients[:, k]
        total = c.sum()
        if abs(total) < 1e-8:
            total = c[np.argmax(np.round(np.abs(c), 10))]
        if total < 0:
            coefficients[:, k] = -c
    return coefficients


def canonical_order(energies: np.ndarray, populations: np.ndarray,
                    centroids: np.ndarray) -> np.ndarray:
    """Orbital order by estimated energy; ties broken by atom populations, then centroids.

    Args:
        energies: (n_orb,) hartree. populations: (n_orb, n_atoms) Mulliken populations.
        centroids: (n_orb, 3) bohr.
    Returns:
        (n_orb,) indices: ``coefficients[:, order]`` is the canonical order.
    """
    by_energy = np.argsort(energies, kind="stable")
    gaps = np.diff(energies[by_energy]) > ENERGY_TIE_TOLERANCE
    groups = np.split(by_energy, np.flatnonzero(gaps) + 1)

    def tie_key(k):
        # Larger populations on lower-index atoms first; then the centroid, lexicographically.
        pop = np.round(-populations[k], TIE_BREAK_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
        cen = np.round(centroids[k], TIE_BREAK_DECIMALS) + 0.0
        return tuple(pop.tolist()) + tuple(cen.tolist())

    order = [k for group in groups for k in sorted(group.tolist(), key=tie_key)]
    return np.asarray(order, dtype=np.int64)


def _finish(mol, coefficients, fock, overlap, layout) -> tuple[np.ndarray, np.ndarray]:
    """Order and sign-fix one spin's orbitals; returns (coefficients, energies)."""
    coefficients = fix_signs(coefficients)
    if coefficients.shape[1] == 0:
        return coefficients, np.zeros(0)
    energies = np.einsum("pk,pq,qk->k", coefficients, fock, coefficients)
    sc = overlap @ coefficients
    populations = np.stack(
        [np.sum(coefficients[sl] * sc[sl], axis=0) for sl in layout.atom_ao_slices], axis=1
    )
    order = canonical_order(energies, populations, _centroids(mol, coefficients))
    return coefficients[:, order], energies[order]


def hartree_fock(
    system: System,
    basis: str = DEFAULT_BASIS,
    localization: str | None = "boys",
    conv_tol: float = 1e-12,
) -> HartreeFockOrbitals:
    """Occupied HF orbitals of ``system`` per spin (RHF if spin = 0, else ROHF).

    Args:
        system: the molecule; its spin selects RHF (0) or ROHF.
        basis: pyscf basis-set name (minimal bases suit the orbital featurizer).
        localization: "boys" (Foster-Boys per spin) or None for canonical orbitals.
        conv_tol: SCF energy convergence (hartree). The localisation converges its spread to
            1e-10 bohr^2, which reproduces the orbitals of a rotated geometry to ~1e-7.

    Raises:
        InputError: basis does not cover the elements, or the SCF does not converge.
    """
    from pyscf import lib

    if localization not in LOCALIZATIONS:
        raise InputError(f"unknown localisation {localization!r}; expected one of {LOCALIZATIONS}")
    mol = system.to_pyscf(basis)
    # Minimal-basis problems are tiny; OpenMP threads only add overhead to their many small
    # matrix products (milliseconds each on a busy machine, tens of seconds per localisation).
    with lib.with_omp_threads(1):
        return _hartree_fock(system, mol, basis, localization, conv_tol)


def _hartree_fock(system, mol, basis, localization, conv_tol) -> HartreeFockOrbitals:
    from pyscf import scf

    mf = scf.RHF(mol) if system.spin == 0 else scf.ROHF(mol)
    mf.conv_tol = conv_tol
    mf.max_cycle = 200
    mf.verbose = 0
    mf.kernel()
    if not mf.converged:  # DIIS can oscillate; the second-order solver is slower but robust
        mf = mf.newton()
        mf.kernel(mf.mo_coeff, mf.mo_occ)
    if not mf.converged:
        raise InputError(
            f"Hartree-Fock did not converge for {system.name or 'the system'} in {basis}; "
            "check the geometry, charge and spin"
        )
    fock = mf.get_fock()
    focks = (fock, fock) if system.spin == 0 else (np.asarray(fock.focka), np.asarray(fock.fockb))
    overlap = mf.get_ovlp()
    layout = AOLayout.from_mole(mol)
    occupations = (mf.mo_occ > 0, mf.mo_occ > 1)

    coefficients, energies = [], []
    for spin in (0, 1):
        occupied = np.asarray(mf.mo_coeff[:, occupations[spin]])
        if spin == 1 and system.spin == 0:  # RHF: both spins share one set of orbitals
            coefficients.append(coefficients[0].copy())
            energies.append(energies[0].copy())
            continue
        if localization == "boys":
            occupied = boys_localize(mol, occupied)
        c, e = _finish(mol, occupied, np.asarray(focks[spin]), overlap, layout)
        coefficients.append(c)
        energies.append(e)
    for array in coefficients + energies:
        array.setflags(write=False)
    return HartreeFockOrbitals(
        coefficients=(coefficients[0], coefficients[1]),
        orbital_energies=(energies[0], energies[1]),
        layout=layout,
        basis=GaussianBasis.from_mole(mol),
        basis_name=basis,
        atomic_numbers=system.atomic_numbers,
        atom_positions=system.positions,
        energy=float(mf.e_tot),
        method="RHF" if system.spin == 0 else "ROHF",
        localization=localization,
    )


def orbitals_from_fock(
    system: System,
    fock: np.ndarray,
    overlap: np.ndarray,
    fock_basis: str,
    basis: str = DEFAULT_BASIS,
    localization: str | None = "boys",
    energy: float = float("nan"),
    method: str = "predicted",
) -> HartreeFockOrbitals:
    """Occupied closed-shell orbitals of a Fock matrix given in any AO basis (e.g. predicted by
    PhiSNet), expressed in the minimal ``basis`` the orbital featurizer takes.

    1. Roothaan equations F C = S C eps in ``fock_basis``; the n_electrons / 2 lowest orbitals
       are occupied.
    2. Localised (Boys), ordered and sign-fixed there, with this F and S, as for HF.
    3. Each orbital projected onto ``basis`` by least squares (C_min = S_mm^-1 S_mb C), the set
       made orthonormal again by Loewdin's symmetric orthonormalisation (the smallest change of
       every orbital), signs fixed again. Orbital energies are those of step 2.

    Args:
        fock, overlap: (M, M) in ``fock_basis``, pyscf AO order.
        energy: total energy to record (hartree), e.g. the model's prediction.
    """
    from pyscf import gto
    from scipy.linalg import eigh, solve

    if system.spin != 0:
        raise InputError("orbitals from a Fock matrix need a closed-shell system (spin 0)")
    big = system.to_pyscf(fock_basis)
    fock = np.asarray(fock, np.float64)
    overlap = np.asarray(overlap, np.float64)
    if fock.shape != (big.nao, big.nao) or overlap.shape != fock.shape:
        raise InputError(f"the Fock and overlap matrices must be {big.nao} x {big.nao} in "
                         f"{fock_basis} for {system.name or 'this system'}, got {fock.shape}")
    _, vectors = eigh(fock, overlap)
    occupied = vectors[:, : system.n_electrons // 2]
    if localization == "boys":
        occupied = boys_localize(big, occupied)
    elif localization is not None:
        raise InputError(f"unknown localisation {localization!r}; expected one of {LOCALIZATIONS}")
    occupied, energies = _finish(big, occupied, fock, overlap, AOLayout.from_mole(big))
    small = system.to_pyscf(basis)
    small_overlap = small.intor_symmetric("int1e_ovlp")
    projected = solve(small_overlap, gto.intor_cross("int1e_ovlp", small, big) @ occupied, assume_a="pos")
    metric_values, metric_vectors = eigh(projected.T @ small_overlap @ projected)
    coefficients = fix_signs(projected @ (metric_vectors / np.sqrt(metric_values)) @ metric_vectors.T)
    for array in (coefficients, energies):
        array.setflags(write=False)
    return HartreeFockOrbitals(
        coefficients=(coefficients, coefficients),
        orbital_energies=(energies, energies),
        layout=AOLayout.from_mole(small),
        basis=GaussianBasis.from_mole(small),
        basis_name=basis,
        atomic_numbers=system.atomic_numbers,
        atom_positions=system.positions,
        energy=float(energy),
        method=method,
        localization=localization,
    )


def predicted_orbitals(system: System, trained, basis: str = DEFAULT_BASIS,
                       localization: str | None = "boys") -> HartreeFockOrbitals:
    """Occupied orbitals of ``system`` from a trained PhiSNet model (``phisnet_jax.evaluate.
    TrainedModel``) instead of an SCF: predicted F and S -> :func:`orbitals_from_fock`."""
    from phisnet_jax.prediction import predict

    prediction = predict(trained, system.to_molecule())
    return orbitals_from_fock(system, prediction.fock, prediction.overlap, trained.config.basis,
                              basis, localization, energy=np.nan if prediction.energy is None
                              else prediction.energy, method="PhiSNet")


def make_orbital_values(orbitals: HartreeFockOrbitals) -> Callable:
    """The HF orbitals as functions of position, in jnp.

    Returns:
        ``fn(points: (n_points, 3) bohr) -> (up: (n_points, n_up), down: (n_points, n_down))``,
        the spin-up and spin-down orbitals at every point; jit-able.
    """
    import jax.numpy as jnp

    ao_values = make_ao_values(orbitals.basis)
    up, down = orbitals.coefficients
    positions = orbitals.atom_positions

    def orbital_values(points):
        aos = ao_values(positions, points)
        return aos @ jnp.asarray(up, aos.dtype), aos @ jnp.asarray(down, aos.dtype)

    return orbital_values
