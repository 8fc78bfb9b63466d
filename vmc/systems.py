"""Systems for variational Monte Carlo: nuclei (charges and positions) and electron counts.

A :class:`System` is what a wavefunction is trained on: the atoms (atomic numbers and positions
in bohr), the total charge and the spin 2S = n_up - n_down. Electrons are ordered spin-up
first, so a configuration ``(n_electrons, 3)`` bohr holds the ``n_up`` spin-up electrons in its
first rows.

Systems come from a pyscf ``Mole`` (:func:`from_mole`), an XYZ file in angstrom
(:func:`from_xyz`), a name (:func:`from_name`: single atoms by element symbol, a few small
molecules at fixed reference geometries, and hydrogen chains ``H<n>``), or any of these through
:func:`load`. Every constructor validates its input and raises
:class:`~molfoundation.errors.InputError` with a one-line message for anything no calculation
should be attempted on.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from molfoundation import molecules
from molfoundation.elements import AUFBAU_ORDER
from molfoundation.errors import InputError

DEFAULT_CHAIN_SPACING = 1.8  # bohr; the spacing of the H6/H10 chains of the reference work

# Reference geometries, bohr. Diatomics lie on the z axis with the first atom at the origin.
H2_BOND = 1.4
LIH_BOND = 3.015
N2_BOND = 2.068
# Experimental equilibrium structures: r(OH) 0.9572 angstrom, HOH 104.52 degrees;
# r(CH) 1.087 angstrom, tetrahedral.
H2O_BOND = 0.9572 * molecules.BOHR_PER_ANGSTROM
H2O_ANGLE_DEGREES = 104.52
CH4_BOND = 1.087 * molecules.BOHR_PER_ANGSTROM

# Largest atomic number for single atoms by name: the Aufbau/Hund spin estimate below is
# the true ground-state multiplicity for every element up to krypton except Cr and Cu.
MAX_NAMED_ATOM = 36


@dataclasses.dataclass(frozen=True, eq=False)
class System:
    """Nuclei and electron counts of one molecule or atom.

    Attributes:
      atomic_numbers: (n_atoms,) int64, the nuclear charges.
      positions: (n_atoms, 3) float64, bohr.
      charge: total charge in units of e.
      spin: 2S = n_up - n_down (pyscf's convention); never negative, since spin-up electrons
        are the majority by convention.
      name: a label for logs and results (not used in any calculation).
    """

    atomic_numbers: np.ndarray
    positions: np.ndarray
    charge: int = 0
    spin: int = 0
    name: str = ""

    def __post_init__(self):
        numbers = np.asarray(self.atomic_numbers)
        if numbers.ndim != 1 or numbers.size == 0:
            raise InputError("a system needs a non-empty 1-D list of atomic numbers")
        if not np.all(np.equal(np.mod(numbers, 1), 0)):
            raise InputError("atomic numbers must be integers")
        numbers = numbers.astype(np.int64)
        try:
            positions = np.asarray(self.positions, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError("atom positions must be numbers") from None
        if int(self.charge) != self.charge or int(self.spin) != self.spin:
            raise InputError("charge and spin must be integers")
        # The arrays are made read-only: a System is a value, shared by closures and caches.
        numbers.setflags(write=False)
        positions = positions.copy()
        positions.setflags(write=False)
        object.__setattr__(self, "atomic_numbers", numbers)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "charge", int(self.charge))
        object.__setattr__(self, "spin", int(self.spin))
        molecules.validate(self.to_molecule())
        if self.spin < 0:
            raise InputError(
                f"spin (2S = n_up - n_down) must not be negative, got {self.spin}: "
                "spin-up electrons are the majority by convention"
            )

    @property
    def n_atoms(self) -> int:
        return int(self.atomic_numbers.size)

    @property
    def n_electrons(self) -> int:
        return int(np.sum(self.atomic_numbers)) - self.charge

    @property
    def n_up(self) -> int:
        return (self.n_electrons + self.spin) // 2

    @property
    def n_down(self) -> int:
        return (self.n_electrons - self.spin) // 2

    @property
    def charges(self) -> np.ndarray:
        """(n_atoms,) float64 nuclear charges, as the Hamiltonian takes them."""
        return self.atomic_numbers.astype(np.float64)

    @property
    def symbols(self) -> list[str]:
        return self.to_molecule().symbols

    def to_molecule(self) -> molecules.Molecule:
        """The same geometry as a :class:`molfoundation.molecules.Molecule`."""
        return molecules.Molecule(self.atomic_numbers, self.positions, self.charge, self.spin)

    def to_pyscf(self, basis: str, verbose: int = 0):
        """A built pyscf ``Mole`` in ``basis`` (spherical AOs, bohr); InputError if the basis
        does not cover every element."""
        molecules.check_basis_covers(basis, set(self.symbols))
        return molecules.to_pyscf(self.to_molecule(), basis, verbose=verbose)

    def with_positions(self, positions: np.ndarray) -> "System":
        """The same system at other nuclear positions (n_atoms, 3) bohr."""
        return dataclasses.replace(self, positions=np.asarray(positions, dtype=np.float64))

    def rotated(self, rotation: np.ndarray) -> "System":
        """The system rotated about the origin: positions x -> x @ R.T."""
        return self.with_positions(self.positions @ np.asarray(rotation, dtype=np.float64).T)


def lowest_spin(n_electrons: int) -> int:
    """The smallest 2S for ``n_electrons``: 0 if even, 1 if odd."""
    return int(n_electrons) % 2


def hund_spin(n_electrons: int) -> int:
    """2S of the ground state of an atom (or ion) with ``n_electrons`` by Aufbau and Hund's rule.

    The last, partly filled subshell of order l holds ``n`` electrons in 2l+1 orbitals; they
    stay unpaired up to half filling. Correct for every element up to krypton except the
    d-shell exceptions (Cr, Cu, and their isoelectronic ions).
    """
    remaining = int(n_electrons)
    unpaired = 0
    for _, l in AUFBAU_ORDER:
        if remaining <= 0:
            break
        capacity = 2 * (2 * l + 1)
        n = min(remaining, capacity)
        unpaired = n if n <= 2 * l + 1 else capacity - n
        remaining -= n
    return unpaired


def single_atom(element: str | int, charge: int = 0, spin: int | None = None) -> System:
    """One atom at the origin; ``spin=None`` takes the ground-state spin of
    :func:`hund_spin`."""
    from pyscf.data.elements import ELEMENTS

    if isinstance(element, str):
        matches = [z for z, sym in enumerate(ELEMENTS) if z > 0 and sym.lower() == element.lower()]
        if not matches:
            raise InputError(f"unknown element {element!r}")
        z = matches[0]
    else:
        z = int(element)
    if not 1 <= z <= MAX_NAMED_ATOM:
        raise InputError(f"single atoms are supported up to Z = {MAX_NAMED_ATOM}, got Z = {z}")
    if spin is None:
        spin = hund_spin(z - charge)
    return System(np.array([z]), np.zeros((1, 3)), charge, spin, name=ELEMENTS[z])


def hydrogen_chain(n: int, spacing: float = DEFAULT_CHAIN_SPACING, charge: int = 0,
                   spin: int | None = None) -> System:
    """``n`` hydrogen atoms equally spaced by ``spacing`` bohr on the z axis, centred at the
    origin; ``spin=None`` is the lowest spin."""
    if int(n) != n or n < 1:
        raise InputError(f"a hydrogen chain needs a positive whole number of atoms, got {n}")
    n = int(n)
    if not np.isfinite(spacing) or spacing <= 0:
        raise InputError(f"hydrogen chain spacing must be a positive length in bohr, got {spacing}")
    z = (np.arange(n) - (n - 1) / 2) * float(spacing)
    positions = np.stack([np.zeros(n), np.zeros(n), z], axis=1)
    if spin is None:
        spin = lowest_spin(n - charge)
    return System(np.ones(n, dtype=np.int64), positions, charge, spin, name=f"H{n}")


def _diatomic(z1: int, z2: int, bond: float) -> tuple[np.ndarray, np.ndarray]:
    return np.array([z1, z2]), np.array([[0.0, 0.0, 0.0], [0.0, 0.0, bond]])


def _water() -> tuple[np.ndarray, np.ndarray]:
    half = np.deg2rad(H2O_ANGLE_DEGREES) / 2
    x, z = H2O_BOND * np.sin(half), H2O_BOND * np.cos(half)
    return np.array([8, 1, 1]), np.array([[0.0, 0.0, 0.0], [x, 0.0, z], [-x, 0.0, z]])


def _methane() -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)
    return np.array([6, 1, 1, 1, 1]), np.concatenate(
        [np.zeros((1, 3)), corners * CH4_BOND / np.sqrt(3.0)]
    )


# Named molecules (case-sensitive keys as chemists write them; lookup is case-insensitive).
_MOLECULES = {
    "H2": lambda: _diatomic(1, 1, H2_BOND),
    "LiH": lambda: _diatomic(3, 1, LIH_BOND),
    "N2": lambda: _diatomic(7, 7, N2_BOND),
    "H2O": _water,
    "CH4": _methane,
}
_CHAIN = re.compile(r"^h(\d+)$", re.IGNORECASE)


def named_systems() -> tuple[str, ...]:
    """The molecule names :func:`from_name` knows, besides element symbols and ``H<n>``."""
    return tuple(_MOLECULES)


def from_name(name: str, charge: int = 0, spin: int | None = None,
              chain_spacing: float = DEFAULT_CHAIN_SPACING) -> System:
    """A system by name (case-insensitive).

    - an element symbol (``H``, ``Li``, ``Be``, ...): the atom at the origin, by default in its
      ground-state spin;
    - ``H2`` (1.4 bohr), ``LiH`` (3.015 bohr), ``N2`` (2.068 bohr), ``H2O``, ``CH4``: reference
      geometries, by default at the lowest spin;
    - ``H<n>`` with n >= 3: a hydrogen chain with ``chain_spacing`` bohr between atoms.

    ``spin=None`` picks the default spin described above.
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError("a system name must be a non-empty string")
    key = name.strip()
    for known, build in _MOLECULES.items():
        if key.lower() == known.lower():
            numbers, positions = build()
            if spin is None:
                spin = lowest_spin(int(numbers.sum()) - charge)
            return System(numbers, positions, charge, spin, name=known)
    chain = _CHAIN.match(key)
    if chain and int(chain.group(1)) >= 3:
        return hydrogen_chain(int(chain.group(1)), chain_spacing, charge, spin)
    try:
        return single_atom(key, charge, spin)
    except InputError as exc:
        if str(exc).startswith("unknown element"):
            raise InputError(
                f"unknown system {name!r}; known: element symbols, {', '.join(_MOLECULES)}, "
                "and hydrogen chains H<n>"
            ) from None
        raise


def from_mole(mol) -> System:
    """The nuclei, charge and spin of a built pyscf ``Mole`` (all-electron; no ECPs)."""
    if getattr(mol, "_atm", None) is None or mol.natm == 0:
        raise InputError("the pyscf Mole has no atoms (was it built?)")
    if mol.has_ecp():
        raise InputError("molecules with effective core potentials are not supported")
    numbers = np.asarray(mol.atom_charges(), dtype=np.int64)
    if np.any(numbers <= 0):
        raise InputError("ghost atoms and atoms without nuclear charge are not supported")
    return System(numbers, np.asarray(mol.atom_coords(unit="Bohr")), int(mol.charge),
                  int(mol.spin), name=mol.atom_pure_symbol(0) if mol.natm == 1 else "")


def from_xyz(path: str, charge: int = 0, spin: int | None = None, frame: int = 0) -> System:
    """One frame of an XYZ file (angstrom, converted to bohr); ``spin=None`` is the lowest."""
    frames = molecules.read_xyz(path, charge=charge, spin=0)
    if not -len(frames) <= frame < len(frames):
        raise InputError(f"geometry file {path} has {len(frames)} frame(s), no frame {frame}")
    mol = frames[frame]
    if spin is None:
        spin = lowest_spin(mol.n_electrons)
    name = os.path.splitext(os.path.basename(path))[0]
    return System(mol.atomic_numbers, mol.positions, charge, spin, name=name)


def load(spec: str, charge: int = 0, spin: int | None = None,
         chain_spacing: float = DEFAULT_CHAIN_SPACING) -> System:
    """A system from a command-line style specification: an existing file or a path ending in
    ``.xyz`` is read as XYZ, anything else is a name for :func:`from_name`."""
    if os.path.isfile(spec) or spec.lower().endswith(".xyz"):
        return from_xyz(spec, charge=charge, spin=spin)
    return from_name(spec, charge=charge, spin=spin, chain_spacing=chain_spacing)
