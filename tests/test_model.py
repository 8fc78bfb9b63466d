"""PhiSNet model: exact symmetries checked by transforming inputs, not assumed.

Rotations use the AO rotation D(R) of ``molfoundation.basis`` (itself tested against pyscf):
F(R x) must equal D F(x) D^T. In float64 the only error is round-off (~1e-15; we allow 1e-10);
float32 round-off through a few layers allows ~1e-5 relative.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_rotation, start_geometry
from molfoundation import molecules
from molfoundation.basis import AOLayout, ao_permutation, ao_rotation
from molfoundation.errors import InputError
from phisnet_jax.model import PhiSNetConfig, make_inputs, make_phisnet

# Small configurations: 6-31G (s, p shells -> order 2) and def2-SVP (d shells -> order 4).
SMALL = {
    "6-31g": PhiSNetConfig(basis="6-31g", features=8, max_order=2, num_modules=2, num_radial=16,
                           overlap_features=4),
    "def2-svp": PhiSNetConfig(basis="def2-svp", features=4, max_order=4, num_modules=1,
                              num_radial=8, overlap_features=4),
}


def to_dtype(inputs, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype) if np.asarray(a).dtype == np.float64 else jnp.asarray(a), inputs)


@functools.lru_cache(maxsize=None)
def compiled(config_name, dtype_name):
    """(params, jitted apply) of a small model, shared by all tests of this file."""
    cfg = SMALL[config_name]
    net = make_phisnet(cfg)
    dtype = jnp.dtype(dtype_name)
    m = start_geometry("water")
    example = to_dtype(make_inputs(cfg, m.atomic_numbers, m.positions), dtype)
    # Random parameters drawn here rather than by the model's initialisers (compiling those
    # takes longer than the model itself): weights of scale 1/sqrt(fan-in), vectors and
    # scalars (gates, offsets, self-mixing) near one and all non-zero, so that every path
    # contributes to the output and the test is sensitive to it.
    rng = np.random.default_rng(0)

    def draw(shape):
        if len(shape.shape) >= 2:
            return rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape.shape[:-1])), shape.shape)
        return 1.0 + 0.2 * rng.normal(size=shape.shape)

    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), example)
    params = jax.tree.map(lambda s: jnp.asarray(draw(s), s.dtype), shapes)
    return cfg, params, jax.jit(net.apply)


def predict(config_name, molecule, dtype_name="float64", n_atoms=None, n_ao=None):
    cfg, params, apply = compiled(config_name, dtype_name)
    inputs = to_dtype(make_inputs(cfg, molecule.atomic_numbers, molecule.positions, n_atoms, n_ao), jnp.dtype(dtype_name))
    out = apply(params, inputs)
    return np.asarray(out["fock"], np.float64), np.asarray(out["overlap"], np.float64)


@pytest.fixture(scope="module", autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def layout_of(molecule, basis_name):
    return AOLayout.from_mole(molecules.to_pyscf(molecule, basis_name))


@pytest.mark.parametrize("config_name, name", [("6-31g", "ethanol"), ("def2-svp", "water")])
def test_rotation_equivariance_float64(config_name, name):
    m = start_geometry(name)
    F, S = predict(config_name, m)
    assert np.abs(F).max() > 1e-2  # a non-trivial prediction
    for seed in range(2):
        R = random_rotation(seed)
        F_rot, S_rot = predict(config_name, m.with_positions(m.positions @ R.T))
        D = ao_rotation(layout_of(m, SMALL[config_name].basis), R)
        np.testing.assert_allclose(D @ F @ D.T, F_rot, atol=1e-10)
        np.testing.assert_allclose(D @ S @ D.T, S_rot, atol=1e-10)


def test_rotation_equivariance_float32():
    m = start_geometry("ethanol")
    F, S = predict("6-31g", m, "float32")
    R = random_rotation(5)
    F_rot, S_rot = predict("6-31g", m.with_positions(m.positions @ R.T), "float32")
    D = ao_rotation(layout_of(m, "6-31g"), R)
    assert np.abs(D @ F @ D.T - F_rot).max() < 1e-5 * np.abs(F).max()
    assert np.abs(D @ S @ D.T - S_rot).max() < 1e-5


def test_permutation_and_translation():
    m = start_geometry("ethanol")
    F, S = predict("6-31g", m)
    order = np.array([0, 1, 2, 5, 3, 4, 8, 6, 7])  # permutes hydrogens among themselves
    assert (m.atomic_numbers[order] == m.atomic_numbers).all()
    idx = ao_permutation(layout_of(m, "6-31g"), order)
    F_perm, S_perm = predict("6-31g", molecules.Molecule(m.atomic_numbers[order], m.positions[order]))
    np.testing.assert_allclose(F[np.ix_(idx, idx)], F_perm, atol=1e-10)
    np.testing.assert_allclose(S[np.ix_(idx, idx)], S_perm, atol=1e-10)
    F_shift, S_shift = predict("6-31g", m.with_positions(m.positions + np.array([3.0, -7.0, 11.0])))
    np.testing.assert_allclose(F, F_shift, atol=1e-10)
    np.testing.assert_allclose(S, S_shift, atol=1e-10)


def test_symmetric_with_exact_onsite_overlap():
    m = start_geometry("ethanol")
    F, S = predict("6-31g", m)
    np.testing.assert_array_equal(F, F.T)
    np.testing.assert_array_equal(S, S.T)
    np.testing.assert_array_equal(np.diag(S), 1.0)
    exact = molecules.to_pyscf(m, "6-31g").intor("int1e_ovlp")
    layout = layout_of(m, "6-31g")
    for sl in layout.atom_ao_slices:
        np.testing.assert_allclose(S[sl, sl], exact[sl, sl], atol=1e-14)


def test_padding_does_not_change_the_prediction():
    m = start_geometry("water")
    F, S = predict("6-31g", m)
    F_pad, S_pad = predict("6-31g", m, n_atoms=6, n_ao=20)
    n = F.shape[0]
    np.testing.assert_allclose(F_pad[:n, :n], F, atol=1e-12)
    np.testing.assert_allclose(S_pad[:n, :n], S, atol=1e-12)
    assert np.all(F_pad[n:] == 0) and np.all(S_pad[:, n:] == 0)


def test_position_gradients_are_finite():
    cfg, params, apply = compiled("6-31g", "float64")
    m = start_geometry("water")
    inputs = to_dtype(make_inputs(cfg, m.atomic_numbers, m.positions, n_atoms=4, n_ao=16), jnp.float64)

    def total(pos):
        out = apply(params, inputs.__class__(**{**inputs.__dict__, "positions": pos}))
        return jnp.sum(out["fock"] ** 2) + jnp.sum(out["overlap"] ** 2)

    grad = jax.grad(total)(inputs.positions)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.abs(np.asarray(grad)[:3]).max() > 0


def test_unknown_element_and_unsuitable_basis():
    cfg = SMALL["6-31g"]
    with pytest.raises(InputError, match="not atomic number"):
        make_inputs(cfg, np.array([8, 1, 17]), np.zeros((3, 3)))
    with pytest.raises(InputError, match="too low"):
        make_phisnet(PhiSNetConfig(basis="def2-svp", max_order=2))
