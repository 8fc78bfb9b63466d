"""Orbital featurizer: slot layout, rotation equivariance (HF recomputed at the rotated
geometry, and exact for coefficients rotated directly), and clear errors for large bases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pyscf import gto
from scipy.spatial.transform import Rotation

import e3nn_jax as e3nn
from molfoundation.basis import AOLayout, ao_rotation, pyscf_to_e3nn
from molfoundation.errors import InputError
from molfoundation.orbital_features import (
    MINIMAL_BASIS_SLOTS,
    FeatureSlots,
    orbital_features,
    rotate_features,
    slot_matrix,
)
from vmc import orbitals, systems


@pytest.fixture(scope="module", autouse=True)
def float64():
    """float64 for this module only (exact rotation checks)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def water():
    system = systems.from_name("H2O")
    return system, orbitals.hartree_fock(system)


def test_minimal_slots_layout():
    assert str(MINIMAL_BASIS_SLOTS.irreps) == "2x0e+1x1o"
    assert MINIMAL_BASIS_SLOTS.dim == 5
    assert FeatureSlots((3, 2, 1)).dim == 3 + 6 + 5
    assert FeatureSlots((3, 2, 1)).slot_offset(2, 0) == 9


def test_features_are_the_atoms_coefficients_in_slots(water):
    system, hf = water
    features = orbital_features(hf.up, hf.layout, atomic_numbers=system.atomic_numbers)
    assert isinstance(features, e3nn.IrrepsArray)
    assert features.irreps == MINIMAL_BASIS_SLOTS.irreps
    assert features.shape == (system.n_up, 3, 5)
    f = np.asarray(features.array)
    o = hf.layout.atom_ao_slices[0]  # O: 1s, 2s, 2p (pyscf order)
    np.testing.assert_allclose(f[:, 0, 0], hf.up[o.start])
    np.testing.assert_allclose(f[:, 0, 1], hf.up[o.start + 1])
    np.testing.assert_allclose(f[:, 0, 2:], (pyscf_to_e3nn(1) @ hf.up[o.start + 2:o.stop]).T)
    for atom in (1, 2):  # H: 1s in slot s0, the rest empty
        np.testing.assert_allclose(f[:, atom, 0], hf.up[hf.layout.atom_ao_slices[atom].start])
        np.testing.assert_array_equal(f[:, atom, 1:], 0.0)


def test_features_rotate_with_the_molecule_through_hartree_fock(water):
    """Rotate the geometry, recompute HF (pyscf) there, and compare with the Wigner-rotated
    features of the original orbitals, matched for sign (and order of equivalent orbitals)."""
    system, hf = water
    features = orbital_features(hf.up, hf.layout)
    for seed in (1, 2):
        rotation = Rotation.random(random_state=seed).as_matrix()
        hf_rotated = orbitals.hartree_fock(system.rotated(rotation))
        rotated = np.asarray(orbital_features(hf_rotated.up, hf_rotated.layout).array)
        expected = np.asarray(rotate_features(features, rotation).array)
        # Wigner D of the whole per-atom irreps, from e3nn directly:
        D = np.asarray(MINIMAL_BASIS_SLOTS.irreps.D_from_matrix(jnp.asarray(rotation)))
        np.testing.assert_allclose(expected, np.asarray(features.array) @ D.T, atol=1e-14)
        for k in range(system.n_up):
            candidates = [s * expected[j] for j in range(system.n_up) for s in (1, -1)]
            errors = [np.abs(rotated[k] - c).max() for c in candidates]
            assert min(errors) < 1e-6, (seed, k, min(errors))


@pytest.mark.parametrize("proper", [True, False])
def test_features_of_given_coefficients_rotate_exactly(proper):
    """Orbitals from any source: random coefficients, rotated by the AO rotation matrix."""
    mol = gto.M(atom="C 0 0 0; N 1.1 0.3 -0.2; H -0.9 0.6 0.5", basis="sto-3g", unit="Bohr")
    layout = AOLayout.from_mole(mol)
    coefficients = np.random.default_rng(0).normal(size=(layout.n_ao, 4))
    rotation = Rotation.random(random_state=3).as_matrix() * (1 if proper else -1)
    features = orbital_features(coefficients, layout)
    rotated = orbital_features(ao_rotation(layout, rotation) @ coefficients, layout)
    np.testing.assert_allclose(rotated.array, rotate_features(features, rotation).array,
                               atol=1e-13)


def test_featurizer_is_linear_jit_and_differentiable():
    system = systems.from_name("LiH")
    layout = AOLayout.from_mole(system.to_pyscf("sto-6g"))
    c = jnp.asarray(np.random.default_rng(1).normal(size=(layout.n_ao, 3)))
    f = jax.jit(lambda c: orbital_features(c, layout).array)
    np.testing.assert_allclose(f(2 * c - c[:, ::-1]), 2 * f(c) - f(c[:, ::-1]), atol=1e-13)
    # The Jacobian is the fixed slot matrix.
    jac = jax.jacfwd(lambda v: orbital_features(v[:, None], layout).array[0])(c[:, 0])
    np.testing.assert_allclose(jac, slot_matrix(layout), atol=0)
    assert orbital_features(c[:, :0], layout).shape == (0, 2, 5)  # no orbitals of a spin


@pytest.mark.parametrize(
    "atom, basis, pattern",
    [
        ("O 0 0 0; H 0 0 1.8; H 1.8 0 0", "cc-pvdz", r"atom 0 \(O\) has shells 3s2p1d"),
        ("Na 0 0 0; H 0 0 3.5", "sto-6g", r"atom 0 \(Na\) has shells 3s2p"),
    ],
)
def test_larger_bases_and_heavier_elements_are_rejected_clearly(atom, basis, pattern):
    mol = gto.M(atom=atom, basis=basis, unit="Bohr")
    layout = AOLayout.from_mole(mol)
    c = np.zeros((layout.n_ao, 1))
    with pytest.raises(InputError, match=pattern):
        orbital_features(c, layout, atomic_numbers=mol.atom_charges())
    if basis == "sto-6g":  # wider slots hold the third row
        assert orbital_features(c, layout, FeatureSlots((3, 2))).shape == (1, 2, 3 + 6)


def test_wrong_coefficient_shape_is_an_input_error():
    layout = AOLayout.from_mole(gto.M(atom="H 0 0 0; H 0 0 1.4", basis="sto-6g", unit="Bohr"))
    with pytest.raises(InputError, match="n_ao=2"):
        orbital_features(np.zeros((3, 1)), layout)
