"""Observables from (F, S) against pyscf, and derivatives of the eigen-solve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import start_geometry
from phisnet_jax import observables
from molfoundation.basis import AOLayout
from phisnet_jax.reference import LevelOfTheory, run_scf


@pytest.fixture(scope="module", autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def water_hf():
    mf = run_scf(start_geometry("water"), LevelOfTheory("hf", "def2-svp", conv_tol=1e-12, conv_tol_grad=1e-8))
    return mf


def test_roothaan_reproduces_pyscf(water_hf):
    mf = water_hf
    F, S = mf.get_fock(), mf.get_ovlp()
    eps, C = observables.roothaan(jnp.asarray(F), jnp.asarray(S))
    np.testing.assert_allclose(eps, mf.mo_energy, atol=1e-9)
    np.testing.assert_allclose(C.T @ S @ C, np.eye(S.shape[0]), atol=1e-10)
    P = observables.density_matrix(C, 5)
    np.testing.assert_allclose(P, mf.make_rdm1(), atol=1e-8)
    gap = observables.homo_lumo_gap(eps, 5)
    np.testing.assert_allclose(gap, mf.mo_energy[5] - mf.mo_energy[4], atol=1e-9)


def test_total_energy_is_the_hartree_fock_energy(water_hf):
    mf = water_hf
    mol = mf.mol
    energy = observables.total_energy(
        jnp.asarray(mf.get_fock()), jnp.asarray(mf.get_ovlp()), jnp.asarray(mf.get_hcore()), 5,
        jnp.asarray(mol.atom_charges(), jnp.float64), jnp.asarray(mol.atom_coords()))
    np.testing.assert_allclose(energy, mf.e_tot, atol=1e-9)
    np.testing.assert_allclose(
        observables.nuclear_repulsion(jnp.asarray(mol.atom_charges(), jnp.float64), jnp.asarray(mol.atom_coords())),
        mol.energy_nuc(), atol=1e-12)


def test_mulliken_and_dipole_match_pyscf(water_hf):
    mf = water_hf
    mol = mf.mol
    P, S = mf.make_rdm1(), mf.get_ovlp()
    layout = AOLayout.from_mole(mol)
    ao_atom = np.concatenate([[a] * (sl.stop - sl.start) for a, sl in enumerate(layout.atom_ao_slices)])
    charges = observables.mulliken_charges(jnp.asarray(P), jnp.asarray(S), ao_atom,
                                           jnp.asarray(mol.atom_charges(), jnp.float64))
    _, pyscf_charges = mf.mulliken_pop(verbose=0)
    np.testing.assert_allclose(charges, pyscf_charges, atol=1e-10)
    dip = observables.dipole_moment(jnp.asarray(P), observables.dipole_integrals(mol),
                                    jnp.asarray(mol.atom_charges(), jnp.float64), mol.atom_coords())
    np.testing.assert_allclose(dip, mf.dip_moment(unit="AU", verbose=0), atol=1e-9)


def test_eigen_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 5))
    S = a @ a.T + 5 * np.eye(5)
    F0 = rng.normal(size=(5, 5))
    F0 = F0 + F0.T
    direction = rng.normal(size=(5, 5))
    direction = direction + direction.T

    def observable(F):  # depends on orbital energies and on the occupied density
        eps, C = observables.roothaan(F, jnp.asarray(S))
        P = observables.density_matrix(C, 2)
        return jnp.sum(eps[:2]) + jnp.sum(P * jnp.asarray(direction))

    grad = jax.grad(observable)(jnp.asarray(F0))
    h = 1e-6
    fd = (observable(F0 + h * direction) - observable(F0 - h * direction)) / (2 * h)
    np.testing.assert_allclose(jnp.sum(grad * direction), fd, rtol=1e-6)


def test_gradients_finite_at_exact_degeneracy():
    # Diagonal F with a doubly degenerate occupied level and a unit overlap.
    F = jnp.diag(jnp.array([-1.0, -0.5, -0.5, 0.3]))

    def occupied_energy(F):
        eps, C = observables.roothaan(F, jnp.eye(4))
        return jnp.sum(eps[:3]) + jnp.sum(observables.density_matrix(C, 3))

    grad = jax.grad(occupied_energy)(F)
    assert np.all(np.isfinite(np.asarray(grad)))
    # d sum(eps_occ)/dF = projector onto the occupied space, also at the degeneracy.
    np.testing.assert_allclose(jnp.diagonal(jax.grad(lambda F: jnp.sum(observables.roothaan(F, jnp.eye(4))[0][:3]))(F)),
                               [1, 1, 1, 0], atol=1e-12)


def test_slightly_indefinite_overlap_stays_finite():
    S = jnp.array([[1.0, 1.0 + 1e-9], [1.0 + 1e-9, 1.0]])  # one eigenvalue of -1e-9
    eps, C = observables.roothaan(jnp.diag(jnp.array([-1.0, 0.5])), S)
    assert np.all(np.isfinite(np.asarray(eps))) and np.all(np.isfinite(np.asarray(C)))


def test_cube_files(tmp_path, water_hf):
    mf = water_hf
    paths = observables.write_cube_files(mf.mol, mf.make_rdm1(), mf.mo_coeff, [4, 5],
                                         str(tmp_path / "water"), resolution=0.5)
    assert [p.rsplit("_", 1)[1] for p in paths] == ["density.cube", "orbital4.cube", "orbital5.cube"]
    text = open(paths[0]).read().splitlines()
    n_atoms = int(text[2].split()[0])
    assert n_atoms == 3 and len(text) > 10
    assert not list(tmp_path.glob("*.tmp"))
