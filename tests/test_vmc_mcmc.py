"""Metropolis-Hastings sampling: hydrogen moments, step-size adaptation, NaN safety, start, and
the VMC energy of a known wavefunction."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmc import mcmc

NUCLEUS = np.array([[0.5, -0.3, 0.2]])
N_WALKERS = 1000
STEPS_PER_SWEEP = 10


def hydrogen_1s(params, electrons):
    """log|psi| of the hydrogen ground state exp(-|r - R|); |psi|^2 ~ r^2 exp(-2r) radially."""
    return -jnp.linalg.norm(electrons[0] - NUCLEUS[0])


@pytest.fixture(scope="module")
def hydrogen_run():
    """Burn-in with adaptation, then 40 sweeps at the adapted, fixed step size."""
    step = mcmc.make_mcmc_step(hydrogen_1s, STEPS_PER_SWEEP)
    key_init, key_burn, key_sample = jax.random.split(jax.random.PRNGKey(0), 3)
    walkers = mcmc.init_walkers(key_init, NUCLEUS, [1.0], 1, 0, N_WALKERS)
    # Deliberately poor start (0.05 bohr): adaptation has to grow it about 16-fold.
    state = mcmc.init_state(hydrogen_1s, None, walkers, step_size=0.05)
    burn_in = jax.jit(functools.partial(mcmc.burn_in, step), static_argnames="n_sweeps")
    state, burn_in_acceptance = burn_in(None, state, key_burn, n_sweeps=100)

    @jax.jit
    def sample(state, key):
        def sweep(carry, key):
            walkers, values = carry
            walkers, values, acceptance = step(None, walkers, values, key, state.step_size)
            r = jnp.linalg.norm(walkers[:, 0] - NUCLEUS[0], axis=-1)
            return (walkers, values), (r, acceptance)

        keys = jax.random.split(key, 40)
        (walkers, values), (r, acceptance) = jax.lax.scan(
            sweep, (state.walkers, state.log_psi), keys
        )
        return walkers, values, r, acceptance

    walkers, values, r, acceptance = sample(state, key_sample)
    return state, burn_in_acceptance, walkers, values, np.asarray(r), acceptance


@pytest.mark.parametrize("power, exact", [(1, 1.5), (2, 3.0)])
def test_hydrogen_moments(hydrogen_run, power, exact):
    # <r^n> = (n + 2)! / (2^(n + 1)) for |psi|^2 ~ exp(-2r): 1.5 bohr and 3 bohr^2.
    r = hydrogen_run[4]
    # The walkers are independent chains, so the spread of their time averages gives an honest
    # standard error despite the correlation along each chain (about 0.5 % for <r> and 1 % for
    # <r^2> here). The test demands a precise estimate (error below 2 %) and agreement within
    # 4 standard errors: a correct sampler fails that with probability ~1e-4, while a wrong
    # acceptance rule (e.g. |psi| instead of |psi|^2, which doubles <r>) fails it by far.
    per_walker = np.mean(r**power, axis=0)
    mean = per_walker.mean()
    standard_error = per_walker.std(ddof=1) / np.sqrt(len(per_walker))
    assert standard_error < 0.02 * exact
    assert abs(mean - exact) < 4 * standard_error, (mean, standard_error)


def test_acceptance_is_adapted_to_one_half(hydrogen_run):
    state, burn_in_acceptance, _, _, _, acceptance = hydrogen_run
    assert float(state.step_size) > 0.3  # grew from the 0.05 bohr start
    # 10,000 proposals per sweep: the binomial noise is 0.005; a 5 % change of step size moves
    # the acceptance by about 0.01. 0.05 leaves room for both and still fails a stuck adapter.
    assert abs(float(np.mean(burn_in_acceptance[-20:])) - 0.5) < 0.05
    assert abs(float(np.mean(acceptance)) - 0.5) < 0.05


def test_cached_log_psi_matches_walkers(hydrogen_run):
    _, _, walkers, values, _, _ = hydrogen_run
    # The cached values come out of the compiled MCMC step, which may fuse the distance
    # differently: float32 rounding of coordinates of a few bohr (seen: up to 4.8e-7). A stale
    # cache (log|psi| of earlier positions) would be off by about a step, tenths of a bohr.
    np.testing.assert_allclose(values, jax.vmap(hydrogen_1s, in_axes=(None, 0))(None, walkers), rtol=0, atol=2e-6)


# --- step-size adaptation ---------------------------------------------------------------------


def test_adapt_step_size_direction_and_clamp():
    assert float(mcmc.adapt_step_size(0.2, 0.7)) == pytest.approx(0.2 * 1.05)
    assert float(mcmc.adapt_step_size(0.2, 0.3)) == pytest.approx(0.2 / 1.05)
    assert float(mcmc.adapt_step_size(mcmc.MAX_STEP_SIZE, 1.0)) == pytest.approx(mcmc.MAX_STEP_SIZE)
    assert float(mcmc.adapt_step_size(mcmc.MIN_STEP_SIZE, 0.0)) == pytest.approx(mcmc.MIN_STEP_SIZE)
    adapted = jax.jit(mcmc.adapt_step_size)(jnp.array([0.1, 0.1]), jnp.array([0.9, 0.1]))
    np.testing.assert_allclose(adapted, [0.105, 0.1 / 1.05], rtol=1e-6)


def test_state_is_immutable_pytree():
    state = mcmc.MCMCState(walkers=jnp.zeros((2, 1, 3)), log_psi=jnp.zeros(2), step_size=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.step_size = 0.2
    assert len(jax.tree_util.tree_leaves(state)) == 3


# --- NaN safety -------------------------------------------------------------------------------


def partly_broken(params, electrons):
    """Hydrogen 1s, but NaN for z > 0.5 and +inf for x > 1 (an overflow a naive Metropolis
    rule would accept with certainty)."""
    x = electrons[0]
    value = -jnp.linalg.norm(x)
    value = jnp.where(x[0] > 1.0, jnp.inf, value)
    return jnp.where(x[2] > 0.5, jnp.nan, value)


@pytest.fixture(scope="module")
def broken_step():
    return jax.jit(mcmc.make_mcmc_step(partly_broken, n_steps=50))


def test_non_finite_proposals_are_never_accepted(broken_step):
    key_init, key_run = jax.random.split(jax.random.PRNGKey(1))
    walkers = jnp.clip(0.3 * jax.random.normal(key_init, (64, 1, 3)), -1.0, 0.4)
    values = jax.vmap(partly_broken, in_axes=(None, 0))(None, walkers)
    assert np.all(np.isfinite(values))
    total_acceptance = 0.0
    for key in jax.random.split(key_run, 4):
        # 1 bohr steps: a good share of proposals lands in the broken regions.
        walkers, values, acceptance = broken_step(None, walkers, values, key, 1.0)
        total_acceptance += float(acceptance)
    assert total_acceptance > 0.4  # the walkers did move
    assert np.all(np.isfinite(walkers)) and np.all(np.isfinite(values))
    assert float(jnp.max(walkers[..., 2])) <= 0.5
    assert float(jnp.max(walkers[..., 0])) <= 1.0


def test_walkers_with_non_finite_start_recover(broken_step):
    # Started inside the NaN region, every walker takes the first finite proposal.
    walkers = jnp.tile(jnp.array([[[0.0, 0.0, 2.0]]]), (64, 1, 1))
    values = jax.vmap(partly_broken, in_axes=(None, 0))(None, walkers)
    assert np.all(np.isnan(values))
    for key in jax.random.split(jax.random.PRNGKey(2), 6):
        walkers, values, _ = broken_step(None, walkers, values, key, 1.0)
    assert np.all(np.isfinite(values))
    assert np.all(np.isfinite(walkers))


# --- starting walkers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "charges, n_up, n_down, up_atoms, down_atoms",
    [
        ([8, 1, 1], 5, 5, [0, 0, 0, 0, 1], [0, 0, 0, 0, 2]),  # water: H spins opposite
        ([8, 8], 9, 7, [0] * 5 + [1] * 4, [0] * 3 + [1] * 4),  # triplet O2
        ([3], 2, 1, [0, 0], [0]),  # lithium atom
        ([8, 1, 1], 5, 4, [0, 0, 0, 0, 2], [0, 0, 0, 1]),  # water cation
        ([1], 1, 0, [0], []),  # hydrogen atom
    ],
)
def test_assign_electrons(charges, n_up, n_down, up_atoms, down_atoms):
    up, down = mcmc.assign_electrons(np.array(charges, float), n_up, n_down)
    np.testing.assert_array_equal(up, up_atoms)
    np.testing.assert_array_equal(down, down_atoms)


def test_init_walkers_sit_on_their_atoms():
    atoms = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    key = jax.random.PRNGKey(3)
    walkers = mcmc.init_walkers(key, atoms, [8.0, 1.0, 1.0], 5, 5, n_walkers=7, width=0.1)
    assert walkers.shape == (7, 10, 3) and walkers.dtype == jnp.float32
    nearest = np.argmin(
        np.linalg.norm(np.asarray(walkers)[:, :, None] - atoms[None, None], axis=-1), axis=-1
    )
    np.testing.assert_array_equal(nearest, np.tile([0, 0, 0, 0, 1, 0, 0, 0, 0, 2], (7, 1)))
    again = mcmc.init_walkers(key, atoms, [8.0, 1.0, 1.0], 5, 5, n_walkers=7, width=0.1)
    np.testing.assert_array_equal(walkers, again)
    other = mcmc.init_walkers(jax.random.PRNGKey(4), atoms, [8.0, 1.0, 1.0], 5, 5, 7, 0.1)
    assert not np.allclose(walkers, other)


def test_vmc_energy_of_the_hartree_fock_determinant_is_the_hartree_fock_energy():
    """<psi_HF|H|psi_HF> of H2 (STO-6G, 1.4 bohr) sampled by this MCMC with this local energy
    equals pyscf's RHF energy, from both sides within 4 standard errors, and the error bar is
    small enough (below 2 mHa) that a wrong kinetic or potential term would show: dropping the
    electron repulsion alone moves the energy by about 0.67 Ha."""
    from vmc import hamiltonian, orbitals, systems
    from vmc.evaluate import blocking_error

    with jax.enable_x64(True):
        h2 = systems.from_name("H2")
        hf = orbitals.hartree_fock(h2, localization=None)
        values = orbitals.make_orbital_values(hf)

        def log_psi(params, electrons):  # one spin-up and one spin-down electron in the bonding orbital
            up, down = values(electrons)
            return jnp.log(jnp.abs(up[0, 0])) + jnp.log(jnp.abs(down[1, 0]))

        local_energy = jax.vmap(hamiltonian.make_local_energy(log_psi, jnp.asarray(h2.positions),
                                                              jnp.asarray(h2.charges, jnp.float64), method="hessian"),
                                in_axes=(None, 0))
        step = mcmc.make_mcmc_step(log_psi, STEPS_PER_SWEEP)
        key_init, key_burn, key_sample = jax.random.split(jax.random.PRNGKey(5), 3)
        walkers = mcmc.init_walkers(key_init, jnp.asarray(h2.positions), h2.charges, 1, 1, 2000)
        state = mcmc.init_state(log_psi, None, walkers, step_size=0.3)
        state, _ = jax.jit(functools.partial(mcmc.burn_in, step), static_argnames="n_sweeps")(
            None, state, key_burn, n_sweeps=50)

        @jax.jit
        def sample(state, key):
            def sweep(state, key):
                walkers, values_, _ = step(None, state.walkers, state.log_psi, key, state.step_size)
                state = dataclasses.replace(state, walkers=walkers, log_psi=values_)
                return state, jnp.mean(local_energy(None, walkers))

            return jax.lax.scan(sweep, state, jax.random.split(key, 200))[1]

        energies = np.asarray(sample(state, key_sample))
    energy, error = energies.mean(), blocking_error(energies)
    assert error < 2e-3, error  # observed: 1.2 mHa
    assert abs(energy - hf.energy) < 4 * error, (energy, error, hf.energy)
