"""Molecules: named molecules, XYZ files, validation, and conversion to pyscf.

Positions are in bohr everywhere inside the project; XYZ files are in angstrom and converted
on reading.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

from molfoundation.errors import InputError

BOHR_PER_ANGSTROM = 1.0 / 0.52917721092
MIN_DISTANCE_ANGSTROM = 0.3

# The SchNOrb/MD17 molecules and a few small ones; built from SMILES with RDKit.
NAMED_MOLECULES: dict[str, str] = {
    "water": "O",
    "ethanol": "CCO",
    "malondialdehyde": r"O=C/C=C\O",
    "uracil": "O=C1C=CNC(=O)N1",
    "benzene": "c1ccccc1",
    "toluene": "Cc1ccccc1",
    "naphthalene": "c1ccc2ccccc2c1",
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "salicylic_acid": "OC(=O)c1ccccc1O",
    "hydrogen": "[H][H]",
    "methane": "C",
    "ammonia": "N",
    "formaldehyde": "C=O",
    "methanol": "CO",
    "hydrogen_cyanide": "C#N",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Molecule:
    """A molecular geometry.

    Attributes:
      atomic_numbers: (n_atoms,) int.
      positions: (n_atoms, 3) bohr.
      charge: total charge in units of e.
      spin: 2S = N_alpha - N_beta (pyscf's convention).
    """

    atomic_numbers: np.ndarray
    positions: np.ndarray
    charge: int = 0
    spin: int = 0

    @property
    def n_electrons(self) -> int:
        return int(np.sum(self.atomic_numbers)) - self.charge

    @property
    def symbols(self) -> list[str]:
        from pyscf.data.elements import ELEMENTS

        return [ELEMENTS[int(z)] for z in self.atomic_numbers]

    @property
    def formula(self) -> str:
        """Hill formula, e.g. 'C2H6O'."""
        counts: dict[str, int] = {}
        for s in self.symbols:
            counts[s] = counts.get(s, 0) + 1
        order = (["C", "H"] if "C" in counts else []) + sorted(
            s for s in counts if not ("C" in counts and s in ("C", "H"))
        )
        return "".join(s + (str(counts[s]) if counts[s] > 1 else "") for s in order)

    def with_positions(self, positions: np.ndarray) -> "Molecule":
        return dataclasses.replace(self, positions=np.asarray(positions, dtype=np.float64))


def from_smiles(smiles: str, charge: int = 0, spin: int = 0, seed: int = 0) -> Molecule:
    """Molecule from SMILES: RDKit conformer embedding (seeded) and MMFF pre-optimisation."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise InputError(f"cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise InputError(f"RDKit could not embed a 3D conformer for SMILES {smiles!r}")
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    positions = mol.GetConformer().GetPositions() * BOHR_PER_ANGSTROM
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    return Molecule(numbers, positions, charge, spin)


def from_name(name: str, charge: int = 0, spin: int = 0) -> Molecule:
    """One of ``NAMED_MOLECULES`` (case-insensitive), before any quantum-chemical optimisation."""
    key = name.lower()
    if key not in NAMED_MOLECULES:
        raise InputError(
            f"unknown molecule {name!r}; known names: {', '.join(sorted(NAMED_MOLECULES))}"
        )
    return from_smiles(NAMED_MOLECULES[key], charge, spin)


def read_xyz(path: str, charge: int = 0, spin: int = 0) -> list[Molecule]:
    """All frames of an XYZ / extended-XYZ (or any ASE-readable) file, positions in bohr."""
    import ase.io

    if not os.path.isfile(path):
        raise InputError(f"geometry file not found: {path}")
    try:
        frames = ase.io.read(path, index=":")
    except Exception as exc:  # ASE raises many types for malformed files
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read geometry file {path}: {detail}") from None
    if not frames:
        raise InputError(f"geometry file {path} holds no structures")
    molecules = []
    for atoms in frames:
        numbers = np.asarray(atoms.get_atomic_numbers(), dtype=np.int64)
        if numbers.size == 0:
            raise InputError(f"geometry file {path} holds a structure with no atoms")
        molecules.append(
            Molecule(numbers, atoms.get_positions() * BOHR_PER_ANGSTROM, charge, spin)
        )
    return molecules


def write_xyz(path: str, molecules: list[Molecule], comments: list[str] | None = None) -> None:
    """Write molecules as a multi-frame XYZ file in angstrom."""
    lines = []
    for i, mol in enumerate(molecules):
        lines.append(str(len(mol.atomic_numbers)))
        lines.append(comments[i] if comments else "")
        for sym, pos in zip(mol.symbols, mol.positions / BOHR_PER_ANGSTROM):
            lines.append(f"{sym:2s} {pos[0]:16.10f} {pos[1]:16.10f} {pos[2]:16.10f}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def validate(molecule: Molecule, basis: str | None = None) -> None:
    """Raise ``InputError`` for a geometry no calculation should be attempted on.

    Checks: finite coordinates, known elements, no two atoms closer than 0.3 angstrom, a
    charge/spin combination with consistent electron parity, and (if ``basis`` is given)
    that the basis set defines every element.
    """
    from pyscf.data.elements import ELEMENTS

    z = np.asarray(molecule.atomic_numbers)
    pos = np.asarray(molecule.positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape != (z.size, 3):
        raise InputError(f"positions must have shape ({z.size}, 3), got {pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise InputError("geometry has non-finite (NaN or infinite) coordinates")
    if np.any(z < 1) or np.any(z >= len(ELEMENTS)):
        raise InputError(f"unknown element with atomic number {int(z[(z < 1) | (z >= len(ELEMENTS))][0])}")
    if z.size > 1:
        dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        dist[np.diag_indices(z.size)] = np.inf
        i, j = np.unravel_index(np.argmin(dist), dist.shape)
        if dist[i, j] < MIN_DISTANCE_ANGSTROM * BOHR_PER_ANGSTROM:
            raise InputError(
                f"atoms {i} ({ELEMENTS[z[i]]}) and {j} ({ELEMENTS[z[j]]}) are "
                f"{dist[i, j] / BOHR_PER_ANGSTROM:.3f} angstrom apart (minimum {MIN_DISTANCE_ANGSTROM})"
            )
    n_elec = molecule.n_electrons
    if n_elec <= 0:
        raise InputError(f"charge {molecule.charge} leaves {n_elec} electrons")
    if (n_elec - molecule.spin) % 2 != 0 or abs(molecule.spin) > n_elec:
        raise InputError(
            f"charge {molecule.charge} and spin {molecule.spin} (2S) are impossible for "
            f"{n_elec} electrons: N_electrons - 2S must be even and non-negative"
        )
    if basis is not None:
        check_basis_covers(basis, {ELEMENTS[int(n)] for n in z})


def check_basis_covers(basis: str, symbols: set[str]) -> None:
    """Raise ``InputError`` unless ``basis`` (a pyscf basis name) defines every element."""
    from pyscf import gto

    missing = []
    for sym in sorted(symbols):
        try:
            with warnings.catch_warnings():  # pyscf warns before raising for unknown names
                warnings.simplefilter("ignore")
                shells = gto.basis.load(basis, sym)
        except Exception:
            shells = None
        if not shells:
            missing.append(sym)
    if missing:
        raise InputError(f"basis {basis!r} has no functions for element(s) {', '.join(missing)}")


def to_pyscf(molecule: Molecule, basis: str, verbose: int = 0):
    """A built pyscf ``Mole`` (spherical AOs, positions in bohr)."""
    from pyscf import gto

    return gto.M(
        atom=[(int(z), tuple(p)) for z, p in zip(molecule.atomic_numbers, molecule.positions)],
        basis=basis,
        unit="Bohr",
        charge=molecule.charge,
        spin=molecule.spin,
        cart=False,
        verbose=verbose,
    )
