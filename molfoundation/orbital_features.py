"""Orbital featurizer: AO coefficients of orbitals -> per-atom equivariant irreps features.

This is where the two pillars meet. Orbitals from any source (Hartree-Fock from pyscf, or
coefficients derived from a PhiSNet-predicted Fock matrix) are given only as AO coefficients
``(n_ao, n_orb)`` in pyscf's AO order together with the ``AOLayout`` of the basis; for orbital
k and atom I the feature is the vector of coefficients of the AOs on atom I, expressed in e3nn
irreps (``pyscf_to_e3nn`` per shell) and placed in element-independent slots:

- the i-th shell of angular momentum l on an atom (in pyscf's shell order) fills slot i of
  order l; unused slots stay zero. For a minimal basis of H-Ne (STO-nG: 1s | 1s 2s 2p) the
  default ``MINIMAL_BASIS_SLOTS`` hold two s shells and one p shell, irreps ``2x0e+1x1o``:
  hydrogen fills slot s0, carbon fills s0 (1s), s1 (2s) and p0 (2p).
- an atom with more shells of some order than the slots hold (Na-Ar in a minimal basis has
  three s and two p shells; split-valence or polarised bases add more) raises ``InputError``
  naming the atom, its shells and the slots. Larger bases need a larger ``FeatureSlots``
  (and a model built for it); nothing is silently dropped or truncated.

Under a rotation R of the molecule (positions x -> x @ R.T) the AO coefficients of an orbital
transform as C -> D_AO(R) C, so every atom's feature transforms by the e3nn Wigner matrix of
``slots.irreps``: features(R x) = features(x) @ D(R).T per atom (up to the orbital's sign,
which the consumer must be insensitive to, and a permutation of equivalent orbitals). Parity
is kept: p coefficients are ``1o``, so improper rotations act correctly as well.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from molfoundation.basis import AOLayout, pyscf_to_e3nn
from molfoundation.errors import InputError


@dataclasses.dataclass(frozen=True)
class FeatureSlots:
    """A fixed per-atom irreps layout: ``channels[l]`` slots for shells of angular momentum l.

    The feature vector of one (orbital, atom) holds all l = 0 slots first, then all l = 1
    slots, and so on (e3nn order ``n0x0e + n1x1o + n2x2e + ...``).
    """

    channels: tuple[int, ...] = (2, 1)

    def __post_init__(self):
        if not self.channels or any(int(n) < 0 for n in self.channels):
            raise ValueError(f"slot counts must be non-negative integers, got {self.channels}")

    @property
    def max_l(self) -> int:
        return len(self.channels) - 1

    @property
    def irreps(self):
        """e3nn Irreps of one atom's feature, e.g. ``2x0e+1x1o``."""
        import e3nn_jax as e3nn

        return e3nn.Irreps(
            [(n, (l, 1 if l % 2 == 0 else -1)) for l, n in enumerate(self.channels) if n > 0]
        )

    @property
    def dim(self) -> int:
        return sum(n * (2 * l + 1) for l, n in enumerate(self.channels))

    def slot_offset(self, l: int, index: int) -> int:
        """Position of the first component of slot ``index`` of order ``l`` in the feature."""
        before = sum(n * (2 * k + 1) for k, n in enumerate(self.channels[:l]))
        return before + index * (2 * l + 1)


# STO-nG for H-Ne: at most 1s, 2s and 2p on any atom.
MINIMAL_BASIS_SLOTS = FeatureSlots((2, 1))


def _element_symbol(atomic_numbers, atom: int) -> str:
    if atomic_numbers is None:
        return ""
    from pyscf.data.elements import ELEMENTS

    return f" ({ELEMENTS[int(atomic_numbers[atom])]})"


def slot_matrix(layout: AOLayout, slots: FeatureSlots = MINIMAL_BASIS_SLOTS,
                atomic_numbers=None) -> np.ndarray:
    """(n_atoms, slots.dim, n_ao) float64 map from AO coefficients to per-atom slot features.

    ``features[I] = T[I] @ c`` for an orbital's coefficient vector ``c`` (n_ao,). Each row is
    zero or a row of ``pyscf_to_e3nn(l)`` placed at the AOs of one shell.

    Raises:
        InputError: an atom has more shells of some order than ``slots`` holds.
    """
    T = np.zeros((layout.n_atoms, slots.dim, layout.n_ao))
    used: dict[tuple[int, int], int] = {}
    for shell, (atom, l) in enumerate(zip(layout.shell_atom, layout.shell_l)):
        index = used.get((atom, l), 0)
        used[(atom, l)] = index + 1
        if l > slots.max_l or index >= slots.channels[l]:
            shells = "".join(f"{n}{'spdfg'[k]}" for k, n in _count_shells(layout, atom).items())
            raise InputError(
                f"atom {atom}{_element_symbol(atomic_numbers, atom)} has shells {shells} but "
                f"the orbital feature slots hold only {slots.irreps}; use a minimal basis "
                "(e.g. STO-6G) for H-Ne, or a model with larger FeatureSlots"
            )
        start = slots.slot_offset(l, index)
        sl = layout.shell_slices[shell]
        T[atom, start:start + 2 * l + 1, sl] = pyscf_to_e3nn(l)
    return T


def _count_shells(layout: AOLayout, atom: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    for l in layout.atom_shell_l(atom):
        counts[l] = counts.get(l, 0) + 1
    return dict(sorted(counts.items()))


@functools.lru_cache(maxsize=64)
def _cached_slot_matrix(layout: AOLayout, slots: FeatureSlots, atomic_numbers) -> np.ndarray:
    T = slot_matrix(layout, slots, atomic_numbers)
    T.setflags(write=False)
    return T


def orbital_features(coefficients, layout: AOLayout,
                     slots: FeatureSlots = MINIMAL_BASIS_SLOTS, atomic_numbers=None):
    """Per-(orbital, atom) equivariant features of orbitals given as AO coefficients.

    Args:
        coefficients: (n_ao, n_orb) AO coefficients in pyscf order (numpy or jax; any float
            dtype, kept). ``n_orb`` may be zero.
        layout: the AO basis's shells (``AOLayout.from_mole``).
        slots: the fixed per-atom irreps layout.
        atomic_numbers: (n_atoms,), optional; only names elements in error messages.

    Returns:
        e3nn IrrepsArray of irreps ``slots.irreps`` and shape (n_orb, n_atoms, slots.dim):
        the coefficients of orbital k's AOs on atom I, in e3nn components. Linear in the
        coefficients and differentiable (a fixed sparse map), so predicted orbitals can be
        featurized inside a jitted model.
    """
    import e3nn_jax as e3nn
    import jax.numpy as jnp

    if coefficients.ndim != 2 or coefficients.shape[0] != layout.n_ao:
        raise InputError(
            f"orbital coefficients must have shape (n_ao={layout.n_ao}, n_orbitals), "
            f"got {tuple(coefficients.shape)}"
        )
    key = None if atomic_numbers is None else tuple(int(z) for z in np.asarray(atomic_numbers))
    T = _cached_slot_matrix(layout, slots, key)
    dtype = coefficients.dtype if jnp.issubdtype(coefficients.dtype, jnp.floating) else jnp.float32
    features = jnp.einsum("Ica,ak->kIc", jnp.asarray(T, dtype), jnp.asarray(coefficients, dtype))
    return e3nn.IrrepsArray(slots.irreps, features)


def rotate_features(features, rotation: np.ndarray):
    """Apply a rotation to per-atom features: ``features @ D(R).T`` with e3nn's Wigner D.

    ``features``: IrrepsArray (..., dim); ``rotation``: (3, 3) orthogonal (improper ones act
    with the parity of each irrep). For tests and data augmentation.
    """
    import e3nn_jax as e3nn
    import jax.numpy as jnp

    D = features.irreps.D_from_matrix(jnp.asarray(rotation, features.dtype))
    return e3nn.IrrepsArray(features.irreps, features.array @ D.T)

