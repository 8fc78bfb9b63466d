"""Metropolis-Hastings sampling of |psi|^2 with all-electron Gaussian moves.

Every walker is one configuration ``(n_electrons, 3)`` bohr; a batch of walkers has shape
``(n_walkers, n_electrons, 3)``. A move displaces all electrons of a walker at once by
independent Gaussians of width ``step_size`` (bohr); the proposal is symmetric, so it is
accepted with probability min(1, |psi(r')|^2 / |psi(r)|^2). The step size is adapted between
calls towards 50 % acceptance by a fixed factor of 1.05, as in the transferable-wavefunction
reference recipe.

A wavefunction is ``log_psi(params, electrons) -> log|psi|`` for one configuration. The values
of log|psi| of the current walkers are carried along, so each Metropolis step costs exactly
one wavefunction evaluation per walker.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Params = Any
LogPsi = Callable[[Params, jax.Array], jax.Array]
# fn(params, walkers, log_psi_values, key, step_size) -> (walkers, log_psi_values, acceptance)
MCMCStep = Callable[
    [Params, jax.Array, jax.Array, jax.Array, jax.Array],
    tuple[jax.Array, jax.Array, jax.Array],
]

TARGET_ACCEPTANCE = 0.5
ADAPTATION_FACTOR = 1.05
# Bounds of the adapted step size (bohr). Below the lower bound the chain hardly moves (the
# acceptance of a core electron around a heavy nucleus is already near one there); above the
# upper bound a move jumps across any molecule in this project, so larger steps only waste
# proposals. The bounds stop a run-away in either direction, e.g. while |psi| is still flat or
# while a broken wavefunction rejects everything.
MIN_STEP_SIZE = 1e-3
MAX_STEP_SIZE = 10.0


@flax.struct.dataclass
class MCMCState:
    """The sampler's state; immutable and a pytree, so it passes through ``jit`` and ``scan``.

    Attributes:
        walkers: (n_walkers, n_electrons, 3) bohr.
        log_psi: (n_walkers,) log|psi| of the walkers under the parameters they were last
            evaluated with.
        step_size: scalar, bohr; the width of the Gaussian proposal per coordinate.
    """

    walkers: jax.Array
    log_psi: jax.Array
    step_size: jax.Array


def init_state(
    log_psi: LogPsi, params: Params, walkers: jax.Array, step_size: float = 0.1
) -> MCMCState:
    """Evaluate log|psi| on ``walkers: (n_walkers, n_electrons, 3)`` bohr and pack the state."""
    values = jax.vmap(log_psi, in_axes=(None, 0))(params, walkers)
    return MCMCState(
        walkers=walkers, log_psi=values, step_size=jnp.asarray(step_size, walkers.dtype)
    )


def make_mcmc_step(log_psi: LogPsi, n_steps: int) -> MCMCStep:
    """``n_steps`` Metropolis-Hastings steps, all electrons moved at once.

    Returns:
        ``fn(params, walkers, log_psi_values, key, step_size) -> (walkers, log_psi_values,
        acceptance_rate)`` with walkers (n_walkers, n_electrons, 3) bohr, log_psi_values
        (n_walkers,), step_size a scalar (bohr) and acceptance_rate the fraction of accepted
        proposals over all walkers and steps (scalar). jit-able; ``n_steps`` is fixed.

    A proposal whose log|psi| is not finite (NaN or +-inf) is always rejected, so NaN produced
    by the wavefunction somewhere in space never enters the walkers. A walker whose own cached
    value is not finite accepts any finite proposal, so a bad starting point is left quickly.
    """
    batched_log_psi = jax.vmap(log_psi, in_axes=(None, 0))

    def mcmc_step(params, walkers, log_psi_values, key, step_size):
        n_walkers = walkers.shape[0]

        def one_step(carry, step_key):
            walkers, values, n_accepted = carry
            key_move, key_accept = jax.random.split(step_key)
            noise = jax.random.normal(key_move, walkers.shape, walkers.dtype)
            proposal = walkers + step_size * noise
            proposal_values = batched_log_psi(params, proposal)
            # log u < 2 (log|psi'| - log|psi|) accepts with probability min(1, |psi'/psi|^2);
            # comparing in log space avoids overflow of the ratio itself.
            log_u = jnp.log(jax.random.uniform(key_accept, (n_walkers,), values.dtype))
            metropolis = log_u < 2.0 * (proposal_values - values)
            accept = jnp.isfinite(proposal_values) & (metropolis | ~jnp.isfinite(values))
            walkers = jnp.where(accept[:, None, None], proposal, walkers)
            values = jnp.where(accept, proposal_values, values)
            return (walkers, values, n_accepted + jnp.sum(accept, dtype=jnp.int32)), None

        keys = jax.random.split(key, n_steps)
        init = (walkers, log_psi_values, jnp.zeros((), jnp.int32))
        (walkers, log_psi_values, n_accepted), _ = jax.lax.scan(one_step, init, keys)
        acceptance = n_accepted.astype(walkers.dtype) / (n_steps * n_walkers)
        return walkers, log_psi_values, acceptance

    return mcmc_step


def adapt_step_size(
    step_size: jax.Array,
    acceptance: jax.Array,
    target: float = TARGET_ACCEPTANCE,
    factor: float = ADAPTATION_FACTOR,
    min_step_size: float = MIN_STEP_SIZE,
    max_step_size: float = MAX_STEP_SIZE,
) -> jax.Array:
    """Next step size (bohr): larger by ``factor`` if more than ``target`` of the proposals were
    accepted (the chain moves too timidly), smaller by ``factor`` otherwise; clamped to
    [min_step_size, max_step_size]. Pure and jit-able."""
    scaled = jnp.where(acceptance > target, step_size * factor, step_size / factor)
    return jnp.clip(scaled, min_step_size, max_step_size)


def advance(
    mcmc_step: MCMCStep, params: Params, state: MCMCState, key: jax.Array
) -> tuple[MCMCState, jax.Array]:
    """One call of ``mcmc_step`` followed by one step-size adaptation.

    Returns the new state and the acceptance rate of this call (scalar).
    """
    walkers, values, acceptance = mcmc_step(
        params, state.walkers, state.log_psi, key, state.step_size
    )
    new_state = MCMCState(
        walkers=walkers,
        log_psi=values,
        step_size=adapt_step_size(state.step_size, acceptance),
    )
    return new_state, acceptance


def burn_in(
    mcmc_step: MCMCStep, params: Params, state: MCMCState, key: jax.Array, n_sweeps: int
) -> tuple[MCMCState, jax.Array]:
    """Equilibrate the walkers: ``n_sweeps`` calls of :func:`advance`, each of ``mcmc_step``'s
    own number of steps (so ``n_sweeps * n_steps`` Metropolis steps in all).

    Runs as one ``lax.scan``; jit-able with ``n_sweeps`` static. Returns the final state and the
    acceptance rate of every sweep, (n_sweeps,).
    """

    def sweep(state, sweep_key):
        return advance(mcmc_step, params, state, sweep_key)

    return jax.lax.scan(sweep, state, jax.random.split(key, n_sweeps))


def assign_electrons(
    charges: np.ndarray, n_up: int, n_down: int
) -> tuple[np.ndarray, np.ndarray]:
    """Which atom each electron starts at: (atoms of the up electrons (n_up,), atoms of the
    down electrons (n_down,)), integer indices.

    Electrons are shared out in proportion to the nuclear charges (exactly Z_I per atom for a
    neutral molecule; largest remainders for ions). On every atom the electrons are paired up
    and down; the odd electrons of open-shell atoms alternate spin from atom to atom, so that
    e.g. the two hydrogens of water start with opposite spins. Any remaining excess of one spin
    (high-spin states, such as triplet O2) is made by flipping paired electrons, spread over the
    atoms. Only the starting point of sampling depends on this; burn-in forgets it.
    """
    charges = np.asarray(charges, dtype=float)
    n_atoms = charges.shape[0]
    n_electrons = n_up + n_down
    if n_atoms == 0 or n_up < 0 or n_down < 0:
        raise ValueError("need at least one atom and non-negative electron counts")
    if np.any(charges < 0) or charges.sum() <= 0:
        raise ValueError(f"charges must be non-negative with a positive sum, got {charges}")

    share = n_electrons * charges / charges.sum()
    counts = np.floor(share).astype(int)
    remainder_order = np.argsort(-(share - counts), kind="stable")
    counts[remainder_order[: n_electrons - counts.sum()]] += 1

    up = counts // 2
    down = counts // 2
    odd_atoms = np.flatnonzero(counts % 2)
    for k, atom in enumerate(odd_atoms):
        # Alternate the spin of the unpaired electrons, but never beyond the requested totals.
        wants_up = k % 2 == 0
        if (wants_up and up.sum() < n_up) or down.sum() >= n_down:
            up[atom] += 1
        else:
            down[atom] += 1

    # Flip electrons of the over-full spin, each time on the atom that has most of that spin,
    # so that the flips spread over the atoms.
    while up.sum() != n_up:
        source, sink = (up, down) if up.sum() > n_up else (down, up)
        atom = int(np.argmax(source))
        source[atom] -= 1
        sink[atom] += 1

    atoms = np.arange(n_atoms)
    return np.repeat(atoms, up), np.repeat(atoms, down)


def init_walkers(
    key: jax.Array,
    atom_positions: jax.Array,
    charges: np.ndarray,
    n_up: int,
    n_down: int,
    n_walkers: int,
    width: float = 1.0,
    dtype: Any = None,
) -> jax.Array:
    """Starting walkers: every electron Gaussian-distributed (standard deviation ``width`` bohr
    per coordinate) around the atom :func:`assign_electrons` gives it.

    Args:
        key: PRNG key.
        atom_positions: (n_atoms, 3) bohr.
        charges: (n_atoms,) nuclear charges; must be concrete (they set the assignment).
        n_up, n_down: electrons of each spin.
        n_walkers: number of walkers.
        width: bohr.
        dtype: of the result; default the dtype of ``atom_positions`` as a JAX array.

    Returns:
        (n_walkers, n_up + n_down, 3) bohr, spin-up electrons first.
    """
    up_atoms, down_atoms = assign_electrons(charges, n_up, n_down)
    atom_positions = jnp.asarray(atom_positions, dtype)
    centres = atom_positions[np.concatenate([up_atoms, down_atoms])]
    noise = jax.random.normal(key, (n_walkers,) + centres.shape, centres.dtype)
    return centres[None] + width * noise


def refresh(log_psi: LogPsi, params: Params, state: MCMCState) -> MCMCState:
    """The state with log|psi| of its walkers re-evaluated under ``params`` (after a parameter
    update the cached values belong to the old parameters and would bias the next
    acceptance tests)."""
    values = jax.vmap(log_psi, in_axes=(None, 0))(params, state.walkers)
    return state.replace(log_psi=values)


def replace_nonfinite_walkers(state: MCMCState, key: jax.Array) -> tuple[MCMCState, jax.Array]:
    """Walkers whose positions or log|psi| are not finite are replaced by copies of randomly
    chosen finite walkers (with their log|psi|), so one bad walker never enters an average.

    Returns the repaired state and the number of replaced walkers (scalar int32). If no walker
    is finite, the state is returned unchanged and the count equals the number of walkers;
    the caller must stop.
    """
    good = jnp.isfinite(state.log_psi) & jnp.all(jnp.isfinite(state.walkers), axis=(1, 2))
    logits = jnp.where(good, 0.0, -jnp.inf)
    donors = jax.random.categorical(key, logits, shape=good.shape)
    any_good = jnp.any(good)
    source = jnp.where(good | ~any_good, jnp.arange(good.shape[0]), donors)
    repaired = state.replace(walkers=state.walkers[source], log_psi=state.log_psi[source])
    return repaired, jnp.sum(~good).astype(jnp.int32)
