"""VMC systems and Hartree-Fock orbitals: named geometries, input errors, HF against pyscf,
localisation, canonical order and signs, and the JAX evaluation of the orbitals."""

import jax
import numpy as np
import pytest
from pyscf import gto, scf
from scipy.spatial.transform import Rotation

from molfoundation import gaussians, molecules
from molfoundation.basis import ao_rotation
from molfoundation.errors import InputError
from vmc import orbitals, systems

HF_SYSTEMS = ("H", "H2", "LiH", "Li", "Be", "N2", "H2O", "CH4", "H5")


@pytest.fixture(scope="module")
def hf_cache():
    """Boys-localised and canonical HF orbitals, computed once per system."""
    cache = {}

    def get(name, localization="boys"):
        key = (name, localization)
        if key not in cache:
            cache[key] = orbitals.hartree_fock(systems.from_name(name), localization=localization)
        return cache[key]

    return get


# --- systems -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, n_up, n_down",
    [("H", 1, 0), ("H2", 1, 1), ("LiH", 2, 2), ("Li", 2, 1), ("Be", 2, 2), ("N2", 7, 7),
     ("H2O", 5, 5), ("CH4", 5, 5), ("N", 5, 2), ("O", 5, 3), ("H7", 4, 3)],
)
def test_named_systems_have_ground_state_spins(name, n_up, n_down):
    system = systems.from_name(name)
    assert (system.n_up, system.n_down) == (n_up, n_down)
    assert system.n_electrons == n_up + n_down
    assert system.positions.shape == (system.n_atoms, 3)
    assert not system.positions.flags.writeable


def test_reference_geometries():
    def bond(name):
        p = systems.from_name(name).positions
        return np.linalg.norm(p[1] - p[0])

    assert bond("H2") == pytest.approx(1.4)
    assert bond("LiH") == pytest.approx(3.015)
    assert bond("N2") == pytest.approx(2.068)
    water = systems.from_name("h2o")  # names are case-insensitive
    oh = water.positions[1:] - water.positions[0]
    angle = np.degrees(np.arccos(oh[0] @ oh[1] / np.linalg.norm(oh, axis=1).prod()))
    assert np.linalg.norm(oh, axis=1) == pytest.approx([1.8088] * 2, abs=1e-4)
    assert angle == pytest.approx(104.52)
    methane = systems.from_name("CH4").positions
    ch = np.linalg.norm(methane[1:] - methane[0], axis=1)
    assert ch == pytest.approx([1.087 * molecules.BOHR_PER_ANGSTROM] * 4)
    hh = np.linalg.norm(methane[1:, None] - methane[None, 1:], axis=-1)[np.triu_indices(4, 1)]
    assert hh == pytest.approx([hh[0]] * 6)  # regular tetrahedron


def test_hydrogen_chain_spacing_and_spin():
    chain = systems.hydrogen_chain(6, spacing=2.0)
    assert np.diff(chain.positions[:, 2]) == pytest.approx([2.0] * 5)
    assert chain.positions.mean(axis=0) == pytest.approx([0, 0, 0])
    assert (chain.n_up, chain.n_down) == (3, 3)
    odd = systems.from_name("H9", chain_spacing=1.5)
    assert (odd.n_up, odd.n_down, odd.spin) == (5, 4, 1)
    assert np.diff(odd.positions[:, 2]) == pytest.approx([1.5] * 8)
    assert systems.hydrogen_chain(1).n_atoms == 1


def test_from_mole_xyz_and_load_round_trip(tmp_path):
    water = systems.from_name("H2O")
    back = systems.from_mole(water.to_pyscf("sto-6g"))
    np.testing.assert_allclose(back.positions, water.positions, atol=1e-12)
    np.testing.assert_array_equal(back.atomic_numbers, water.atomic_numbers)
    cation = systems.from_mole(gto.M(atom="Li 0 0 0", charge=1, spin=0, basis="sto-6g"))
    assert (cation.n_up, cation.n_down) == (1, 1)

    path = str(tmp_path / "water.xyz")
    molecules.write_xyz(path, [water.to_molecule()])
    from_file = systems.load(path)
    np.testing.assert_allclose(from_file.positions, water.positions, atol=1e-8)
    assert from_file.name == "water" and from_file.spin == 0
    radical = systems.from_xyz(path, charge=1)
    assert (radical.n_up, radical.n_down) == (5, 4)
    assert systems.load("LiH").name == "LiH"


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: systems.from_name("Unobtainium"), "unknown system"),
        (lambda: systems.from_name(""), "non-empty"),
        (lambda: systems.from_name("H2", spin=1), "impossible"),
        (lambda: systems.from_name("H2", spin=-2), "must not be negative"),
        (lambda: systems.from_name("Li", charge=3), "leaves 0 electrons"),
        (lambda: systems.hydrogen_chain(0), "positive whole number"),
        (lambda: systems.hydrogen_chain(3, spacing=-1.0), "positive length"),
        (lambda: systems.hydrogen_chain(3, spacing=0.1), "apart"),
        (lambda: systems.System(np.array([1, 1]), np.array([[0, 0, 0], [0, 0, np.nan]])),
         "non-finite"),
        (lambda: systems.System(np.array([1]), np.zeros((2, 3))), "shape"),
        (lambda: systems.from_xyz("/nonexistent/file.xyz"), "not found"),
        (lambda: systems.from_name("Xe"), "up to Z"),
        (lambda: orbitals.hartree_fock(systems.from_name("H2"), basis="no-such-basis"), "basis"),
        (lambda: orbitals.hartree_fock(systems.from_name("H2"), localization="pm"), "localisation"),
    ],
)
def test_bad_input_raises_one_line_input_error(build, message):
    with pytest.raises(InputError, match=message) as info:
        build()
    assert "\n" not in str(info.value)


# --- Hartree-Fock ------------------------------------------------------------------------------


def pyscf_reference(system, basis="sto-6g"):
    mol = system.to_pyscf(basis)
    mf = scf.RHF(mol) if system.spin == 0 else scf.ROHF(mol)
    mf.conv_tol = 1e-12
    mf.kernel()
    assert mf.converged
    return mol, mf


@pytest.mark.parametrize("name", HF_SYSTEMS)
def test_hartree_fock_matches_pyscf_and_spans_the_canonical_space(name, hf_cache):
    system = systems.from_name(name)
    hf = hf_cache(name)
    mol, mf = pyscf_reference(system)
    assert hf.energy == pytest.approx(mf.e_tot, abs=1e-8)
    assert hf.method == ("RHF" if system.spin == 0 else "ROHF")
    overlap = mol.intor("int1e_ovlp")
    for spin, (count, occupied) in enumerate(
        [(system.n_up, mf.mo_occ > 0), (system.n_down, mf.mo_occ > 1)]
    ):
        c = hf.coefficients[spin]
        assert c.shape == (mol.nao, count)
        np.testing.assert_allclose(c.T @ overlap @ c, np.eye(count), atol=1e-9)
        canonical = mf.mo_coeff[:, occupied]
        # Same occupied space: equal AO projectors (density matrices) per spin.
        np.testing.assert_allclose(c @ c.T, canonical @ canonical.T, atol=1e-8)
        # Non-decreasing, except within ties (reordered by populations and centroids).
        assert np.all(np.diff(hf.orbital_energies[spin]) >= -orbitals.ENERGY_TIE_TOLERANCE)
        assert np.all(c.sum(axis=0) > 0)
    if system.spin == 0:
        np.testing.assert_array_equal(hf.up, hf.down)


def test_localisation_lowers_spread_and_keeps_single_atom_orbitals(hf_cache):
    mol = systems.from_name("H2O").to_pyscf("sto-6g")
    spread = lambda hf: orbitals._spread(mol, hf.up).sum()  # noqa: E731
    assert spread(hf_cache("H2O")) < spread(hf_cache("H2O", None)) - 1.0
    # The orbitals of an s-only atom are all centred on the nucleus: nothing to localise.
    np.testing.assert_allclose(hf_cache("Li").up, hf_cache("Li", None).up, atol=1e-12)
    # Water: 1 core, 2 equivalent O-H bonds, 2 equivalent lone pairs.
    energies = hf_cache("H2O").orbital_energies[0]
    assert energies[1] == pytest.approx(energies[2], abs=1e-6)
    assert energies[3] == pytest.approx(energies[4], abs=1e-6)
    assert energies[0] < energies[1] - 1 and energies[2] < energies[3] - 0.05


def test_orbitals_are_reproducible_and_covariant(hf_cache):
    water = systems.from_name("H2O")
    first = hf_cache("H2O")
    again = orbitals.hartree_fock(water)
    # Same order and signs; values agree to the convergence of the SCF and localisation.
    np.testing.assert_allclose(again.up, first.up, atol=1e-6)
    rotation = Rotation.random(random_state=7).as_matrix()
    rotated = orbitals.hartree_fock(water.rotated(rotation))
    np.testing.assert_allclose(rotated.orbital_energies[0], first.orbital_energies[0], atol=1e-7)
    expected = ao_rotation(first.layout, rotation) @ first.up
    overlap = water.rotated(rotation).to_pyscf("sto-6g").intor("int1e_ovlp")
    match = rotated.up.T @ overlap @ expected
    # Every orbital is the rotated original up to sign (and the order of equivalent ones).
    np.testing.assert_allclose(np.sort(np.abs(match).max(axis=1)), np.ones(5), atol=1e-6)


def test_fix_signs_and_canonical_order_helpers():
    c = np.array([[1.0, -2.0, 0.5], [-3.0, 1.0, -0.5], [0.0, 0.0, 0.0]])
    fixed = orbitals.fix_signs(c)
    # Column 3 sums to zero: its largest coefficient (the first of equals) becomes positive.
    np.testing.assert_array_equal(fixed, [[-1.0, 2.0, 0.5], [3.0, -1.0, -0.5], [0, 0, 0]])
    energies = np.array([-0.5, -1.0, -0.5 + 1e-7, -2.0])
    populations = np.array([[0.2, 1.8], [1.0, 1.0], [1.8, 0.2], [2.0, 0.0]])
    centroids = np.zeros((4, 3))
    # Ties broken by the population of atom 0 (larger first).
    np.testing.assert_array_equal(orbitals.canonical_order(energies, populations, centroids),
                                  [3, 1, 2, 0])


# --- orbitals in JAX ---------------------------------------------------------------------------


POINTS = np.random.default_rng(0).normal(scale=1.5, size=(64, 3))


@pytest.mark.parametrize("basis", ["sto-6g", "cc-pvdz"])  # cc-pVDZ adds d shells and p on H
def test_ao_values_match_pyscf_eval_gto(basis):
    water = systems.from_name("H2O")
    mol = water.to_pyscf(basis)
    points = POINTS + water.positions[0]
    ao_values = gaussians.make_ao_values(gaussians.GaussianBasis.from_mole(mol))
    with jax.enable_x64(True):
        values = np.asarray(jax.jit(ao_values)(water.positions, points))
        gradients = np.asarray(
            jax.jit(jax.vmap(jax.jacfwd(lambda p: ao_values(water.positions, p[None])[0])))(points)
        )
    np.testing.assert_allclose(values, mol.eval_gto("GTOval_sph", points), rtol=0, atol=1e-12)
    # d/dr of each AO against pyscf's analytic AO gradients: (3, n_points, n_ao).
    reference = mol.eval_gto("GTOval_ip_sph", points)
    np.testing.assert_allclose(np.moveaxis(gradients, -1, 0), reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["H", "Li", "H2O"])
def test_hf_orbital_values_match_pyscf(name, hf_cache):
    system = systems.from_name(name)
    hf = hf_cache(name)
    mol = system.to_pyscf("sto-6g")
    with jax.enable_x64(True):
        up, down = jax.jit(orbitals.make_orbital_values(hf))(POINTS)
    aos = mol.eval_gto("GTOval_sph", POINTS)
    assert up.shape == (len(POINTS), system.n_up) and down.shape == (len(POINTS), system.n_down)
    np.testing.assert_allclose(np.asarray(up), aos @ hf.up, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(down), aos @ hf.down, rtol=0, atol=1e-10)
