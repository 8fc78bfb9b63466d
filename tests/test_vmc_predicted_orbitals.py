"""Orbitals from a Fock matrix in any basis (e.g. predicted by PhiSNet) as the transferable
wavefunction's input, against Hartree-Fock in pyscf."""

import jax
import numpy as np
import pytest
from pyscf import scf

from molfoundation import compiling
from molfoundation.errors import InputError
from phisnet_jax.evaluate import TrainedModel
from phisnet_jax.model import PhiSNetConfig, make_inputs, make_phisnet
from phisnet_jax.train import TrainConfig, cast_inputs
from vmc import ansatz, geometries, orbitals, systems


def pyscf_fock(system, basis):
    mf = scf.RHF(system.to_pyscf(basis)).run(conv_tol=1e-12, verbose=0)
    return mf.get_fock(), mf.get_ovlp()


def minimal_overlap(system):
    return system.to_pyscf(orbitals.DEFAULT_BASIS).intor_symmetric("int1e_ovlp")


@pytest.mark.parametrize("name", ["H2O", "CH4"])
def test_the_hartree_fock_fock_matrix_gives_the_hartree_fock_orbitals(name):
    """Given the converged minimal-basis Fock matrix, the pipeline (Roothaan, Boys, order, signs,
    projection onto the same basis) must reproduce :func:`vmc.orbitals.hartree_fock` exactly."""
    system = systems.from_name(name)
    reference = orbitals.hartree_fock(system)
    fock, overlap = pyscf_fock(system, orbitals.DEFAULT_BASIS)
    got = orbitals.orbitals_from_fock(system, fock, overlap, orbitals.DEFAULT_BASIS, energy=-1.0)
    # Boys converges the spread to 1e-10 bohr^2, which fixes the orbitals to ~1e-7.
    np.testing.assert_allclose(got.up, reference.up, atol=1e-6)
    np.testing.assert_allclose(got.orbital_energies[0], reference.orbital_energies[0], atol=1e-8)
    assert got.energy == -1.0 and got.method == "predicted"


def test_a_larger_basis_is_projected_onto_the_minimal_one():
    """def2-SVP orbitals of water, projected: orthonormal in the minimal basis, the same
    occupied space as minimal-basis HF up to the basis difference (smallest principal cosine
    0.9975 measured; 0.99 allowed), and each orbital close to its HF counterpart (same order
    and signs: largest coefficient difference 0.063 measured, 0.1 allowed)."""
    system = systems.from_name("H2O")
    reference = orbitals.hartree_fock(system)
    fock, overlap = pyscf_fock(system, "def2-svp")
    got = orbitals.orbitals_from_fock(system, fock, overlap, "def2-svp")
    s = minimal_overlap(system)
    np.testing.assert_allclose(got.up.T @ s @ got.up, np.eye(5), atol=1e-12)
    cosines = np.linalg.svd(reference.up.T @ s @ got.up, compute_uv=False)
    assert cosines.min() > 0.99
    assert np.abs(got.up - reference.up).max() < 0.1
    np.testing.assert_array_equal(got.up, got.down)


def test_bad_fock_input_is_rejected():
    water = systems.from_name("H2O")
    fock, overlap = pyscf_fock(water, orbitals.DEFAULT_BASIS)
    with pytest.raises(InputError, match="7 x 7"):
        orbitals.orbitals_from_fock(water, fock[:6, :6], overlap[:6, :6], orbitals.DEFAULT_BASIS)
    with pytest.raises(InputError, match="closed-shell"):
        orbitals.orbitals_from_fock(systems.from_name("Li"), fock, overlap, orbitals.DEFAULT_BASIS)


def test_phisnet_predicted_orbitals_feed_the_ansatz():
    """An (untrained) PhiSNet model's predicted orbitals for two water geometries: orthonormal
    minimal-basis orbitals, grouped as one composition with finite orbital features."""
    config = PhiSNetConfig(basis="sto-3g", elements=(1, 8), features=8, max_order=2, num_modules=1,
                           num_radial=8, overlap_features=4, residual_blocks=0, head_residual_blocks=1)
    water = systems.from_name("H2O")
    with jax.enable_x64(True):
        model = make_phisnet(config)
        example = cast_inputs(make_inputs(config, water.atomic_numbers, water.positions), np.float64)
        params = compiling.jit_once(model.init)(jax.random.PRNGKey(0), example)
    trained = TrainedModel(config, TrainConfig(float64=True), model, params, step=0)
    pair = [water, water.with_positions(water.positions * 1.05)]
    source = lambda system: orbitals.predicted_orbitals(system, trained)  # noqa: E731
    [group] = geometries.build_groups(pair, ansatz.small_config(), progress=False, orbital_source=source)
    assert group.size == 2 and all(o.method == "PhiSNet" for o in group.hartree_fock)
    s = minimal_overlap(water)
    c = group.hartree_fock[0].up
    np.testing.assert_allclose(c.T @ s @ c, np.eye(5), atol=1e-10)
    assert np.all(np.isfinite(np.asarray(group.geometries.inputs.features_up)))
    assert not np.allclose(group.hartree_fock[0].up, group.hartree_fock[1].up)
