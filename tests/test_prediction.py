"""Predictions of a model with a core-Hamiltonian head: energy, forces, observables, pyscf use.

The model is untrained (random parameters): the tests check exact relations that hold for any
parameters, i.e. forces are minus the energy gradient, the energy is rotation-invariant and the
forces rotate, densities hold the right number of electrons.
"""

import dataclasses
import warnings

import jax
import numpy as np
import pytest

from conftest import random_rotation, start_geometry
from molfoundation import compiling, molecules
from phisnet_jax.evaluate import TrainedModel
from phisnet_jax.model import PhiSNetConfig, make_inputs, make_phisnet
from phisnet_jax.prediction import PredictionWarning, predict
from phisnet_jax.reference import LevelOfTheory, make_scf
from phisnet_jax.train import TrainConfig, cast_inputs

CONFIG = PhiSNetConfig(basis="sto-3g", elements=(1, 8), features=8, max_order=2, num_modules=1,
                       num_radial=8, overlap_features=4, core_hamiltonian=True, residual_blocks=0,
                       head_residual_blocks=1)


@pytest.fixture(scope="module")
def trained():
    with jax.enable_x64(True):
        model = make_phisnet(CONFIG)
        m = start_geometry("water")
        example = cast_inputs(make_inputs(CONFIG, m.atomic_numbers, m.positions), np.float64)
        params = compiling.jit_once(model.init)(jax.random.PRNGKey(3), example)
    return TrainedModel(CONFIG, TrainConfig(float64=True), model, params, step=0, distance_ranges=WATER_RANGES)


def _water_distances():
    m = start_geometry("water")  # O, H, H
    d = lambda i, j: float(np.linalg.norm(m.positions[i] - m.positions[j]))  # noqa: E731
    return d(0, 1), d(0, 2), d(1, 2)


# As if trained on the water geometry alone: its O-H and H-H distances (bohr).
_OH1, _OH2, _HH = _water_distances()
WATER_RANGES = {"1-8": [min(_OH1, _OH2), max(_OH1, _OH2)], "1-1": [_HH, _HH]}


@pytest.fixture(scope="module")
def water_prediction(trained):
    return predict(trained, start_geometry("water"))


def test_predictions_say_when_they_extrapolate(trained, water_prediction):
    """Inside the training distances (within 0.2 bohr) nothing is said; one O-H bond stretched
    by 0.5 bohr is named with the H-H pair it widens, in ``Prediction.warnings`` and as an
    PredictionWarning; an element pair missing from the training data is named as never seen."""
    assert water_prediction.warnings == ()
    m = start_geometry("water")

    def stretched(by):
        positions = m.positions.copy()
        bond = positions[1] - positions[0]
        positions[1] = positions[0] + bond * (1 + by / np.linalg.norm(bond))
        return m.with_positions(positions)

    with warnings.catch_warnings():
        warnings.simplefilter("error", PredictionWarning)
        assert predict(trained, stretched(0.1)).warnings == ()
    far = stretched(0.5)
    with pytest.warns(PredictionWarning, match=r"outside the training data: atoms 0-1 .* \(and 1 more pairs\)"):
        prediction = predict(trained, far)
    hh = np.linalg.norm(far.positions[1] - far.positions[2])  # the H-H distance grows too (by 0.4 bohr)
    assert prediction.outside_training == (
        f"atoms 0-1 (1-8): {_OH1 + 0.5:.2f} bohr outside training range {min(_OH1, _OH2):.2f}-{max(_OH1, _OH2):.2f}",
        f"atoms 1-2 (1-1): {hh:.2f} bohr outside training range {_HH:.2f}-{_HH:.2f}")
    assert len(prediction.warnings) == 1  # S stays positive definite
    without_hh = dataclasses.replace(trained, distance_ranges={"1-8": WATER_RANGES["1-8"]})
    assert without_hh.extrapolation_warnings(m.atomic_numbers, m.positions) == [
        "atoms 1-2 (1-1): element pair never seen in training"]


def test_the_exact_overlap_is_used_by_default(trained, water_prediction):
    """The S of a prediction is pyscf's overlap matrix of the geometry, whatever the model's S
    head says; the energy is the same whichever S the orbitals use."""
    m = start_geometry("water")
    exact = molecules.to_pyscf(m, "sto-3g").intor("int1e_ovlp")
    assert water_prediction.overlap_source == "exact"
    np.testing.assert_allclose(water_prediction.overlap, exact, atol=1e-13)
    assert np.abs(water_prediction.predicted_overlap - exact).max() > 0.05  # an untrained S head
    with_predicted = predict(trained, m, overlap="predicted")
    np.testing.assert_array_equal(with_predicted.overlap, water_prediction.predicted_overlap)
    assert with_predicted.energy == water_prediction.energy
    assert np.abs(with_predicted.orbital_energies - water_prediction.orbital_energies).max() > 1e-3
    with pytest.raises(Exception, match="overlap must be one of"):
        predict(trained, m, overlap="guess")


def test_a_predicted_overlap_that_is_not_positive_definite_is_said(trained, water_prediction):
    """Overlap heads scaled up 1000-fold make the off-site blocks of S far too large (up to
    15 against 0.24), so S has negative eigenvalues; a prediction with that S says so with its
    smallest eigenvalue, one with the exact S says nothing."""
    exact = molecules.to_pyscf(start_geometry("water"), "sto-3g").intor("int1e_ovlp")
    assert water_prediction.smallest_overlap_eigenvalue == pytest.approx(np.linalg.eigvalsh(exact)[0], abs=1e-12)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: 1000 * np.asarray(x) if "overlap_head" in jax.tree_util.keystr(path) else x, trained.params)
    broken = dataclasses.replace(trained, params=params)
    broken.__dict__.update({name: getattr(trained, name) for name in  # compiled once
                            ("apply", "batched_energy_and_forces", "exact_overlap")})
    with warnings.catch_warnings():
        warnings.simplefilter("error", PredictionWarning)
        assert predict(broken, start_geometry("water")).warnings == ()
    with pytest.warns(PredictionWarning, match="overlap matrix is not positive definite"):
        prediction = predict(broken, start_geometry("water"), overlap="predicted")
    smallest = np.linalg.eigvalsh(prediction.overlap)[0]
    assert smallest < 0 and prediction.smallest_overlap_eigenvalue == pytest.approx(smallest, abs=1e-12)
    assert prediction.warnings == (f"the predicted overlap matrix is not positive definite (smallest eigenvalue "
                                   f"{smallest:.3g}): orbitals and everything derived from them are unreliable",)


def test_forces_are_minus_the_energy_gradient(trained, water_prediction):
    m = start_geometry("water")
    h = 1e-4
    for atom, axis in [(0, 0), (1, 2), (2, 1)]:
        energies = []
        for sign in (1, -1):
            pos = m.positions.copy()
            pos[atom, axis] += sign * h
            energies.append(predict(trained, m.with_positions(pos)).energy)
        fd_force = -(energies[0] - energies[1]) / (2 * h)
        assert abs(water_prediction.forces[atom, axis] - fd_force) < 1e-6


def test_energy_invariant_and_forces_rotate(trained, water_prediction):
    m = start_geometry("water")
    R = random_rotation(11)
    rotated = predict(trained, m.with_positions(m.positions @ R.T))
    assert abs(rotated.energy - water_prediction.energy) < 1e-9
    np.testing.assert_allclose(rotated.forces, water_prediction.forces @ R.T, atol=1e-9)
    np.testing.assert_allclose(rotated.orbital_energies, water_prediction.orbital_energies, atol=1e-9)
    # The dipole about the origin, with positions rotated about the origin, rotates with them.
    np.testing.assert_allclose(rotated.dipole, R @ water_prediction.dipole, atol=1e-9)


def test_observables_are_consistent(water_prediction):
    p = water_prediction
    assert p.fock.shape == (7, 7) and p.core_hamiltonian.shape == (7, 7)
    np.testing.assert_allclose(np.trace(p.density_matrix @ p.overlap), 10.0, atol=1e-9)
    np.testing.assert_allclose(p.mulliken_charges.sum(), 0.0, atol=1e-9)
    assert p.homo_lumo_gap == pytest.approx(p.orbital_energies[5] - p.orbital_energies[4])


def test_predicted_density_is_a_valid_pyscf_guess(water_prediction):
    m = start_geometry("water")
    level = LevelOfTheory("hf", "sto-3g", conv_tol=1e-12, conv_tol_grad=1e-8)
    reference = make_scf(molecules.to_pyscf(m, "sto-3g"), level)
    reference.kernel()
    guessed = make_scf(molecules.to_pyscf(m, "sto-3g"), level)
    guessed.kernel(dm0=water_prediction.density_matrix)
    assert guessed.converged and abs(guessed.e_tot - reference.e_tot) < 1e-8


def test_open_shell_and_unknown_elements_are_rejected(trained):
    oh = molecules.Molecule(np.array([8, 1]), np.array([[0.0, 0, 0], [0, 0, 1.8]]), spin=1)
    with pytest.raises(Exception, match="closed-shell"):
        predict(trained, oh)
    hf = molecules.Molecule(np.array([9, 1]), np.array([[0.0, 0, 0], [0, 0, 1.7]]))
    with pytest.raises(Exception, match="not atomic number"):
        predict(trained, hf)


def test_ase_calculator_forces_are_minus_the_energy_gradient(trained, water_prediction):
    """Through ASE (eV, angstrom): the model's energy and forces of ``predict``, and forces
    equal to minus the central-difference gradient of the calculator's own energy."""
    from ase import Atoms
    from ase.units import Bohr, Hartree

    from phisnet_jax.calculator import PhiSNetCalculator

    m = start_geometry("water")
    atoms = Atoms(numbers=m.atomic_numbers, positions=m.positions * Bohr, calculator=PhiSNetCalculator(trained))
    assert atoms.get_potential_energy() == pytest.approx(water_prediction.energy * Hartree, abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), water_prediction.forces * Hartree / Bohr, atol=1e-9)
    h = 1e-4  # angstrom
    for atom, axis in [(0, 1), (2, 0)]:
        energies = []
        for sign in (1, -1):
            displaced = atoms.copy()
            displaced.calc = atoms.calc
            displaced.positions[atom, axis] += sign * h
            energies.append(displaced.get_potential_energy())
        assert abs(atoms.get_forces()[atom, axis] + (energies[0] - energies[1]) / (2 * h)) < 1e-6


def test_ase_verlet_conserves_energy_to_second_order_in_the_time_step(trained):
    """NVE with ASE's velocity Verlet from water at 300 K for 1 fs: the total energy stays
    within 5 % of the kinetic energy, and halving the time step divides its largest deviation
    by about 4, as for a symplectic second-order integrator with exact forces (forces that are
    not the energy's gradient would leave a drift that does not shrink as dt^2). The untrained
    model's surface is much stiffer than water's, hence time steps of 0.02 and 0.01 fs."""
    from ase import Atoms, units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    from phisnet_jax.calculator import PhiSNetCalculator

    m = start_geometry("water")

    def largest_deviation(dt_fs):
        atoms = Atoms(numbers=m.atomic_numbers, positions=m.positions * units.Bohr,
                      calculator=PhiSNetCalculator(trained))
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
        totals = []
        dynamics = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
        dynamics.attach(lambda: totals.append(atoms.get_total_energy()), interval=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PredictionWarning)  # the trajectory leaves the one training geometry
            dynamics.run(int(round(1 / dt_fs)))
        kinetic = 1.5 * len(atoms) * units.kB * 300
        return np.abs(np.asarray(totals) - totals[0]).max(), kinetic

    coarse, kinetic = largest_deviation(0.02)
    fine, _ = largest_deviation(0.01)
    assert fine < 0.05 * kinetic  # observed: 2.1 %
    assert 3.5 < coarse / fine < 4.5  # observed: 4.00


@pytest.mark.parametrize("method", ["rhf", "uks"])
def test_predicted_guess_on_a_pyscf_scf_object(trained, water_prediction, method):
    """One line sets the predicted density as the start of a restricted or unrestricted pyscf
    SCF; the SCF starts from it and converges to the energy it reaches from minao."""
    from pyscf import dft, scf

    from phisnet_jax.scf_guess import use_predicted_guess

    mol = molecules.to_pyscf(start_geometry("water"), "sto-3g")

    def make():
        mf = scf.RHF(mol) if method == "rhf" else dft.UKS(mol, xc="pbe")
        mf.conv_tol, mf.verbose = 1e-11, 0
        return mf

    reference = make()
    reference.kernel()
    guessed = use_predicted_guess(make(), trained)
    start = guessed.get_init_guess()
    total = start if method == "rhf" else start[0] + start[1]
    np.testing.assert_allclose(total, water_prediction.density_matrix, atol=1e-12)
    guessed.kernel()
    assert guessed.converged and abs(guessed.e_tot - reference.e_tot) < 1e-8
    with pytest.raises(Exception, match="is not the model's"):
        use_predicted_guess(scf.RHF(molecules.to_pyscf(start_geometry("water"), "6-31g")), trained)
