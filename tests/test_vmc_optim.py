"""VMC loss and optimisers: the custom-JVP gradient against the explicit estimator, clipping,
non-finite local energies, KFAC and Adam lowering the energy of H2, and the kfac-jax
compatibility layer."""

import functools
import os
import subprocess
import sys
import textwrap
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmc import ansatz, geometries, hamiltonian, kfac_compat, loss, mcmc, optimizers, orbitals, systems, train
from molfoundation.errors import InputError
from molfoundation.settings import apply_settings
from vmc.config import SystemsConfig, preset_config

CLIP_SCALE = 5.0


@functools.lru_cache(maxsize=None)
def h2_orbitals():
    return orbitals.hartree_fock(systems.from_name("H2"))  # 1.4 bohr, STO-6G


def h2_problem(seed: int = 0, method: str = "hessian"):
    """(system, config, inputs, params, log_psi, batched local energy) of H2 with the tiny
    preset's ansatz (what is tested here does not depend on the network's size, and a small
    network compiles fast), in the current default float precision."""
    system = systems.from_name("H2")
    config = preset_config("tiny", SystemsConfig("H2")).ansatz
    inputs = ansatz.inputs_from_hartree_fock(h2_orbitals(), config)
    params = train.init_params(jax.random.PRNGKey(seed), config, inputs.atom_positions.dtype == jnp.float64)
    log_psi = ansatz.make_log_psi(config, inputs).log_psi
    # Jitted: the tests also call it outside a compiled function, where op-by-op execution of
    # the Laplacian would take longer than compiling it.
    local_energy = jax.jit(hamiltonian.make_batched_local_energy(log_psi, system.positions, system.charges, method))
    return system, config, inputs, params, log_psi, local_energy


@pytest.fixture
def float64():
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def kfac_log_psi(config, dtype, walker_stride=1):
    """``fn(params, walkers (W, n_el, 3)) -> (W / walker_stride,)``: the per-walker log|psi|
    KFAC's curvature uses (vmc.geometries.make_kfac_log_psi) for H2 alone, a batch of one
    geometry."""
    geometry = jax.tree_util.tree_map(lambda x: x[None], geometries.geometry_of(h2_orbitals(), config, dtype))
    batched = geometries.make_kfac_log_psi(config, walker_stride)
    return lambda params, walkers: batched(params, geometries.GeometryBatch(walkers[None], geometry))[0]


def start_walkers(system, n_walkers, seed=1):
    return mcmc.init_walkers(jax.random.PRNGKey(seed), system.positions, system.charges,
                             system.n_up, system.n_down, n_walkers, width=0.7)


def explicit_gradient(log_psi, params, walkers, local_energies, clip_scale):
    """2 mean_k (E_clip_k - mean E_clip) grad log|psi(r_k)| over the finite walkers, from
    per-walker gradients (jacrev) and numpy clipping: independent of vmc.loss."""
    e = np.asarray(local_energies)
    finite = np.isfinite(e)
    median = np.median(e[finite])
    mad = np.mean(np.abs(e[finite] - median))
    clipped = np.clip(e, median - clip_scale * mad, median + clip_scale * mad)
    weights = np.where(finite, clipped - clipped[finite].mean(), 0.0)
    per_walker = jax.jit(jax.jacrev(jax.vmap(log_psi, in_axes=(None, 0))))(params, walkers)
    return jax.tree_util.tree_map(
        lambda g: 2.0 * np.tensordot(weights, np.asarray(g), axes=1) / finite.sum(), per_walker
    )


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def with_local_energy_edits(local_energy, edits):
    """The batched local energy with walker k's value replaced (index -> value)."""

    def edited(params, walkers):
        e = local_energy(params, walkers)
        for k, value in edits.items():
            e = e.at[k].set(value)
        return e

    return edited


def test_custom_jvp_gradient_is_the_vmc_estimator(float64):
    system, _, _, params, log_psi, local_energy = h2_problem()
    walkers = start_walkers(system, 16)
    energy_loss = loss.make_energy_loss(log_psi, local_energy, CLIP_SCALE)
    (energy, stats), grads = jax.jit(jax.value_and_grad(energy_loss, has_aux=True))(
        params, walkers
    )
    e_l = np.asarray(local_energy(params, walkers))
    assert energy.dtype == jnp.float64
    np.testing.assert_allclose(energy, e_l.mean(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.variance, e_l.var(), rtol=1e-12)
    assert int(stats.n_nonfinite) == 0
    expected = explicit_gradient(log_psi, params, walkers, e_l, CLIP_SCALE)
    assert_trees_close(grads, expected, atol=1e-8)


def test_outlier_is_clipped_in_gradient_not_in_energy(float64):
    system, _, _, params, log_psi, local_energy = h2_problem()
    walkers = start_walkers(system, 16)
    outlier = with_local_energy_edits(local_energy, {3: 50.0})
    energy_loss = loss.make_energy_loss(log_psi, outlier, CLIP_SCALE)
    (energy, stats), grads = jax.jit(jax.value_and_grad(energy_loss, has_aux=True))(params, walkers)
    e_l = np.asarray(outlier(params, walkers))
    assert e_l[3] == 50.0
    np.testing.assert_allclose(energy, e_l.mean(), rtol=0, atol=1e-12)  # reported: unclipped
    assert float(stats.clipped_fraction) >= 1 / 16
    assert_trees_close(grads, explicit_gradient(log_psi, params, walkers, e_l, CLIP_SCALE), 1e-8)
    # The clipping changes the gradient: without it the outlier dominates.
    unclipped = explicit_gradient(log_psi, params, walkers, e_l, np.inf)
    gaps = [np.max(np.abs(np.asarray(g) - u)) for g, u in zip(
        jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(unclipped))]
    assert max(gaps) > 1e-2


def test_nonfinite_local_energy_is_excluded_and_counted(float64):
    system, _, _, params, log_psi, local_energy = h2_problem()
    walkers = start_walkers(system, 16)
    broken = with_local_energy_edits(local_energy, {5: jnp.nan, 9: jnp.inf})
    energy_loss = loss.make_energy_loss(log_psi, broken, CLIP_SCALE)
    (energy, stats), grads = jax.jit(jax.value_and_grad(energy_loss, has_aux=True))(params, walkers)
    assert int(stats.n_nonfinite) == 2
    assert np.isfinite(float(energy)) and np.isfinite(float(stats.variance))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    # Exactly the loss of the other 14 walkers.
    keep = np.setdiff1d(np.arange(16), [5, 9])
    clean_loss = loss.make_energy_loss(log_psi, local_energy, CLIP_SCALE)
    (clean_energy, clean_stats), clean_grads = jax.jit(jax.value_and_grad(clean_loss, has_aux=True))(
        params, walkers[keep]
    )
    np.testing.assert_allclose(energy, clean_energy, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.variance, clean_stats.variance, rtol=1e-10)
    assert_trees_close(grads, clean_grads, atol=1e-10)


@pytest.mark.parametrize("stride", [1, 4])
def test_per_walker_log_psi_for_kfac_equals_vmap(float64, stride):
    """With a walker stride, the curvature sees walkers 0, stride, 2 stride, ... only."""
    system, config, inputs, params, log_psi, _ = h2_problem()
    walkers = start_walkers(system, 8)
    batched = kfac_log_psi(config, inputs.atom_positions.dtype, stride)
    np.testing.assert_allclose(jax.jit(batched)(params, walkers),
                               jax.jit(jax.vmap(log_psi, in_axes=(None, 0)))(params, walkers[::stride]),
                               rtol=0, atol=1e-12)


def test_walker_stride_must_divide_the_walkers():
    config = preset_config("tiny", SystemsConfig("H2"))
    with pytest.raises(InputError, match="curvature_walker_stride 3 does not divide n_walkers 32"):
        apply_settings(config, ["curvature_walker_stride=3"])
    assert apply_settings(config, ["curvature_walker_stride=4"]).kfac.curvature_walker_stride == 4


def test_schedules():
    lr = optimizers.make_learning_rate_schedule(0.1, 20000.0)
    damping = optimizers.make_damping_schedule(1.0, 2e-3, 5000.0)
    np.testing.assert_allclose(lr(0), 0.1, rtol=1e-6)
    np.testing.assert_allclose(lr(20000), 0.05, rtol=1e-6)
    np.testing.assert_allclose(damping(0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(damping(5000), np.exp(-1.0), rtol=1e-5)
    np.testing.assert_allclose(damping(10**6), 2e-3, rtol=1e-6)


# --- optimisation of H2 -----------------------------------------------------------------------

N_WALKERS = 64
MCMC_STEPS = 10
BLOCK = 8  # iterations per averaging block of the optimisation
# Sweeps that estimate the initial energy: the initial network's local energies spread widely
# (variance about 0.8 Ha^2), and sweeps cost little next to optimisation steps.
INITIAL_BLOCK = 32


def run_vmc(make_optimizer, n_iterations, method, seed=0):
    """Burn-in, then ``n_iterations`` of (optimiser step, MCMC sweep); returns per-iteration
    (energy, variance) and the energy of the initial parameters over a block of sweeps."""
    system, config, inputs, params, log_psi, local_energy = h2_problem(seed, method=method)
    energy_loss = loss.make_energy_loss(log_psi, local_energy, CLIP_SCALE)
    optimizer = make_optimizer(energy_loss, kfac_log_psi(config, inputs.atom_positions.dtype))
    key_walkers, key_burn, key_opt, key_loop = jax.random.split(jax.random.PRNGKey(seed), 4)
    state = mcmc.init_state(log_psi, params, start_walkers(system, N_WALKERS), step_size=0.3)
    mcmc_step = mcmc.make_mcmc_step(log_psi, MCMC_STEPS)
    advance = jax.jit(functools.partial(mcmc.advance, mcmc_step))
    for key in jax.random.split(key_burn, 20):
        state, _ = advance(params, state, key)
    evaluate = jax.jit(energy_loss)
    initial = []
    for key in jax.random.split(key_opt, INITIAL_BLOCK):
        state, _ = advance(params, state, key)
        _, stats = evaluate(params, state.walkers)
        initial.append((float(stats.energy), float(stats.variance)))
    opt_state = optimizer.init(params, key_opt, state.walkers)
    history = []
    for key in jax.random.split(key_loop, n_iterations):
        key_step, key_mcmc = jax.random.split(key)
        params, opt_state, stats = optimizer.step(params, opt_state, key_step, state.walkers)
        assert int(stats["n_nonfinite"]) == 0
        history.append((float(stats["energy"]), float(stats["variance"])))
        state, _ = advance(params, state, key_mcmc)
    return np.array(initial), np.array(history)


# Iterations are 10 Metropolis steps apart; their energies are taken to be correlated over at
# most this many iterations (the walkers themselves are independent chains).
AUTOCORRELATION = 2.0


def block_mean_and_error(block):
    """Mean energy (hartree) of a block of iterations and its standard error: the larger of
    the error from the local-energy variance (N_WALKERS * len(block) / AUTOCORRELATION
    independent samples) and the scatter of the per-iteration means."""
    energies, variances = block[:, 0], block[:, 1]
    from_variance = np.sqrt(variances.mean() * AUTOCORRELATION / (N_WALKERS * len(block)))
    from_scatter = energies.std(ddof=1) / np.sqrt(len(block))
    return energies.mean(), max(from_variance, from_scatter)


# KFAC's step compiles about twice as fast with the Hessian-loop Laplacian; the Adam run keeps
# folx's, so one optimisation goes through the forward Laplacian as well.
@pytest.mark.parametrize("name, method", [("kfac", "hessian"), ("adam", "folx")])
def test_optimizer_lowers_h2_energy(name, method):
    if name == "kfac":
        make = optimizers.make_kfac
    else:
        def make(energy_loss, curvature_log_psi):
            return optimizers.make_adam(energy_loss, optimizers.AdamConfig(1e-2))
    initial, history = run_vmc(make, n_iterations=32, method=method)
    start, start_error = block_mean_and_error(initial)
    end, end_error = block_mean_and_error(history[-BLOCK:])
    margin = 4.0 * np.hypot(start_error, end_error)
    print(f"{name}: {start:.4f} +- {start_error:.4f} -> {end:.4f} +- {end_error:.4f} Ha")
    assert end < start - margin
    assert end > -1.2  # no estimate below the exact -1.1745 Ha by more than noise


def masked_pair_problem():
    """A toy log|psi| with a dense layer over (electron, electron) pairs whose output is masked
    out entirely, as the (atom, atom) pair layers of the ansatz are for a single atom, and a
    dense layer over electrons that reaches log|psi|."""

    def log_psi(params, r):  # r: (n_electrons, 3) bohr
        pairs = r[:, None, :] - r[None, :, :]
        no_pairs = jnp.zeros(pairs.shape[:2] + (1,))
        masked = jnp.sum(no_pairs * jnp.tanh(pairs @ params["pair"]))
        return -jnp.sum(jnp.abs(r @ params["orbital"])) + masked

    def local_energy(params, walkers):
        return jnp.sum(walkers**2, axis=(1, 2)) - jax.vmap(log_psi, (None, 0))(params, walkers)

    params = {"pair": jnp.full((3, 4), 0.3), "orbital": jnp.eye(3)[:, :2]}
    energy_loss = loss.make_energy_loss(log_psi, local_energy, CLIP_SCALE)
    walkers = jax.random.normal(jax.random.PRNGKey(0), (16, 3, 3))
    return energy_loss, jax.vmap(log_psi, (None, 0)), params, walkers


def test_every_dense_layer_is_one_kfac_layer_with_its_bias(float64):
    """kfac-jax's graph matcher, run on the per-walker log|psi| KFAC uses, finds each of the
    network's dense layers with its kernel and bias together in one layer (one curvature
    block), not a bias alone."""
    system, config, _, params, _, _ = h2_problem()
    walkers = start_walkers(system, 8)
    log_psi = kfac_log_psi(config, jnp.float64)
    kfac = kfac_compat.load()

    def loss_fn(p, w):
        out = log_psi(p, w)
        kfac.register_normal_predictive_distribution(out[:, None])
        return jnp.mean(out)

    closed = jax.make_jaxpr(kfac.tag_graph_matcher.auto_register_tags(loss_fn, (params, walkers)))(params, walkers)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    leaf_of = {var: i for i, var in enumerate(closed.jaxpr.invars[:len(paths)])}
    layers = []
    for eqn in closed.jaxpr.eqns:
        if eqn.primitive.name == "layer_tag":
            meta = eqn.params["meta"]
            layers.append(sorted(paths[leaf_of[eqn.invars[i]]] for i in meta.params_index))
    biases = [p for p in paths if p.endswith("['bias']")]
    assert biases
    for bias in biases:
        kernel = bias.replace("['bias']", "['kernel']")
        assert sorted([bias, kernel]) in layers, bias
    assert not any(len(layer) == 1 and layer[0].endswith("['bias']") for layer in layers)


def test_kfac_step_is_finite_when_a_pair_layer_is_masked_out(float64):
    """The project's curvature block for such a layer keeps the update finite and leaves the
    masked layer's weights unchanged (kfac-jax's own block divides by the number of pairs
    reaching the loss, zero here, and makes the whole update NaN)."""
    energy_loss, batched_log_psi, params, walkers = masked_pair_problem()
    before = jax.tree_util.tree_map(np.array, params)  # kfac-jax donates params
    optimizer = optimizers.make_kfac(energy_loss, batched_log_psi, optimizers.KFACConfig(damping=1e-3))
    state = optimizer.init(params, jax.random.PRNGKey(1), walkers)
    new_params, _, stats = optimizer.step(params, state, jax.random.PRNGKey(2), walkers)
    assert float(stats["update_norm"]) > 0
    np.testing.assert_array_equal(new_params["pair"], before["pair"])
    assert np.all(np.isfinite(new_params["orbital"]))
    assert np.max(np.abs(new_params["orbital"] - before["orbital"])) > 0


def test_kfac_curvature_comes_from_the_curvature_log_psi(float64):
    """Registering 2 log|psi| for the curvature multiplies the Fisher matrix by 4, so with
    negligible damping and no norm constraint the first update is a quarter of the one with
    log|psi| itself (same sampled targets): the curvature is the given function's, while the
    gradient stays the loss's."""
    energy_loss, batched_log_psi, params, walkers = masked_pair_problem()
    config = optimizers.KFACConfig(damping=1e-8, min_damping=1e-8, norm_constraint=1e8)
    updates = []
    for scale in (1.0, 2.0):
        optimizer = optimizers.make_kfac(
            energy_loss, lambda p, w, s=scale: s * batched_log_psi(p, w), config)
        start = jax.tree_util.tree_map(jnp.array, params)  # kfac-jax donates params
        state = optimizer.init(start, jax.random.PRNGKey(1), walkers)
        new_params, _, _ = optimizer.step(start, state, jax.random.PRNGKey(2), walkers)
        updates.append(np.asarray(new_params["orbital"]) - np.asarray(params["orbital"]))
    assert np.max(np.abs(updates[0])) > 1e-3
    np.testing.assert_allclose(updates[1], updates[0] / 4, rtol=1e-4, atol=1e-12)


# --- kfac-jax compatibility layer -------------------------------------------------------------


def test_ensure_compatible_is_idempotent_and_needed_only_on_new_jax():
    kfac_compat.ensure_compatible()
    from kfac_jax._src import tag_graph_matcher
    from kfac_jax._src.utils import parallel

    assert kfac_compat.ensure_compatible() == []  # a second call never changes anything
    assert kfac_compat.missing_jax_core_names() == []
    if jax.__version_info__ >= (0, 11):  # restored: the same objects as JAX's public ones
        for name in kfac_compat.JAX_CORE_NAMES:
            assert getattr(jax.core, name) is getattr(jax.extend.core, name)
    needs_bind = not kfac_compat.get_bind_params_returns_pair()
    needs_replicate = not kfac_compat.has_device_put_replicated()
    assert kfac_compat.is_patched(tag_graph_matcher.eval_jaxpr_eqn) == needs_bind
    assert kfac_compat.is_patched(parallel.replicate_all_local_devices) == needs_replicate
    if jax.__version__ == "0.9.1":
        assert not needs_bind and not needs_replicate
    elif jax.__version_info__ >= (0, 11):  # the GPU image's 0.11.2 and the newest, 0.12
        assert needs_bind and needs_replicate


def test_kfac_step_is_the_same_program_every_time_it_is_traced(float64, tmp_path):
    """Traced anew (new jaxpr variables, other ids), the KFAC step is the same program, so
    JAX's persistent compilation cache finds a step that another process compiled (change 5
    of vmc.kfac_compat; without it the layer-tag inputs come in the order of their ids).
    The program is the text JAX hands to the compiler, which it writes out under
    ``jax_dump_ir_to``."""
    kfac_compat.load()
    from kfac_jax._src import tracer

    assert tracer.set is kfac_compat.FirstSeenSet
    assert list(kfac_compat.FirstSeenSet([3, 1, 2, 1])) == [3, 1, 2]
    texts = []
    for attempt in range(3):
        energy_loss, batched_log_psi, params, walkers = masked_pair_problem()
        optimizer = optimizers.make_kfac(energy_loss, batched_log_psi)
        state = optimizer.init(params, jax.random.PRNGKey(1), walkers)
        dump = tmp_path / str(attempt)
        jax.config.update("jax_dump_ir_to", str(dump))
        try:
            optimizer.step(params, state, jax.random.PRNGKey(2), walkers)
        finally:
            jax.config.update("jax_dump_ir_to", "")
        programs = [p for p in os.listdir(dump) if p.endswith("jit__step_compile.mlir")]
        assert len(programs) == 1, os.listdir(dump)
        texts.append((dump / programs[0]).read_text())
    assert texts[0] == texts[1] == texts[2]


def test_split_bind_params_accepts_both_forms():
    params = {"axes": (0,)}
    assert kfac_compat.split_bind_params(params) == ([], params)
    assert kfac_compat.split_bind_params(([], params)) == ([], params)
    subfun = object()
    assert kfac_compat.split_bind_params(([subfun], params)) == ([subfun], params)


def _eval_equation_by_equation(jaxpr, args, eval_eqn):
    env = {}
    read = lambda v: v.val if isinstance(v, jax.extend.core.Literal) else env[v]  # noqa: E731
    for var, value in zip(jaxpr.jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.jaxpr.eqns:
        for var, value in zip(eqn.outvars, eval_eqn(eqn, [read(v) for v in eqn.invars])):
            env[var] = value
    return [read(v) for v in jaxpr.jaxpr.outvars]


def test_eval_jaxpr_eqn_matches_jax_with_both_bind_param_forms():
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvp(lambda p, t: (f(p[0]), jnp.cos(p[0]) * t[0]))

    def g(x, w):
        return jnp.sum(jax.jit(lambda y: jnp.tanh(y @ w))(x) * f(x[:, :2]))

    x = jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)
    w = jnp.eye(2) * 0.5
    jaxpr = jax.make_jaxpr(g)(x, w)
    expected = g(x, w)
    (direct,) = _eval_equation_by_equation(jaxpr, [x, w], kfac_compat.eval_jaxpr_eqn)
    np.testing.assert_allclose(direct, expected, rtol=1e-6)

    # JAX >= 0.9.2 returns the params alone: emulate that on every primitive.
    def new_style(eqn, in_values):
        subfuns, params = kfac_compat.split_bind_params(eqn.primitive.get_bind_params(eqn.params))
        primitive = types.SimpleNamespace(
            get_bind_params=lambda p: params if not subfuns else (subfuns, params),
            bind=eqn.primitive.bind,
        )
        fake = types.SimpleNamespace(primitive=primitive, params=eqn.params,
                                     source_info=eqn.source_info)
        return kfac_compat.eval_jaxpr_eqn(fake, in_values)

    (emulated,) = _eval_equation_by_equation(jaxpr, [x, w], new_style)
    np.testing.assert_allclose(emulated, expected, rtol=1e-6)


@pytest.mark.parametrize("shmap_pmap", [True, False])
def test_device_put_replicated_matches_jax_on_one_device(shmap_pmap):
    """Both shardings (pmap on shard_map, the JAX 0.9 default; legacy pmap, which kfac-jax
    switches on at import) against JAX's own function, where it exists."""
    flag = "jax_pmap_shmap_merge"
    if flag not in jax.config.values:
        pytest.skip(f"this JAX has no {flag}")
    previous = getattr(jax.config, flag)
    devices = jax.local_devices()[:1]
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.int32(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        jax.config.update(flag, shmap_pmap)
        try:
            ours = kfac_compat.device_put_replicated(tree, devices)
            theirs = None
            if kfac_compat.has_device_put_replicated():
                theirs = jax.device_put_replicated(tree, devices)
        finally:
            jax.config.update(flag, previous)
    assert ours["a"].shape == (1, 2, 3) and ours["b"].shape == (1,)
    if theirs is not None:
        for x, y in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
            assert x.shape == y.shape and x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
            assert type(x.sharding) is type(y.sharding)
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim)
    with pytest.raises(ValueError):
        kfac_compat.device_put_replicated(tree, [])


TWO_DEVICE_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from vmc import kfac_compat
    kfac_jax = kfac_compat.load()
    from kfac_jax._src.utils import parallel

    devices = jax.local_devices()
    assert len(devices) == 2, devices
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "k": jnp.zeros((), jnp.uint32)}
    original = parallel.replicate_all_local_devices
    installed = kfac_compat.ensure_compatible(force=True)
    assert len(installed) == 2, installed
    assert kfac_compat.ensure_compatible(force=True) == []
    for ours, theirs in [
        (kfac_compat.device_put_replicated(tree, devices),
         jax.device_put_replicated(tree, devices)),
        (parallel.replicate_all_local_devices(tree), original(tree)),
        (parallel.replicate_all_local_devices(tree, "kfac_axis"), original(tree, "kfac_axis")),
    ]:
        for x, y in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
            assert x.shape == y.shape == (2,) + x.shape[1:] and x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)
            assert [s.device for s in x.addressable_shards] == devices

    # A KFAC step through the installed replacements, on both devices (pmap path).
    def loss(params, batch):
        x, y = batch
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        out = h @ params["w2"]
        kfac_jax.register_squared_error_loss(out, y)
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1))

    key = jax.random.PRNGKey(0)
    params = {"w1": jax.random.normal(key, (3, 4)) * 0.5, "b1": jnp.zeros(4),
              "w2": jax.random.normal(key, (4, 2)) * 0.5}
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 3))
    batch = (x, jnp.sin(x[..., :2]))
    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss), l2_reg=0.0,
        learning_rate_schedule=lambda t: 0.1 * jnp.ones([]),
        momentum_schedule=lambda t: jnp.zeros([]),
        damping_schedule=lambda t: 0.1 * jnp.ones([]),
        num_burnin_steps=0, multi_device=True)
    replicated = parallel.replicate_all_local_devices(params)
    keys = jax.random.split(key, 2)
    state = opt.init(replicated, keys, batch)
    losses = []
    for i in range(3):
        replicated, state, stats = opt.step(replicated, state, keys, batch=batch)
        losses.append(float(stats["loss"][0]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    print("ok", installed, losses)
    """
)


def test_replacements_on_two_devices_and_kfac_multi_device_step():
    """In a fresh process with two forced CPU devices: the replacement equals JAX's own
    ``device_put_replicated`` and kfac-jax's original replication (values, shape, sharding),
    and kfac-jax's pmap path runs KFAC steps with the replacements installed."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    env["JAX_PLATFORMS"] = "cpu"
    if not kfac_compat.has_device_put_replicated():
        pytest.skip("this JAX has no device_put_replicated to compare with")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", TWO_DEVICE_SCRIPT], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout
