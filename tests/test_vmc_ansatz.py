"""Transferable ansatz: antisymmetry, rotation invariance with HF recomputed at the rotated
geometry, invariance under HF orbital sign flips and permutations, finite values and
gradients for one-electron and empty spin channels, and a local-energy smoke test."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from molfoundation import compiling
from molfoundation.errors import InputError
from molfoundation.orbital_features import FeatureSlots
from vmc import ansatz, hamiltonian, orbitals, systems

CONFIG = ansatz.small_config()


@pytest.fixture(scope="module", autouse=True)
def float64():
    """float64 for this module only: invariances are checked to 1e-10 where exact."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def hf():
    cache = {}

    def get(name, rotation=None):
        key = (name, None if rotation is None else rotation.tobytes())
        if key not in cache:
            system = systems.from_name(name)
            if rotation is not None:
                system = system.rotated(rotation)
            cache[key] = (system, orbitals.hartree_fock(system))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def params(hf):
    """Random parameters in the shapes of ``init_params`` (any molecule gives the same).

    Random rather than initial values, so that no head is trivially symmetric or zero. They
    are drawn with numpy: compiling flax's initialisers (one random-number kernel per
    parameter) takes longer than all the invariance tests together; the real initialisation
    is tested once, below.
    """
    _, lih = hf("LiH")
    inputs = ansatz.inputs_from_hartree_fock(lih, CONFIG)
    shapes = jax.eval_shape(lambda key: ansatz.init_params(key, CONFIG, inputs),
                            jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)

    def draw(leaf):
        scale = 1.0 / np.sqrt(leaf.shape[0]) if leaf.ndim >= 2 else 0.3  # kernels: 1/sqrt(fan-in)
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree.map(draw, shapes)


@pytest.fixture(scope="module")
def wavefunction():
    """One jitted function for every molecule: compiled once per shape."""
    return jax.jit(ansatz.make_wavefunction(CONFIG))


def electrons_near(system, seed):
    """A configuration (n_el, 3) bohr: each electron near a nucleus, round robin."""
    rng = np.random.default_rng(seed)
    atoms = np.arange(system.n_electrons) % system.n_atoms
    noise = rng.normal(scale=0.7, size=(system.n_electrons, 3))
    return jnp.asarray(system.positions[atoms] + noise)


def evaluate(wavefunction, params, orbitals_, electrons, up=None, down=None):
    up = orbitals_.up if up is None else up
    down = orbitals_.down if down is None else down
    inputs = ansatz.make_inputs(orbitals_.atom_positions, orbitals_.atomic_numbers, up, down,
                                orbitals_.layout, CONFIG)
    sign, log_abs = wavefunction(params, electrons, inputs)
    return float(sign), float(log_abs)


def test_antisymmetric_under_same_spin_exchange(hf, params, wavefunction):
    system, orb = hf("H2O")
    x = electrons_near(system, 0)
    sign, log_abs = evaluate(wavefunction, params, orb, x)
    assert np.isfinite(log_abs) and sign in (-1.0, 1.0)
    for i, j in [(0, 3), (5, 9)]:  # two spin-up, two spin-down electrons
        swapped = x.at[jnp.array([i, j])].set(x[jnp.array([j, i])])
        s, l = evaluate(wavefunction, params, orb, swapped)
        assert s == -sign
        assert l == pytest.approx(log_abs, abs=1e-10)
    # Exchanging electrons of opposite spin is no symmetry: |psi| changes.
    mixed = x.at[jnp.array([0, 5])].set(x[jnp.array([5, 0])])
    assert abs(evaluate(wavefunction, params, orb, mixed)[1] - log_abs) > 1e-6


@pytest.mark.parametrize("name, seed, tolerance", [("LiH", 1, 1e-9), ("H2O", 2, 1e-6)])
def test_invariant_under_rotating_the_whole_system(name, seed, tolerance, hf, params, wavefunction):
    """Rotate electrons and nuclei; HF (and Boys) recomputed at the rotated geometry. Water's
    localised orbitals are reproduced to ~1e-7 (localisation convergence), LiH's exactly."""
    system, orb = hf(name)
    x = electrons_near(system, seed)
    _, log_abs = evaluate(wavefunction, params, orb, x)
    for rotation in (Rotation.random(random_state=seed).as_matrix(),
                     -Rotation.random(random_state=seed + 10).as_matrix()):  # and a reflection
        _, orb_rotated = hf(name, rotation)
        _, rotated = evaluate(wavefunction, params, orb_rotated, x @ rotation.T)
        assert rotated == pytest.approx(log_abs, abs=tolerance)
    # Rotating the electrons alone is not a symmetry.
    moved = evaluate(wavefunction, params, orb, x @ Rotation.random(random_state=5).as_matrix().T)
    assert abs(moved[1] - log_abs) > 1e-4


def test_invariant_under_hf_orbital_sign_flips_and_permutations(hf, params, wavefunction):
    system, orb = hf("H2O")
    x = electrons_near(system, 3)
    sign, log_abs = evaluate(wavefunction, params, orb, x)
    flip = np.ones(system.n_up)
    flip[3] = -1.0
    # One orbital of one spin: |psi| unchanged, the sign of psi flips.
    s, l = evaluate(wavefunction, params, orb, x, up=orb.up * flip)
    assert (s, l) == (-sign, pytest.approx(log_abs, abs=1e-10))
    s, l = evaluate(wavefunction, params, orb, x, up=orb.up * flip, down=orb.down * flip)
    assert (s, l) == (sign, pytest.approx(log_abs, abs=1e-10))
    # Reordering the HF orbitals (e.g. ties broken differently) only changes the sign.
    order = np.array([0, 2, 1, 3, 4])
    _, l = evaluate(wavefunction, params, orb, x, up=orb.up[:, order])
    assert l == pytest.approx(log_abs, abs=1e-10)
    # The features matter: a different orbital set changes |psi|.
    _, l = evaluate(wavefunction, params, orb, x, up=orb.up[:, [0, 1, 2, 3, 3]] + 0.1 * orb.up)
    assert abs(l - log_abs) > 1e-6


@pytest.mark.parametrize("name", ["H", "H2", "Li", "LiH"])
def test_finite_values_and_gradients(name, hf, params):
    """One-electron and empty spin channels (H: 1 up, 0 down; Li: 2 up, 1 down)."""
    system, orb = hf(name)
    fns = ansatz.make_log_psi(CONFIG, ansatz.inputs_from_hartree_fock(orb, CONFIG))
    value_and_grad = jax.jit(jax.value_and_grad(fns.log_psi, argnums=(0, 1)))
    x = electrons_near(system, 4)
    log_abs, (grad_params, grad_electrons) = value_and_grad(params, x)
    assert np.isfinite(log_abs)
    assert grad_electrons.shape == x.shape and np.all(np.isfinite(grad_electrons))
    leaves = jax.tree.leaves(grad_params)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_orbital_matrices_build_the_determinants(hf, params, wavefunction):
    """The neural-orbital matrices (for pretraining) and the cusp Jastrow factor, written
    out here independently, give log|psi|; flipping one HF orbital flips exactly its column."""
    system, orb = hf("LiH")
    x = electrons_near(system, 6)
    inputs = ansatz.inputs_from_hartree_fock(orb, CONFIG)
    matrices_fn = jax.jit(ansatz.make_orbital_matrices(CONFIG))
    matrices = np.asarray(matrices_fn(params, x, inputs))
    assert matrices.shape == (CONFIG.n_determinants, 4, 4)
    signs, logs = np.linalg.slogdet(matrices)
    determinants = np.log(np.abs(np.sum(signs * np.exp(logs))))
    beta = np.log1p(np.exp(np.asarray(params["params"]["jastrow"]["beta"])))  # softplus
    jastrow = 0.0
    for i in range(4):
        for j in range(i + 1, 4):
            same = (i < 2) == (j < 2)
            b, c = (beta[0], 0.25) if same else (beta[1], 0.5)
            jastrow -= c * b**2 / (b + np.linalg.norm(x[i] - x[j]))
    assert float(wavefunction(params, x, inputs)[1]) == pytest.approx(determinants + jastrow,
                                                                      abs=1e-10)
    flipped = ansatz.make_inputs(orb.atom_positions, orb.atomic_numbers, orb.up * [1, -1],
                                 orb.down, orb.layout, CONFIG)
    expected = matrices * np.array([1, -1, 1, 1])  # columns: up orbitals 0, 1, down 0, 1
    np.testing.assert_allclose(matrices_fn(params, x, flipped), expected, atol=1e-12)


def test_exponents_positive_even_and_backflows_odd(hf, params):
    _, orb = hf("H2O")
    inputs = ansatz.inputs_from_hartree_fock(orb, CONFIG)
    heads = ansatz.OrbitalHeads(CONFIG)
    head_params = {"params": params["params"]["heads"]}
    elements = jnp.take(params["params"]["elements"]["embedding"], inputs.atomic_numbers, axis=0)
    run = jax.jit(lambda f: heads.apply(head_params, f, inputs.atom_positions, elements))
    alpha, scalars, vectors = run(inputs.features_up)
    alpha_m, scalars_m, vectors_m = run(-inputs.features_up)
    assert alpha.shape == (5, 3, 2, CONFIG.n_determinants) and np.all(alpha > 0)
    np.testing.assert_allclose(alpha_m, alpha, atol=1e-12)
    np.testing.assert_allclose(scalars_m, -scalars, atol=1e-12)
    np.testing.assert_allclose(vectors_m, -vectors, atol=1e-12)
    assert vectors.shape == (5, 3, 2, CONFIG.n_determinants, CONFIG.backflow_vectors, 3)


def test_local_energy_of_h2_folx_matches_hessian(hf, params):
    system, orb = hf("H2")
    fns = ansatz.make_log_psi(CONFIG, ansatz.inputs_from_hartree_fock(orb, CONFIG))
    walkers = [electrons_near(system, seed) for seed in range(3)]
    energies = {}
    for method in ("folx", "hessian"):
        local_energy = jax.jit(hamiltonian.make_local_energy(
            fns.log_psi, system.positions, system.charges, method
        ))
        energies[method] = np.array([local_energy(params, x) for x in walkers])
    assert np.all(np.isfinite(energies["folx"]))
    np.testing.assert_allclose(energies["folx"], energies["hessian"], rtol=1e-6, atol=1e-6)


def test_local_energy_stays_finite_where_electrons_meet(hf, params):
    """Li (2 up, 1 down): as a same-spin and an opposite-spin pair meet, the smooth distance
    features leave the Jastrow factor's exact cusps alone and the local energy has a finite
    limit (features of d itself would add a cusp of their own, diverging like 1/d: a change of
    more than 1e2 Ha between the two distances)."""
    system, orb = hf("Li")
    fns = ansatz.make_log_psi(CONFIG, ansatz.inputs_from_hartree_fock(orb, CONFIG))
    local_energy = jax.jit(hamiltonian.make_local_energy(fns.log_psi, system.positions,
                                                         system.charges, "hessian"))
    base = np.asarray(electrons_near(system, 1))
    direction = np.array([0.48, -0.6, 0.64])
    for partner in (1, 2):  # electron 0 meets 1 (same spin), then 2 (opposite spin)
        energies = []
        for d in (1e-4, 1e-5):
            x = base.copy()
            x[partner] = x[0] + d * direction
            energies.append(float(local_energy(params, jnp.asarray(x))))
        assert abs(energies[1] - energies[0]) < 1e-2, (partner, energies)


def test_initial_parameters_give_a_finite_wavefunction(hf, params, wavefunction):
    system, orb = hf("LiH")
    inputs = ansatz.inputs_from_hartree_fock(orb, CONFIG)
    initial = compiling.jit_once(lambda key: ansatz.init_params(key, CONFIG, inputs))(jax.random.PRNGKey(3))
    assert jax.tree.structure(initial) == jax.tree.structure(params)
    sign, log_abs = wavefunction(initial, electrons_near(system, 7), inputs)
    assert np.isfinite(log_abs) and float(sign) in (-1.0, 1.0)


def test_embedding_tells_same_atom_from_opposite_atom_pairs():
    """H2 nuclei at z = 0 and 1.4 bohr; electron j either on electron i's side or mirrored
    through the midplane to the other side, at the same distance from i. Every distance
    feature summed over atoms is then the same, so only the per-atom messages can tell the
    two apart (the difference that left-right correlation needs)."""
    config = CONFIG
    atoms = jnp.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.4]])
    hydrogen = np.random.default_rng(0).normal(size=config.element_embedding_dim)
    elements = jnp.asarray(np.stack([hydrogen, hydrogen]))  # two identical nuclei
    i = [0.5, 0.0, 0.2]
    same_side = jnp.array([i, [-0.5, 0.0, 0.3]])
    other_side = jnp.array([i, [0.3, 0.4, 1.1]])  # j reflected through z = 0.7, then rotated
    np.testing.assert_allclose(np.linalg.norm(same_side[1] - same_side[0]),
                               np.linalg.norm(other_side[1] - other_side[0]), rtol=1e-14)
    embedding = ansatz.ElectronEmbedding(config)
    variables = embedding.init(jax.random.PRNGKey(0), same_side, atoms, elements, 1)
    h_same, _ = embedding.apply(variables, same_side, atoms, elements, 1)
    h_other, _ = embedding.apply(variables, other_side, atoms, elements, 1)
    # 5e-4 at these initial weights; identical below 1e-12 without the per-atom messages.
    assert float(jnp.max(jnp.abs(h_same[0] - h_other[0]))) > 1e-5


def test_embedding_ignores_far_atoms():
    """An H6 chain (1.8 bohr spacing), then the same chain with four more H atoms and their
    electrons 20 bohr further along: the embedding of the electron at the first atom barely
    changes, since the pooling envelope weighs the new particles by about exp(-10) (unweighted
    pooling, whose atom sum grows with the chain, changes it by about 1.1)."""
    config = CONFIG
    hydrogen = np.random.default_rng(0).normal(size=config.element_embedding_dim)
    near = np.zeros((6, 3))
    near[:, 0] = 1.8 * np.arange(6)
    far = np.zeros((4, 3))
    far[:, 0] = near[-1, 0] + 20.0 + 1.8 * np.arange(4)
    offsets = 0.4 * np.random.default_rng(1).normal(size=(10, 3))

    def first_electron(atoms):
        x = atoms + offsets[: len(atoms)]
        electrons = np.concatenate([x[0::2], x[1::2]])  # spin up at even atoms, first
        args = (jnp.asarray(electrons), jnp.asarray(atoms),
                jnp.asarray(np.tile(hydrogen, (len(atoms), 1))), (len(atoms) + 1) // 2)
        return args

    embedding = ansatz.ElectronEmbedding(config)
    variables = embedding.init(jax.random.PRNGKey(0), *first_electron(near))
    h_short, _ = embedding.apply(variables, *first_electron(near))
    h_long, _ = embedding.apply(variables, *first_electron(np.concatenate([near, far])))
    assert float(jnp.max(jnp.abs(h_long[0] - h_short[0]))) < 1e-4  # 2e-6 observed (float32)


def test_config_rejects_d_slots_and_reference_defaults():
    reference = ansatz.AnsatzConfig()
    assert (reference.embedding_layers, reference.one_electron_width, reference.pair_width,
            reference.n_determinants, reference.gnn_iterations) == (4, 256, 32, 4, 2)
    with pytest.raises(ValueError, match="s and p slots"):
        dataclasses.replace(reference, slots=FeatureSlots((3, 2, 1)))


def test_elements_beyond_the_embedding_are_an_input_error(hf):
    _, orb = hf("H2")
    with pytest.raises(InputError, match="Z = 37"):
        ansatz.make_inputs(orb.atom_positions, [37, 1], orb.up, orb.down, orb.layout, CONFIG)
