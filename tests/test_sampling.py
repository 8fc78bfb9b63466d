"""Normal-mode thermal sampling: statistics checked against the harmonic oscillator."""

import numpy as np
import pytest

from conftest import start_geometry
from molfoundation import molecules
from phisnet_jax import sampling
from molfoundation.errors import InputError
from phisnet_jax.reference import LevelOfTheory

LEVEL = LevelOfTheory("hf", "sto-3g")


@pytest.fixture(scope="module")
def water_ensemble():
    return sampling.thermal_ensemble(start_geometry("water"), LEVEL, temperature=500.0, seed=3)


@pytest.fixture(scope="module")
def water_hessian(water_ensemble):
    return sampling.hessian(water_ensemble.equilibrium, LEVEL)


def test_water_has_three_real_modes(water_ensemble):
    wn = water_ensemble.modes.wavenumbers
    assert wn.shape == (3,)
    # HF/STO-3G water: bend ~2170, stretches ~4140 and ~4390 cm^-1.
    np.testing.assert_allclose(wn, [2170.0, 4140.0, 4390.0], rtol=0.01)


def test_equipartition(water_ensemble, water_hessian):
    n = 4000
    energies = []
    for i in range(1, n + 1):
        dx = (water_ensemble.geometry(i).positions - water_ensemble.equilibrium.positions).ravel()
        energies.append(0.5 * dx @ water_hessian @ dx)
    expected = 0.5 * 3 * 500.0 * sampling.KELVIN_TO_HARTREE
    # Sum of 3 chi^2_1/2 variables: relative standard error sqrt(2/3)/sqrt(n) = 1.3 %.
    assert abs(np.mean(energies) / expected - 1.0) < 0.05


def test_displacements_carry_no_rigid_motion(water_ensemble):
    masses = sampling.atomic_masses(water_ensemble.equilibrium.atomic_numbers)
    eq = water_ensemble.equilibrium.positions
    com = masses @ eq / masses.sum()
    for i in (1, 2, 3):
        dx = water_ensemble.geometry(i).positions - eq
        np.testing.assert_allclose(masses @ dx, 0.0, atol=1e-10)  # no translation
        np.testing.assert_allclose(np.einsum("i,ij->j", masses, np.cross(eq - com, dx)), 0.0, atol=1e-9)


def test_geometries_are_reproducible_and_independent(water_ensemble):
    again = sampling.ThermalEnsemble(water_ensemble.equilibrium, water_ensemble.modes, 500.0, 3)
    np.testing.assert_array_equal(again.geometry(5).positions, water_ensemble.geometry(5).positions)
    other_seed = sampling.ThermalEnsemble(water_ensemble.equilibrium, water_ensemble.modes, 500.0, 4)
    assert not np.allclose(other_seed.geometry(5).positions, water_ensemble.geometry(5).positions)
    assert water_ensemble.geometry(0) is water_ensemble.equilibrium


def test_quantum_amplitudes_are_ground_state_at_low_temperature(water_ensemble):
    modes = water_ensemble.modes
    masses = sampling.atomic_masses(water_ensemble.equilibrium.atomic_numbers)
    rng = np.random.default_rng(0)
    n = 4000
    dx = np.array([sampling.normal_mode_displacement(modes, 1.0, rng, quantum=True) for _ in range(n)])
    # Normal coordinates back from Cartesian displacements: q_k = sum_i m_i d_ki . dx_i.
    q = np.einsum("i,kia,sia->sk", masses, modes.displacements, dx)
    # Harmonic ground state: <q^2> = 1 / (2 omega); standard error of a variance sqrt(2/n) = 2 %.
    np.testing.assert_allclose(q.var(axis=0) * 2 * modes.frequencies, 1.0, rtol=0.08)


def test_round_trip_through_arrays(water_ensemble):
    arrays, attrs = water_ensemble.to_arrays()
    restored = sampling.ensemble_from_arrays(arrays, attrs)
    np.testing.assert_array_equal(restored.geometry(9).positions, water_ensemble.geometry(9).positions)


def test_saddle_point_is_rejected():
    # Linear water is a saddle point of the bend.
    linear = start_geometry("water").with_positions(np.array([[0.0, 0, 0], [1.8, 0, 0], [-1.8, 0, 0]]))
    with pytest.raises(InputError, match="not a minimum"):
        sampling.normal_modes(linear, sampling.hessian(linear, LEVEL))


@pytest.mark.parametrize("name", sorted(molecules.NAMED_MOLECULES))
def test_named_geometry_fixture_is_what_rdkit_makes(name):
    """The suite's start geometries (tests/fixtures/named_geometries.json, every named
    molecule) are those that molecules.from_name makes with RDKit/MMFF today."""
    fixture, made = start_geometry(name), molecules.from_name(name)
    np.testing.assert_array_equal(fixture.atomic_numbers, made.atomic_numbers)
    np.testing.assert_allclose(fixture.positions, made.positions, rtol=0, atol=1e-9)
