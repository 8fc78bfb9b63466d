"""Per-element tables: electron-configuration descriptors and AO shells of a basis set."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from molfoundation.errors import InputError

# Subshells in Aufbau (Madelung) filling order: (n, l).
AUFBAU_ORDER = [
    (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (3, 2), (4, 1), (5, 0), (4, 2), (5, 1),
    (6, 0), (4, 3), (5, 2), (6, 1), (7, 0), (5, 3), (6, 2), (7, 1),
]


def electron_configuration(z: int) -> np.ndarray:
    """(19,) fractional occupations of the Aufbau subshells of a neutral atom (0..1 each).

    A fixed chemical descriptor of the element for the embedding: two elements of the same
    group differ only in which subshells are filled.
    """
    occupation = np.zeros(len(AUFBAU_ORDER))
    remaining = int(z)
    for k, (_, l) in enumerate(AUFBAU_ORDER):
        capacity = 2 * (2 * l + 1)
        occupation[k] = min(remaining, capacity) / capacity
        remaining -= min(remaining, capacity)
    return occupation


@dataclasses.dataclass(frozen=True)
class ElementBasis:
    """The AO shells of each element of a model's vocabulary in one basis set.

    Attributes:
      elements: atomic numbers the model knows, e.g. (1, 6, 7, 8).
      basis: pyscf basis-set name.
      shells: per element, the angular momenta of its shells in pyscf order.
    """

    elements: tuple[int, ...]
    basis: str
    shells: tuple[tuple[int, ...], ...]

    @property
    def max_l(self) -> int:
        return max(max(s) for s in self.shells)

    @property
    def max_atom_ao(self) -> int:
        """Largest number of AOs on one atom: the size of a padded atom-pair block."""
        return max(sum(2 * l + 1 for l in s) for s in self.shells)

    def atom_ao(self, element_index: int) -> int:
        return sum(2 * l + 1 for l in self.shells[element_index])

    def index_of(self, atomic_numbers) -> np.ndarray:
        """Element indices for atomic numbers; ``InputError`` for an element the model lacks."""
        lookup = {z: i for i, z in enumerate(self.elements)}
        unknown = sorted({int(z) for z in atomic_numbers if int(z) not in lookup})
        if unknown:
            raise InputError(
                f"the model knows elements {list(self.elements)}, not atomic number(s) {unknown}"
            )
        return np.array([lookup[int(z)] for z in atomic_numbers], dtype=np.int32)


@functools.lru_cache(maxsize=None)
def element_basis(elements: tuple[int, ...], basis: str) -> ElementBasis:
    """Shells of every element in ``basis``, from pyscf (one contraction per shell)."""
    from pyscf.data.elements import ELEMENTS

    from molfoundation.basis import AOLayout
    from molfoundation.molecules import Molecule, check_basis_covers, to_pyscf

    check_basis_covers(basis, {ELEMENTS[z] for z in elements})
    shells = []
    for z in elements:
        atom = Molecule(np.array([z]), np.zeros((1, 3)), charge=0, spin=z % 2)
        shells.append(AOLayout.from_mole(to_pyscf(atom, basis)).atom_shell_l(0))
    return ElementBasis(tuple(int(z) for z in elements), basis.lower(), tuple(shells))


def onsite_overlap_blocks(element_basis_: ElementBasis) -> np.ndarray:
    """(n_elements, A, A) exact overlap among the AOs of one atom (A = max_atom_ao, zero-padded).

    These blocks do not depend on geometry, so the model uses them as they are; their diagonal
    is exactly 1 because pyscf's AOs are normalised.
    """
    from molfoundation.molecules import Molecule, to_pyscf

    A = element_basis_.max_atom_ao
    blocks = np.zeros((len(element_basis_.elements), A, A))
    for i, z in enumerate(element_basis_.elements):
        atom = Molecule(np.array([z]), np.zeros((1, 3)), charge=0, spin=z % 2)
        S = to_pyscf(atom, element_basis_.basis).intor("int1e_ovlp")
        np.fill_diagonal(S, 1.0)  # normalised AOs; pyscf's integrals give 1 +- a few ulp
        blocks[i, : S.shape[0], : S.shape[0]] = S
    return blocks
