"""Local energy: exact eigenstates, folx against the Hessian loop, and the Coulomb terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmc import hamiltonian

METHODS = ("folx", "hessian")


@pytest.fixture(scope="module", autouse=True)
def float64():
    """float64 for this module only: exact-eigenstate checks at 1e-10 need it."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# --- exact one-electron eigenstates ----------------------------------------------------------

NUCLEUS = np.array([[0.3, -0.4, 0.5]])  # off the origin, so a missing "- R" would show


def hydrogen_like_1s(z):
    """psi = exp(-Z |r - R|), E = -Z^2 / 2."""

    def log_psi(params, electrons):
        return -z * jnp.linalg.norm(electrons[0] - NUCLEUS[0])

    return log_psi


def hydrogen_2pz(params, electrons):
    """psi = (z - Z_R) exp(-|r - R| / 2), E = -1/8."""
    d = electrons[0] - NUCLEUS[0]
    return jnp.log(jnp.abs(d[2])) - 0.5 * jnp.linalg.norm(d)


EXACT_CASES = {
    "H 1s": (hydrogen_like_1s(1.0), 1.0, -0.5, 1.5),
    "He+ 1s": (hydrogen_like_1s(2.0), 2.0, -2.0, 0.75),
    "H 2p_z": (hydrogen_2pz, 1.0, -0.125, 5.0),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_eigenstates_have_constant_local_energy(case, method):
    log_psi, charge, energy, spread = EXACT_CASES[case]
    local_energy = jax.jit(
        hamiltonian.make_batched_local_energy(log_psi, NUCLEUS, np.array([charge]), method)
    )
    rng = np.random.default_rng(0)
    points = NUCLEUS + spread * rng.standard_normal((300, 3))
    if case == "H 2p_z":
        # On the nodal plane log|psi| is singular; next to it laplacian and |gradient|^2 are
        # both ~1/z^2 and cancel, costing digits. Keep 0.05 bohr away from it.
        points = points[np.abs(points[:, 2] - NUCLEUS[0, 2]) > 0.05]
    e_local = np.asarray(local_energy(None, jnp.asarray(points[:, None, :])))
    assert e_local.dtype == np.float64
    np.testing.assert_allclose(e_local, energy, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_float32_stays_float32(method):
    # Production runs in float32; float64 atoms must not silently promote the calculation.
    with jax.enable_x64(False):
        local_energy = jax.jit(
            hamiltonian.make_local_energy(hydrogen_like_1s(1.0), NUCLEUS, [1.0], method)
        )
        e = local_energy(None, jnp.asarray(NUCLEUS + 0.7, dtype=jnp.float32))
        assert e.dtype == jnp.float32
        assert abs(float(e) + 0.5) < 1e-5


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown kinetic-energy method"):
        hamiltonian.make_local_energy(hydrogen_like_1s(1.0), NUCLEUS, [1.0], method="finite")


# --- a correlated many-electron test function -------------------------------------------------

ATOMS = np.array([[0.0, 0.1, -0.8], [0.2, -0.1, 0.9]])
CHARGES = np.array([3.0, 1.0])
N_UP, N_DOWN = 2, 2


def init_params(key):
    n_orbitals, n_atoms, hidden = N_UP + N_DOWN, len(ATOMS), 5
    k = jax.random.split(key, 6)
    return {
        "exponent": 0.5 + jax.random.uniform(k[0], (n_orbitals, n_atoms)),
        "polynomial": 0.5 * jax.random.normal(k[1], (n_orbitals, n_atoms, 3)),
        "coefficient": jax.random.normal(k[2], (n_orbitals, n_atoms)),
        "w": jax.random.normal(k[3], (hidden, 3)),
        "b": jax.random.normal(k[4], (hidden,)),
        "v": 0.3 * jax.random.normal(k[5], (hidden,)),
    }


def correlated_log_psi(params, electrons):
    """Slater-type orbitals times a polynomial, one determinant per spin, a one-electron tanh
    layer and a cusp-satisfying electron-electron Jastrow factor: every operation class that a
    neural wavefunction uses (per electron, per pair, mixing all electrons)."""
    d = electrons[:, None, :] - ATOMS[None]  # (n_electrons, n_atoms, 3)
    r = jnp.linalg.norm(d, axis=-1)  # (n_electrons, n_atoms)
    envelope = jnp.exp(-params["exponent"][None] * r[:, None, :])  # (n_el, n_orb, n_atoms)
    polynomial = 1.0 + jnp.einsum("eid,kid->eki", d, params["polynomial"])
    orbitals = jnp.einsum("eki,ki->ek", envelope * polynomial, params["coefficient"])
    _, log_up = jnp.linalg.slogdet(orbitals[:N_UP, :N_UP])
    _, log_down = jnp.linalg.slogdet(orbitals[N_UP:, N_UP : N_UP + N_DOWN])

    one_electron = jnp.sum(jnp.tanh(electrons @ params["w"].T + params["b"]) @ params["v"])

    i, j = jnp.triu_indices(N_UP + N_DOWN, k=1)
    r_ij = jnp.linalg.norm(electrons[i] - electrons[j], axis=-1)
    same_spin = (i < N_UP) == (j < N_UP)
    cusp = jnp.where(same_spin, 0.25, 0.5)
    jastrow = jnp.sum(cusp * r_ij / (1.0 + r_ij))
    return log_up + log_down + one_electron + jastrow


@pytest.fixture(scope="module")
def correlated_samples():
    params = init_params(jax.random.PRNGKey(1))
    rng = np.random.default_rng(2)
    centres = ATOMS[[0, 0, 1, 0]]
    walkers = jnp.asarray(centres[None] + rng.standard_normal((8, N_UP + N_DOWN, 3)))
    return params, walkers


@pytest.mark.parametrize("sparsity_threshold", [0, hamiltonian.SPARSITY_THRESHOLD])
def test_folx_agrees_with_hessian_loop(correlated_samples, sparsity_threshold):
    params, walkers = correlated_samples
    kinetic = {
        "folx": hamiltonian.make_kinetic_energy(correlated_log_psi, "folx", sparsity_threshold),
        "hessian": hamiltonian.make_kinetic_energy(correlated_log_psi, "hessian"),
    }
    values = {
        name: np.asarray(jax.jit(hamiltonian.batch_over_walkers(fn))(params, walkers))
        for name, fn in kinetic.items()
    }
    assert np.all(np.isfinite(values["hessian"]))
    # The two differ only by rounding in float64 (~1e-13 observed).
    np.testing.assert_allclose(values["folx"], values["hessian"], rtol=1e-11)


def test_hessian_loop_against_full_hessian(correlated_samples):
    # Independent check of the reference itself: the trace of the materialised Hessian.
    params, walkers = correlated_samples
    kinetic = jax.jit(hamiltonian.make_kinetic_energy(correlated_log_psi, "hessian"))

    @jax.jit
    def by_full_hessian(electrons):
        f = lambda x: correlated_log_psi(params, x.reshape(electrons.shape))  # noqa: E731
        flat = electrons.reshape(-1)
        return -0.5 * (jnp.trace(jax.hessian(f)(flat)) + jnp.sum(jax.grad(f)(flat) ** 2))

    for electrons in walkers[:3]:
        expected = by_full_hessian(electrons)
        np.testing.assert_allclose(kinetic(params, electrons), expected, rtol=1e-10)


def test_batched_local_energy_matches_single(correlated_samples):
    params, walkers = correlated_samples
    # The batching is independent of the method; the Hessian loop compiles faster here.
    single = jax.jit(hamiltonian.make_local_energy(correlated_log_psi, ATOMS, CHARGES, "hessian"))
    batched = jax.jit(
        hamiltonian.make_batched_local_energy(correlated_log_psi, ATOMS, CHARGES, "hessian")
    )
    values = batched(params, walkers)
    assert values.shape == (walkers.shape[0],)
    expected = [single(params, w) for w in walkers]
    np.testing.assert_allclose(values, expected, rtol=1e-12)


# --- potential energy -------------------------------------------------------------------------


def potential_by_loops(electrons, atoms, charges):
    v = 0.0
    for i in range(len(electrons)):
        for j in range(i + 1, len(electrons)):
            v += 1.0 / np.linalg.norm(electrons[i] - electrons[j])
        for a in range(len(atoms)):
            v -= charges[a] / np.linalg.norm(electrons[i] - atoms[a])
    for a in range(len(atoms)):
        for b in range(a + 1, len(atoms)):
            v += charges[a] * charges[b] / np.linalg.norm(atoms[a] - atoms[b])
    return v


POTENTIAL_CASES = {
    "H2": (np.array([[0.0, 0.0, -0.7], [0.0, 0.0, 0.7]]), np.array([1.0, 1.0]), 2),
    "3 atoms, 4 electrons": (
        np.array([[0.1, 0.0, 0.0], [2.3, 0.4, -0.2], [-1.1, 1.7, 0.5]]),
        np.array([3.0, 1.0, 2.0]),
        4,
    ),
    "1 atom, 1 electron": (NUCLEUS, np.array([2.0]), 1),
}


@pytest.mark.parametrize("case", list(POTENTIAL_CASES))
def test_potential_energy_against_double_loop(case):
    atoms, charges, n_electrons = POTENTIAL_CASES[case]
    potential = jax.jit(hamiltonian.potential_energy)
    rng = np.random.default_rng(3)
    for _ in range(10):
        electrons = atoms.mean(0) + 1.5 * rng.standard_normal((n_electrons, 3))
        value = potential(jnp.asarray(electrons), atoms, charges)
        np.testing.assert_allclose(value, potential_by_loops(electrons, atoms, charges), rtol=1e-12)


def test_potential_gradient_is_finite_for_one_electron():
    # With no electron pairs the e-e sum is empty; it must not put NaN into gradients.
    grad = jax.grad(hamiltonian.potential_energy)(jnp.array([[0.4, 0.1, -0.3]]), NUCLEUS, [1.0])
    assert np.all(np.isfinite(grad))
