"""Geometry ensembles: optimisation, harmonic normal modes, and thermal sampling.

An ensemble produces geometry ``i`` deterministically from its own seed and ``i`` alone, so an
interrupted or extended generation run produces exactly the same geometries again.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from molfoundation.errors import InputError
from molfoundation.molecules import Molecule, to_pyscf
from phisnet_jax.reference import LevelOfTheory, make_scf

ELECTRON_MASSES_PER_AMU = 1822.888486
KELVIN_TO_HARTREE = 3.166811563e-6  # Boltzmann constant in hartree per kelvin
HARTREE_TO_WAVENUMBER = 219474.6313702  # cm^-1
# Modes softer than this (|omega| in cm^-1) are numerical noise of rigid-body motion or grids.
SOFT_MODE_WAVENUMBER = 20.0


def optimize(molecule: Molecule, level: LevelOfTheory, max_steps: int = 200) -> Molecule:
    """Minimum-energy geometry at ``level`` (geomeTRIC through pyscf)."""
    from pyscf.geomopt.geometric_solver import kernel as geometric_kernel

    mf = make_scf(to_pyscf(molecule, level.basis), level)
    quiet_logging = os.path.join(os.path.dirname(__file__), "data", "geometric_quiet.ini")
    converged, mol_eq = geometric_kernel(mf, maxsteps=max_steps, logIni=quiet_logging)
    if not converged:
        raise RuntimeError(f"geometry optimisation did not converge in {max_steps} steps")
    return molecule.with_positions(mol_eq.atom_coords(unit="Bohr"))


def hessian(molecule: Molecule, level: LevelOfTheory) -> np.ndarray:
    """(3 n_atoms, 3 n_atoms) analytic Cartesian Hessian, hartree/bohr^2."""
    mf = make_scf(to_pyscf(molecule, level.basis), level)
    mf.kernel()
    if not mf.converged:
        raise RuntimeError("SCF did not converge at the reference geometry")
    hess = mf.Hessian()
    hess.verbose = 0
    h = np.asarray(hess.kernel())  # (n_atoms, n_atoms, 3, 3)
    n = h.shape[0]
    return h.transpose(0, 2, 1, 3).reshape(3 * n, 3 * n)


def atomic_masses(atomic_numbers: np.ndarray) -> np.ndarray:
    """(n_atoms,) isotope-averaged masses in electron masses."""
    from pyscf.data.elements import MASSES

    return np.array([MASSES[int(z)] for z in atomic_numbers]) * ELECTRON_MASSES_PER_AMU


@dataclasses.dataclass(frozen=True, eq=False)
class NormalModes:
    """Harmonic vibrations about an equilibrium geometry.

    Attributes:
      frequencies: (n_modes,) angular frequencies omega, hartree (atomic units).
      displacements: (n_modes, n_atoms, 3) Cartesian displacement (bohr) per unit of the
        mass-weighted normal coordinate, i.e. M^-1/2 L.
    """

    frequencies: np.ndarray
    displacements: np.ndarray

    @property
    def wavenumbers(self) -> np.ndarray:
        return self.frequencies * HARTREE_TO_WAVENUMBER


def normal_modes(molecule: Molecule, cartesian_hessian: np.ndarray) -> NormalModes:
    """Vibrational normal modes, with translations and rotations projected out exactly.

    Raises ``InputError`` if the geometry has an imaginary frequency (not a minimum).
    """
    masses = atomic_masses(molecule.atomic_numbers)
    n = masses.size
    sqrt_m = np.repeat(np.sqrt(masses), 3)
    h_mw = cartesian_hessian / np.outer(sqrt_m, sqrt_m)
    h_mw = 0.5 * (h_mw + h_mw.T)

    # Rigid-body motions in mass-weighted coordinates; rank 5 for linear molecules.
    com = masses @ molecule.positions / masses.sum()
    rel = molecule.positions - com
    rigid = []
    for axis in np.eye(3):
        rigid.append(np.tile(axis, n) * sqrt_m)  # translation
        rigid.append(np.cross(axis, rel).reshape(-1) * sqrt_m)  # rotation
    u, s, _ = np.linalg.svd(np.array(rigid).T, full_matrices=True)
    rank = int(np.sum(s > 1e-6 * s.max()))
    vibrational_space = u[:, rank:]  # orthonormal complement of rigid-body motions

    eigvals, eigvecs = np.linalg.eigh(vibrational_space.T @ h_mw @ vibrational_space)
    omega = np.sign(eigvals) * np.sqrt(np.abs(eigvals))
    if np.any(omega * HARTREE_TO_WAVENUMBER < -SOFT_MODE_WAVENUMBER):
        worst = omega.min() * HARTREE_TO_WAVENUMBER
        raise InputError(
            f"geometry is not a minimum: imaginary frequency {abs(worst):.1f}i cm^-1 "
            "(optimise it first)"
        )
    keep = omega * HARTREE_TO_WAVENUMBER > SOFT_MODE_WAVENUMBER
    modes_mw = (vibrational_space @ eigvecs[:, keep]).T  # (n_modes, 3n)
    return NormalModes(omega[keep], (modes_mw / sqrt_m).reshape(-1, n, 3))


def normal_mode_displacement(
    modes: NormalModes, temperature: float, rng: np.random.Generator, quantum: bool = False
) -> np.ndarray:
    """(n_atoms, 3) random displacement (bohr) from the harmonic thermal distribution.

    Classical (default): each normal coordinate has variance kT / omega^2, so the harmonic
    potential energy averages to kT / 2 per mode (equipartition). Quantum: the exact harmonic
    oscillator position variance coth(omega / 2kT) / (2 omega), which includes zero-point motion.
    """
    omega = modes.frequencies
    kt = temperature * KELVIN_TO_HARTREE
    if quantum:
        variance = 1.0 / (2.0 * omega * np.tanh(omega / (2.0 * kt))) if kt > 0 else 1.0 / (2.0 * omega)
    else:
        variance = kt / omega**2
    q = rng.normal(size=omega.shape) * np.sqrt(variance)
    # A plain reduction, not einsum/BLAS: its summation order does not depend on the number of
    # threads, so geometries are bitwise identical in every process that regenerates them.
    return (q[:, None, None] * modes.displacements).sum(axis=0)


@dataclasses.dataclass(frozen=True, eq=False)
class ThermalEnsemble:
    """Geometries sampled from harmonic vibrations at a temperature, reproducible from a seed.

    Geometry ``i`` uses the random stream ``(seed, i)`` only; ``i = 0`` is the equilibrium.
    """

    equilibrium: Molecule
    modes: NormalModes
    temperature: float
    seed: int
    quantum: bool = False

    kind = "normal_modes"

    def geometry(self, index: int) -> Molecule:
        if index == 0:
            return self.equilibrium
        rng = np.random.default_rng([self.seed, index])
        dx = normal_mode_displacement(self.modes, self.temperature, rng, self.quantum)
        return self.equilibrium.with_positions(self.equilibrium.positions + dx)

    @property
    def capacity(self) -> int | None:
        return None  # unlimited

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        arrays = {
            "atomic_numbers": self.equilibrium.atomic_numbers,
            "equilibrium_positions": self.equilibrium.positions,
            "mode_frequencies": self.modes.frequencies,
            "mode_displacements": self.modes.displacements,
        }
        attrs = {
            "kind": self.kind,
            "temperature_kelvin": float(self.temperature),
            "seed": int(self.seed),
            "quantum": bool(self.quantum),
            "charge": int(self.equilibrium.charge),
            "spin": int(self.equilibrium.spin),
        }
        return arrays, attrs


@dataclasses.dataclass(frozen=True, eq=False)
class TrajectoryEnsemble:
    """Geometries taken in order from a user's trajectory."""

    frames: tuple[Molecule, ...]

    kind = "trajectory"

    def geometry(self, index: int) -> Molecule:
        return self.frames[index]

    @property
    def capacity(self) -> int | None:
        return len(self.frames)

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        arrays = {
            "atomic_numbers": self.frames[0].atomic_numbers,
            "trajectory_positions": np.stack([f.positions for f in self.frames]),
        }
        attrs = {
            "kind": self.kind,
            "charge": int(self.frames[0].charge),
            "spin": int(self.frames[0].spin),
        }
        return arrays, attrs


def ensemble_from_arrays(arrays: dict[str, np.ndarray], attrs: dict):
    """Inverse of ``to_arrays`` for either ensemble kind."""
    z = np.asarray(arrays["atomic_numbers"])
    charge, spin = int(attrs["charge"]), int(attrs["spin"])
    if attrs["kind"] == ThermalEnsemble.kind:
        eq = Molecule(z, np.asarray(arrays["equilibrium_positions"]), charge, spin)
        modes = NormalModes(
            np.asarray(arrays["mode_frequencies"]), np.asarray(arrays["mode_displacements"])
        )
        return ThermalEnsemble(
            eq, modes, float(attrs["temperature_kelvin"]), int(attrs["seed"]), bool(attrs["quantum"])
        )
    if attrs["kind"] == TrajectoryEnsemble.kind:
        frames = tuple(
            Molecule(z, p, charge, spin) for p in np.asarray(arrays["trajectory_positions"])
        )
        return TrajectoryEnsemble(frames)
    raise ValueError(f"unknown ensemble kind {attrs['kind']!r}")


def thermal_ensemble(
    start: Molecule,
    level: LevelOfTheory,
    temperature: float,
    seed: int,
    quantum: bool = False,
    optimize_first: bool = True,
) -> ThermalEnsemble:
    """Optimise (optionally), compute the Hessian and set up thermal normal-mode sampling."""
    if temperature < 0 or not np.isfinite(temperature):
        raise InputError(f"temperature must be a non-negative number of kelvin, got {temperature}")
    equilibrium = optimize(start, level) if optimize_first else start
    modes = normal_modes(equilibrium, hessian(equilibrium, level))
    return ThermalEnsemble(equilibrium, modes, float(temperature), int(seed), quantum)
