"""Atomic-orbital basis conventions: pyscf's AO order, e3nn-jax irreps, and AO rotations.

pyscf orders real spherical AOs atom by atom, shell by shell, and within a shell by
m = -l..l, except p shells, which are (px, py, pz). e3nn-jax uses y as the polar axis and its
own real spherical harmonics. The change of basis between the two is *derived* here, not
tabulated: the angular parts of pyscf's AOs, evaluated on points of the unit sphere, are fitted
against e3nn's spherical harmonics at the same points. The fit is exact (residual ~1e-15),
and the resulting matrix is orthogonal, which the tests check.

Conventions used throughout the project:
- A coefficient vector ``c`` over the 2l+1 AOs of one shell (pyscf order) has e3nn components
  ``a = Q_l @ c`` with ``Q_l = pyscf_to_e3nn(l)``, orthogonal.
- Rotating a molecule by ``R`` (positions ``x -> x @ R.T``) transforms any AO matrix as
  ``M(R x) = D(R) M(x) D(R)^T`` with ``D = ao_rotation(layout, R)``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

# e3nn-jax and jax are imported inside the functions that need them: importing e3nn takes
# seconds, and the data pipeline (which uses AOLayout) should start instantly.

MAX_L = 4  # s, p, d, f, g


def parity_letter(l: int) -> str:
    """'e' for even l, 'o' for odd l: the parity of a real spherical harmonic of order l."""
    return "e" if l % 2 == 0 else "o"


@dataclasses.dataclass(frozen=True)
class AOLayout:
    """The shell structure of an AO basis for one molecule, in pyscf order.

    Every shell holds exactly one contraction (pyscf basis entries with several contractions
    are split), so the AOs of shell ``s`` are ``shell_slices[s]``.

    Attributes:
      shell_atom: (n_shells,) index of the atom each shell sits on, non-decreasing.
      shell_l: (n_shells,) angular momentum of each shell.
      n_atoms: number of atoms (atoms without shells are allowed).
    """

    shell_atom: tuple[int, ...]
    shell_l: tuple[int, ...]
    n_atoms: int

    def __post_init__(self):
        if len(self.shell_atom) != len(self.shell_l):
            raise ValueError("shell_atom and shell_l must have the same length")
        if any(b < a for a, b in zip(self.shell_atom, self.shell_atom[1:])):
            raise ValueError("shells must be grouped by atom in increasing atom order")
        if any(l < 0 or l > MAX_L for l in self.shell_l):
            raise ValueError(f"shell angular momentum must be in 0..{MAX_L}")

    @classmethod
    def from_mole(cls, mol) -> "AOLayout":
        """Layout of a built pyscf ``Mole`` with a spherical (not Cartesian) basis."""
        if mol.cart:
            raise ValueError("Cartesian AO bases are not supported; use spherical (mol.cart=False)")
        shell_atom, shell_l = [], []
        for bas_id in range(mol.nbas):
            for _ in range(mol.bas_nctr(bas_id)):
                shell_atom.append(int(mol.bas_atom(bas_id)))
                shell_l.append(int(mol.bas_angular(bas_id)))
        layout = cls(tuple(shell_atom), tuple(shell_l), mol.natm)
        if layout.n_ao != mol.nao_nr():
            raise AssertionError("AO count mismatch between layout and pyscf")
        return layout

    @functools.cached_property
    def shell_offsets(self) -> np.ndarray:
        """(n_shells + 1,) AO index where each shell starts, plus the total."""
        sizes = [2 * l + 1 for l in self.shell_l]
        return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    @property
    def n_ao(self) -> int:
        return int(self.shell_offsets[-1])

    @property
    def shell_slices(self) -> list[slice]:
        off = self.shell_offsets
        return [slice(int(off[s]), int(off[s + 1])) for s in range(len(self.shell_l))]

    @property
    def atom_ao_slices(self) -> list[slice]:
        """AO range of each atom (empty slice for an atom without shells)."""
        off = self.shell_offsets
        slices = []
        for atom in range(self.n_atoms):
            shells = [s for s, a in enumerate(self.shell_atom) if a == atom]
            if shells:
                slices.append(slice(int(off[shells[0]]), int(off[shells[-1] + 1])))
            else:
                start = int(off[sum(1 for a in self.shell_atom if a < atom)])
                slices.append(slice(start, start))
        return slices

    def atom_shell_l(self, atom: int) -> tuple[int, ...]:
        """Angular momenta of the shells on one atom, in pyscf order."""
        return tuple(l for a, l in zip(self.shell_atom, self.shell_l) if a == atom)

    @property
    def irreps(self):
        """e3nn Irreps of the whole AO vector, shell by shell (not simplified: order is kept)."""
        import e3nn_jax as e3nn

        return e3nn.Irreps([(1, (l, 1 if l % 2 == 0 else -1)) for l in self.shell_l])


def fit_pyscf_shell_map(l: int, harmonics) -> np.ndarray:
    """(2l+1, 2l+1) orthogonal map Q from pyscf AO coefficients of one shell of order ``l`` to
    the components of another real spherical-harmonic basis of the same order.

    ``harmonics(points)`` gives that basis at (n, 3) unit vectors, (n, 2l+1); its functions
    must be orthogonal on the sphere with one common norm (any norm), evaluated in float64. Then
    ``components = Q @ pyscf_coefficients``, and an AO matrix block ``B`` between shells of
    orders l1, l2 becomes ``Q(l1) @ B @ Q(l2).T``. Raises AssertionError if the basis does not
    span pyscf's shell or is not orthogonal to it up to a scale.
    """
    from pyscf import gto

    rng = np.random.default_rng(20211206)
    points = rng.normal(size=(8 * (2 * l + 1), 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)

    # One normalised primitive shell of order l on a helium atom at the origin: on the unit
    # sphere its radial factor is a constant, so the values are the angular functions.
    mol = gto.M(atom=[["He", (0.0, 0.0, 0.0)]], basis={"He": [[l, [1.0, 1.0]]]}, unit="Bohr")
    pyscf_values = mol.eval_gto("GTOval_sph", points)  # (n_points, 2l+1)
    other_values = np.asarray(harmonics(points), dtype=np.float64)
    # pyscf_values = other_values @ M, so pyscf AO coefficients c map to components M @ c.
    M, residual, rank, _ = np.linalg.lstsq(other_values, pyscf_values, rcond=None)
    fit_error = np.abs(other_values @ M - pyscf_values).max() / np.abs(pyscf_values).max()
    if rank != 2 * l + 1 or fit_error > 1e-10:
        raise AssertionError(f"pyscf l={l} shell is not spanned by the given harmonics ({fit_error})")
    # Both bases are orthogonal on the sphere, so M is orthogonal up to one common scale.
    scale = np.linalg.norm(M[:, 0])
    Q = M / scale
    if np.abs(Q @ Q.T - np.eye(2 * l + 1)).max() > 1e-10:
        raise AssertionError(f"the map from pyscf's l={l} shell to the given harmonics is not orthogonal")
    Q[np.abs(Q) < 1e-14] = 0.0
    return Q


@functools.lru_cache(maxsize=None)
def _fit_pyscf_to_e3nn(l: int) -> np.ndarray:
    import e3nn_jax as e3nn
    import jax

    def harmonics(points):
        with jax.enable_x64(True):
            return e3nn.spherical_harmonics(
                f"{l}{parity_letter(l)}", points, normalize=True, normalization="component").array

    Q = fit_pyscf_shell_map(l, harmonics)
    Q.setflags(write=False)
    return Q


def pyscf_to_e3nn(l: int) -> np.ndarray:
    """(2l+1, 2l+1) orthogonal map from pyscf AO coefficients of one shell to e3nn components.

    For a shell of order ``l``: ``e3nn_components = pyscf_to_e3nn(l) @ pyscf_coefficients``,
    and for an AO matrix block ``B`` between shells of orders l1, l2 the e3nn-ordered block is
    ``pyscf_to_e3nn(l1) @ B @ pyscf_to_e3nn(l2).T``.
    """
    if not 0 <= l <= MAX_L:
        raise ValueError(f"l must be in 0..{MAX_L}, got {l}")
    return _fit_pyscf_to_e3nn(l)


def block_diagonal(layout: AOLayout, blocks_by_l: dict[int, np.ndarray]) -> np.ndarray:
    """(n_ao, n_ao) matrix with ``blocks_by_l[l]`` on the diagonal block of every shell of order l."""
    out = np.zeros((layout.n_ao, layout.n_ao))
    for sl, l in zip(layout.shell_slices, layout.shell_l):
        out[sl, sl] = blocks_by_l[l]
    return out


def pyscf_to_e3nn_matrix(layout: AOLayout) -> np.ndarray:
    """(n_ao, n_ao) orthogonal block-diagonal map from pyscf AO order to e3nn irreps order.

    ``T @ F @ T.T`` expresses an AO matrix ``F`` with rows and columns as e3nn irreps, shell by
    shell in the order of ``layout.irreps``.
    """
    return block_diagonal(layout, {l: pyscf_to_e3nn(l) for l in set(layout.shell_l)})


def wigner_d_e3nn(l: int, rotation: np.ndarray) -> np.ndarray:
    """(2l+1, 2l+1) float64 Wigner D matrix of e3nn's real harmonics: Y(R x) = D(R) Y(x).

    ``rotation`` is a (3, 3) orthogonal matrix; improper ones (det -1) pick up the parity
    (-1)^l, as AOs do under inversion.
    """
    import e3nn_jax as e3nn
    import jax

    rotation = np.asarray(rotation, dtype=np.float64)
    _check_orthogonal(rotation)
    with jax.enable_x64(True):
        D = e3nn.Irreps(f"{l}{parity_letter(l)}").D_from_matrix(rotation)
        return np.asarray(D, dtype=np.float64)


def _check_orthogonal(rotation: np.ndarray) -> None:
    if rotation.shape != (3, 3) or np.abs(rotation @ rotation.T - np.eye(3)).max() > 1e-8:
        raise ValueError("rotation must be a 3x3 orthogonal matrix")


def ao_rotation(layout: AOLayout, rotation: np.ndarray) -> np.ndarray:
    """(n_ao, n_ao) orthogonal AO rotation D(R) in pyscf order.

    For positions rotated as ``x -> x @ R.T``: ``F(R x) = D F(x) D^T`` and ``S(R x) = D S(x) D^T``;
    MO coefficients transform as ``C(R x) = D C(x)`` (up to the sign/phase of each orbital).
    """
    blocks = {}
    for l in set(layout.shell_l):
        Q = pyscf_to_e3nn(l)
        blocks[l] = Q.T @ wigner_d_e3nn(l, rotation) @ Q
    return block_diagonal(layout, blocks)


def ao_permutation(layout: AOLayout, atom_order: np.ndarray) -> np.ndarray:
    """(n_ao,) AO index array for reordering atoms.

    If the new molecule's atom ``i`` is the old molecule's atom ``atom_order[i]``, then an AO
    matrix of the new molecule is ``F_new = F_old[idx][:, idx]`` with ``idx`` returned here.
    The permuted atoms must carry identical shells (e.g. the same element and basis).
    """
    atom_order = np.asarray(atom_order)
    if sorted(atom_order.tolist()) != list(range(layout.n_atoms)):
        raise ValueError("atom_order must be a permutation of range(n_atoms)")
    slices = layout.atom_ao_slices
    pieces = []
    for new_atom, old_atom in enumerate(atom_order):
        if layout.atom_shell_l(new_atom) != layout.atom_shell_l(int(old_atom)):
            raise ValueError(f"atoms {new_atom} and {old_atom} have different shells")
        sl = slices[int(old_atom)]
        pieces.append(np.arange(sl.start, sl.stop))
    return np.concatenate(pieces).astype(np.int64)
