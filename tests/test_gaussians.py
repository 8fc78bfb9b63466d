"""Gaussian AO integrals in JAX against pyscf: the overlap matrix S and its nuclear derivatives
dS/dR for s to f shells, and the exact S that PhiSNet's energies and predictions use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molfoundation import compiling, gaussians
from molfoundation.basis import AOLayout
from molfoundation.elements import element_basis
from molfoundation.molecules import Molecule, to_pyscf
from phisnet_jax.model import PhiSNetConfig, make_exact_overlap, make_inputs

# cc-pVTZ: s, p, d, f shells on O, s, p, d on H; a water-like geometry off every symmetry plane.
ATOMS = np.array([8, 1, 1])
POSITIONS = np.array([[0.1, -0.2, 0.05], [1.7, 0.3, -0.4], [-0.6, 1.6, 0.3]])


def _full_matrix(blocks, layout):
    slices = layout.atom_ao_slices
    return jnp.concatenate([jnp.concatenate([blocks[i, j, : a.stop - a.start, : b.stop - b.start]
                                             for j, b in enumerate(slices)], axis=1)
                            for i, a in enumerate(slices)], axis=0)


@pytest.fixture(scope="module")
def water_tz():
    mol = to_pyscf(Molecule(ATOMS, POSITIONS), "cc-pvtz")
    eb = element_basis((1, 8), "cc-pvtz")
    tables = gaussians.overlap_tables(eb)
    layout = AOLayout.from_mole(mol)
    index = eb.index_of(ATOMS)

    def overlap(positions):
        return _full_matrix(gaussians.overlap_blocks(tables, index, positions), layout)

    return mol, tables, layout, overlap


def test_overlap_matrix_equals_pyscf_for_s_to_f_shells(water_tz):
    mol, tables, _, overlap = water_tz
    assert tables.ls == (0, 1, 2, 3)
    with jax.enable_x64(True):
        S = np.asarray(compiling.jit_once(overlap)(jnp.asarray(POSITIONS)))
    reference = mol.intor("int1e_ovlp")
    assert S.shape == reference.shape == (58, 58)
    np.testing.assert_allclose(S, reference, rtol=0, atol=1e-13)  # observed: 3e-15


def test_overlap_derivatives_equal_pyscf(water_tz):
    """dS_mn/dR_A = -<d_x m|n> [m on A] - <m|d_x n> [n on A], from pyscf's int1e_ipovlp."""
    mol, _, layout, overlap = water_tz
    with jax.enable_x64(True):
        jacobian = np.asarray(compiling.jit_once(jax.jacfwd(overlap))(jnp.asarray(POSITIONS)))  # (M, M, atoms, 3)
    ip = mol.intor("int1e_ipovlp")  # (3, M, M) <d_x m | n>
    ao_atom = np.repeat(np.arange(3), [s.stop - s.start for s in layout.atom_ao_slices])
    for atom in range(3):
        on_atom = (ao_atom == atom).astype(float)
        for x in range(3):
            reference = -(on_atom[:, None] * ip[x] + on_atom[None, :] * ip[x].T)
            np.testing.assert_allclose(jacobian[:, :, atom, x], reference, rtol=0, atol=1e-13)  # observed: 1e-14
    assert np.abs(jacobian).max() > 0.5


def test_phisnet_exact_overlap_of_a_padded_molecule():
    """In the model's padded layout (two padding atoms, extra AOs): pyscf's S on the real AOs,
    zero elsewhere."""
    config = PhiSNetConfig(basis="def2-svp", elements=(1, 8), max_order=2)
    inputs = make_inputs(config, ATOMS, POSITIONS, n_atoms=5, n_ao=30)
    with jax.enable_x64(True):
        S = np.asarray(compiling.jit_once(make_exact_overlap(config))(jax.tree.map(jnp.asarray, inputs)))
    reference = to_pyscf(Molecule(ATOMS, POSITIONS), "def2-svp").intor("int1e_ovlp")
    n = reference.shape[0]
    np.testing.assert_allclose(S[:n, :n], reference, rtol=0, atol=1e-13)
    assert np.all(S[n:] == 0) and np.all(S[:, n:] == 0)
