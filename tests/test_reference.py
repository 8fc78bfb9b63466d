"""Reference labels: internal consistency and finite-difference forces."""

import dataclasses

import numpy as np
import pytest
import scipy.linalg

from conftest import start_geometry
from molfoundation.errors import InputError
from molfoundation.molecules import Molecule
from phisnet_jax.reference import LevelOfTheory, compute_labels, ccsd_t_energy_forces, run_scf


@pytest.fixture(scope="module")
def water_pbe_labels():
    return compute_labels(start_geometry("water"), LevelOfTheory("pbe", "def2-svp"))


def test_label_shapes_and_flags(water_pbe_labels):
    lab = water_pbe_labels
    assert lab["fock"].shape == (24, 24)  # water def2-SVP, as in SchNOrb
    assert lab["forces"].shape == (3, 3)
    assert bool(lab["converged"]) and int(lab["scf_iterations"]) > 0


def test_fock_eigenproblem_gives_mo_energies(water_pbe_labels):
    lab = water_pbe_labels
    eps = scipy.linalg.eigh(lab["fock"], lab["overlap"], eigvals_only=True)
    np.testing.assert_allclose(eps, lab["mo_energies"], atol=1e-8)
    n_occ = 5
    C = lab["mo_coefficients"][:, :n_occ]
    np.testing.assert_allclose(2 * C @ C.T, lab["density_matrix"], atol=1e-10)
    np.testing.assert_allclose(np.trace(lab["density_matrix"] @ lab["overlap"]), 10.0, atol=1e-9)


def _energy(molecule, level):
    return run_scf(molecule, level).e_tot


def _central_difference(energy_fn, molecule, atom, axis, h=1e-3):
    def shifted(sign):
        pos = molecule.positions.copy()
        pos[atom, axis] += sign * h
        return energy_fn(molecule.with_positions(pos))
    return -(shifted(+1) - shifted(-1)) / (2 * h)


def test_hf_forces_match_finite_differences():
    level = LevelOfTheory("hf", "6-31g", conv_tol=1e-12, conv_tol_grad=1e-8)
    molecule = start_geometry("water")
    forces = compute_labels(molecule, level)["forces"]
    for atom, axis in [(0, 2), (1, 0), (2, 1)]:
        fd = _central_difference(lambda m: _energy(m, level), molecule, atom, axis)
        assert abs(forces[atom, axis] - fd) < 1e-6  # O(h^2) truncation ~1e-7 at h = 1e-3 bohr


def test_pbe_forces_match_finite_differences():
    """DFT forces omit the derivative of the integration grid's weights: against central
    differences at h = 1e-3 bohr they differ by 0.8e-6 to 1.4e-6 hartree/bohr (grid level 3,
    6-31G), hence 5e-6."""
    level = LevelOfTheory("pbe", "6-31g", conv_tol=1e-12, conv_tol_grad=1e-8)
    molecule = start_geometry("water")
    forces = compute_labels(molecule, level)["forces"]
    for atom, axis in [(1, 0), (2, 1)]:
        fd = _central_difference(lambda m: _energy(m, level), molecule, atom, axis)
        assert abs(forces[atom, axis]) > 1e-3 and abs(forces[atom, axis] - fd) < 5e-6


def test_ccsd_t_forces_match_finite_differences():
    level = LevelOfTheory("hf", "sto-3g", conv_tol=1e-12, conv_tol_grad=1e-8)
    molecule = start_geometry("water")
    labels = compute_labels(molecule, level, with_ccsd_t=True)
    assert labels["ccsd_t_energy"] < labels["energy"]  # correlation lowers the energy

    def ccsd_t_energy(m):
        return ccsd_t_energy_forces(run_scf(m, level))[0]

    for atom, axis in [(0, 2), (1, 1)]:
        fd = _central_difference(ccsd_t_energy, molecule, atom, axis)
        assert abs(labels["ccsd_t_forces"][atom, axis] - fd) < 1e-6


def test_open_shell_is_rejected():
    oh = Molecule(np.array([8, 1]), np.array([[0.0, 0, 0], [0, 0, 1.8]]), charge=0, spin=1)
    with pytest.raises(InputError, match="open-shell"):
        compute_labels(oh, LevelOfTheory("hf", "sto-3g"))


@pytest.mark.parametrize("level, message", [
    (LevelOfTheory("nonsense-functional", "sto-3g"), "unknown method"),
    (LevelOfTheory("hf", "no-such-basis"), "unknown basis"),
])
def test_unknown_level_is_rejected(level, message):
    with pytest.raises(InputError, match=message):
        level.check()


def test_unconverged_scf_is_flagged():
    level = dataclasses.replace(LevelOfTheory("hf", "sto-3g"), max_cycle=2)
    labels = compute_labels(start_geometry("water"), level)
    assert not bool(labels["converged"])
