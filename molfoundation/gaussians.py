"""Contracted spherical Gaussian AOs in JAX: their values at points and their overlap integrals.

The basis data (exponents, contraction coefficients) come from pyscf; everything computed from
them is jnp, independent of pyscf's integral library: it runs under jit and on accelerators, and
is differentiable in the nuclear positions, so dS/dR comes from autodiff.

Overlap integrals: the angular factor of a pyscf AO of order l is a homogeneous polynomial of
degree l in (x, y, z). Its expansion in Cartesian monomials x^i y^j z^k (i + j + k = l) is
*derived* by fitting at random points (exact, as in ``basis.pyscf_to_e3nn``), the overlap of
two Cartesian primitives factorises into three one-dimensional overlaps, and those follow from
the Obara-Saika recursion.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax.numpy as jnp
import numpy as np

from molfoundation.basis import AOLayout, parity_letter, pyscf_to_e3nn
from molfoundation.elements import ElementBasis


@dataclasses.dataclass(frozen=True)
class GaussianShell:
    """One contracted spherical Gaussian shell: sum_p c_p r^l exp(-a_p r^2) Y_lm.

    ``coefficients`` multiply unnormalised primitives (pyscf's radial normalisation of each
    primitive folded in), so the shell's AOs are normalised as in pyscf.
    """

    atom: int
    l: int
    exponents: tuple[float, ...]
    coefficients: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class GaussianBasis:
    """The contracted spherical GTOs of one molecule, shell by shell in pyscf's AO order."""

    shells: tuple[GaussianShell, ...]
    n_atoms: int

    @classmethod
    def from_mole(cls, mol) -> "GaussianBasis":
        from pyscf import gto

        if mol.cart:
            raise ValueError("Cartesian AO bases are not supported; use spherical (mol.cart=False)")
        shells = []
        for bas_id in range(mol.nbas):
            l = int(mol.bas_angular(bas_id))
            exponents = np.asarray(mol.bas_exp(bas_id), dtype=np.float64)
            # bas_ctr_coeff refers to normalised primitives; fold their norms in.
            contractions = mol.bas_ctr_coeff(bas_id) * gto.gto_norm(l, exponents)[:, None]
            for c in contractions.T:
                shells.append(GaussianShell(int(mol.bas_atom(bas_id)), l,
                                            tuple(exponents.tolist()), tuple(c.tolist())))
        return cls(tuple(shells), int(mol.natm))

    @property
    def layout(self) -> AOLayout:
        return AOLayout(tuple(s.atom for s in self.shells), tuple(s.l for s in self.shells),
                        self.n_atoms)

    @property
    def n_ao(self) -> int:
        return self.layout.n_ao


def make_ao_values(basis: GaussianBasis) -> Callable:
    """Values of all AOs at points, in jnp.

    Returns:
        ``fn(atom_positions: (n_atoms, 3) bohr, points: (n_points, 3) bohr) -> (n_points, n_ao)``
        in pyscf's AO order (equal to ``mol.eval_gto("GTOval_sph", points)``); jit-able and
        differentiable in both arguments. The nuclear positions are an argument so that one
        compiled function serves every geometry of a molecule.
    """
    import e3nn_jax as e3nn
    import jax.numpy as jnp

    layout = basis.layout
    offsets = layout.shell_offsets
    groups = []  # one entry per angular momentum: shells of that l, evaluated together
    ao_order = []
    for l in sorted(set(layout.shell_l)):
        members = [s for s, shell in enumerate(basis.shells) if shell.l == l]
        n_prim = max(len(basis.shells[s].exponents) for s in members)
        # Padding primitives have coefficient 0 (and exponent 1, any finite value would do).
        exponents = np.ones((len(members), n_prim))
        coefficients = np.zeros((len(members), n_prim))
        for row, s in enumerate(members):
            n = len(basis.shells[s].exponents)
            exponents[row, :n] = basis.shells[s].exponents
            coefficients[row, :n] = basis.shells[s].coefficients
        atoms = np.array([basis.shells[s].atom for s in members])
        # pyscf's real spherical AOs are unit-normalised on the sphere; e3nn's "component"
        # harmonics have mean square 1 there, hence 1/sqrt(4 pi), and Q_l maps the orders.
        angular = pyscf_to_e3nn(l) / np.sqrt(4.0 * np.pi)
        groups.append((l, atoms, exponents, coefficients, angular))
        for s in members:
            ao_order.extend(range(int(offsets[s]), int(offsets[s + 1])))
    # Columns are produced grouped by l; this gather puts them back in pyscf order.
    to_pyscf_order = np.argsort(np.asarray(ao_order))

    def ao_values(atom_positions, points):
        atom_positions = jnp.asarray(atom_positions, points.dtype)
        columns = []
        for l, atoms, exponents, coefficients, angular in groups:
            d = points[:, None, :] - atom_positions[atoms][None]  # (n_points, n_shells, 3)
            r2 = jnp.sum(d * d, axis=-1)
            radial = jnp.sum(
                jnp.asarray(coefficients, points.dtype)
                * jnp.exp(-jnp.asarray(exponents, points.dtype) * r2[..., None]),
                axis=-1,
            )
            if l == 0:
                values = radial[..., None] * jnp.asarray(angular[0, 0], points.dtype)
            else:
                # Unnormalised harmonics are the solid harmonics r^l Y_lm(r_hat): polynomials,
                # smooth at the nucleus.
                solid = e3nn.spherical_harmonics(
                    f"{l}{parity_letter(l)}", d, normalize=False, normalization="component"
                ).array
                values = radial[..., None] * (solid @ jnp.asarray(angular, points.dtype))
            columns.append(values.reshape(points.shape[0], -1))
        return jnp.concatenate(columns, axis=1)[:, to_pyscf_order]

    return ao_values




def cartesian_powers(l: int) -> tuple[tuple[int, int, int], ...]:
    """The (i, j, k) exponents of the Cartesian monomials x^i y^j z^k of degree l."""
    return tuple((i, j, l - i - j) for i in range(l, -1, -1) for j in range(l - i, -1, -1))


@functools.lru_cache(maxsize=None)
def angular_to_cartesian(l: int) -> np.ndarray:
    """(n_cart, 2l+1) matrix X with ``angular(d) = monomials(d) @ X``.

    ``angular(d)`` is the factor that multiplies the radial part sum_p c_p exp(-a_p r^2) of a
    :class:`GaussianShell`'s AOs (pyscf order), ``monomials(d)`` the degree-l monomials in the
    order of :func:`cartesian_powers`. Derived by fitting at random points; the fit is exact.
    """
    import e3nn_jax as e3nn
    import jax

    powers = np.asarray(cartesian_powers(l))
    points = np.random.default_rng(l).normal(size=(4 * len(powers), 3))
    monomials = np.prod(points[:, None, :] ** powers[None], axis=-1)
    with jax.enable_x64(True):
        solid = np.asarray(e3nn.spherical_harmonics(f"{l}{parity_letter(l)}", points, normalize=False,
                                                    normalization="component").array)
    angular = solid @ _e3nn_to_pyscf_angular(l)
    X, *_ = np.linalg.lstsq(monomials, angular, rcond=None)
    if np.abs(monomials @ X - angular).max() > 1e-12 * np.abs(angular).max():
        raise AssertionError(f"l={l} AOs are not spanned by the degree-{l} monomials")
    X[np.abs(X) < 1e-14] = 0.0
    X.setflags(write=False)
    return X


def _e3nn_to_pyscf_angular(l: int) -> np.ndarray:
    # pyscf's real spherical AOs are unit-normalised on the sphere; e3nn's "component"
    # harmonics have mean square 1 there, hence 1/sqrt(4 pi), and Q_l maps the orders.
    return pyscf_to_e3nn(l) / np.sqrt(4.0 * np.pi)


def _overlap_1d(alpha, beta, a, b, la: int, lb: int):
    """One-dimensional overlaps of x_A^u exp(-alpha x_A^2) and x_B^v exp(-beta x_B^2) relative to
    the s-s value, by the Obara-Saika recursion: (..., la + 1, lb + 1) over the broadcast shape
    of the arguments (a, b: the centres' coordinates)."""
    p = alpha + beta
    center = (alpha * a + beta * b) / p
    pa, pb, half = center - a, center - b, 0.5 / p
    out = [[None] * (lb + 1) for _ in range(la + 1)]
    out[0][0] = jnp.ones_like(pa)
    for u in range(la + 1):
        for v in range(lb + 1):
            if u == v == 0:
                continue
            if u > 0:  # raise u: S(u, v) = PA S(u-1, v) + ((u-1) S(u-2, v) + v S(u-1, v-1)) / 2p
                value = pa * out[u - 1][v]
                if u > 1:
                    value = value + half * (u - 1) * out[u - 2][v]
                if v > 0:
                    value = value + half * v * out[u - 1][v - 1]
            else:  # raise v
                value = pb * out[u][v - 1]
                if v > 1:
                    value = value + half * (v - 1) * out[u][v - 2]
            out[u][v] = value
    return jnp.stack([jnp.stack(row, axis=-1) for row in out], axis=-2)


@dataclasses.dataclass(frozen=True)
class OverlapTables:
    """The shells of every element of a vocabulary, grouped by angular momentum, as arrays for
    :func:`overlap_blocks`. Per angular momentum l present (``ls``), with K_l the most shells of
    order l on one element and P_l the most primitives in one of them (padding shells and
    primitives have coefficient 0):

      exponents[l], coefficients[l]: (n_elements, K_l, P_l), bohr^-2 and the coefficients of
        unnormalised primitives (as in :class:`GaussianShell`);
      placement[l]: (n_elements, K_l (2l+1), A) 0/1, where the AOs of those shells sit in the
        element's block of A = ``ElementBasis.max_atom_ao`` AOs;
      to_cartesian[l]: ``angular_to_cartesian(l)``.
    """

    ls: tuple[int, ...]
    exponents: tuple[np.ndarray, ...]
    coefficients: tuple[np.ndarray, ...]
    placement: tuple[np.ndarray, ...]
    to_cartesian: tuple[np.ndarray, ...]


@functools.lru_cache(maxsize=None)
def overlap_tables(element_basis: ElementBasis) -> OverlapTables:
    """:class:`OverlapTables` of ``element_basis``, from pyscf's basis data."""
    from molfoundation.molecules import Molecule, to_pyscf

    per_element = []
    for z in element_basis.elements:
        atom = Molecule(np.array([z]), np.zeros((1, 3)), charge=0, spin=z % 2)
        per_element.append(GaussianBasis.from_mole(to_pyscf(atom, element_basis.basis)).shells)
    ls = tuple(sorted({shell.l for shells in per_element for shell in shells}))
    n_elements, A = len(per_element), element_basis.max_atom_ao
    exponents, coefficients, placement = [], [], []
    for l in ls:
        of_l = [[(k, shell) for k, shell in enumerate(shells) if shell.l == l] for shells in per_element]
        K = max(len(shells) for shells in of_l)
        P = max(len(shell.exponents) for shells in of_l for _, shell in shells)
        e = np.ones((n_elements, K, P))  # padding exponents: any positive value
        c = np.zeros((n_elements, K, P))
        place = np.zeros((n_elements, K * (2 * l + 1), A))
        for i, shells in enumerate(of_l):
            offsets = np.concatenate([[0], np.cumsum([2 * s.l + 1 for s in per_element[i]])])
            for row, (k, shell) in enumerate(shells):
                n = len(shell.exponents)
                e[i, row, :n], c[i, row, :n] = shell.exponents, shell.coefficients
                for m in range(2 * l + 1):
                    place[i, row * (2 * l + 1) + m, offsets[k] + m] = 1.0
        exponents.append(e)
        coefficients.append(c)
        placement.append(place)
    return OverlapTables(ls, tuple(exponents), tuple(coefficients), tuple(placement),
                         tuple(angular_to_cartesian(l) for l in ls))


def overlap_blocks(tables: OverlapTables, element_index, positions):
    """(N, N, A, A) overlap integrals between the AOs of every pair of atoms.

    element_index: (N,) int, each atom's element in the tables' vocabulary; positions: (N, 3)
    bohr. Block [i, j] holds <mu|nu> for the AOs mu of atom i and nu of atom j, in pyscf's order
    within each atom's block (zero beyond the atom's AOs). Exact for any geometry (the on-site
    blocks included) and differentiable in ``positions``.
    """
    dtype = positions.dtype
    n = positions.shape[0]
    blocks = jnp.zeros((n, n) + tables.placement[0].shape[-1:] * 2, dtype)
    for a, la in enumerate(tables.ls):
        for b, lb in enumerate(tables.ls):
            blocks = blocks + _shell_pair_blocks(tables, a, b, la, lb, element_index, positions)
    return blocks


def _shell_pair_blocks(tables, a, b, la, lb, element_index, positions):
    """The contribution of the shells of order la (on atom i) and lb (on atom j) to every block."""
    dtype = positions.dtype
    # axes: atom i, atom j, shell k of i, shell k' of j, primitive of k, primitive of k', then x/y/z
    alpha = jnp.asarray(tables.exponents[a], dtype)[element_index][:, None, :, None, :, None, None]
    beta = jnp.asarray(tables.exponents[b], dtype)[element_index][None, :, None, :, None, :, None]
    ca = jnp.asarray(tables.coefficients[a], dtype)[element_index][:, None, :, None, :, None]
    cb = jnp.asarray(tables.coefficients[b], dtype)[element_index][None, :, None, :, None, :]
    centre_a = positions[:, None, None, None, None, None, :]
    centre_b = positions[None, :, None, None, None, None, :]
    p = (alpha + beta)[..., 0]
    distance2 = jnp.sum((centre_a - centre_b) ** 2, axis=-1)
    prefactor = ca * cb * (jnp.pi / p) ** 1.5 * jnp.exp(-alpha[..., 0] * beta[..., 0] / p * distance2)
    axes = _overlap_1d(alpha, beta, centre_a, centre_b, la, lb)  # (..., 3, la + 1, lb + 1)
    powers_a, powers_b = np.asarray(cartesian_powers(la)), np.asarray(cartesian_powers(lb))
    cartesian = prefactor[..., None, None] * (
        axes[..., 0, powers_a[:, None, 0], powers_b[None, :, 0]]
        * axes[..., 1, powers_a[:, None, 1], powers_b[None, :, 1]]
        * axes[..., 2, powers_a[:, None, 2], powers_b[None, :, 2]])  # (..., n_cart_a, n_cart_b)
    spherical = jnp.einsum("ijklpqxy,xm,yn->ijkmln", cartesian, jnp.asarray(tables.to_cartesian[a], dtype),
                           jnp.asarray(tables.to_cartesian[b], dtype))
    n = positions.shape[0]
    spherical = spherical.reshape(n, n, spherical.shape[2] * (2 * la + 1), spherical.shape[4] * (2 * lb + 1))
    place_a = jnp.asarray(tables.placement[a], dtype)[element_index]
    place_b = jnp.asarray(tables.placement[b], dtype)[element_index]
    return jnp.einsum("ipA,ijpq,jqB->ijAB", place_a, spherical, place_b)
