"""Training one wavefunction over a set of systems by variational Monte Carlo (after Scherbela,
Gerard and Grohs 2023); a single system is a set of one, trained by the same code.

Every geometry keeps its own walkers, MCMC step size and clipping window (the local energies
of a step are clipped and centred per geometry, :mod:`vmc.loss`). One optimisation *step*
updates the parameters once, from ``geometries_per_step`` geometries of one composition
batched together (the reference code uses one). Which geometries: the least-visited first
until every geometry has been visited once (round-robin), then the geometry whose local
energies had the largest standard deviation at its last visit, together with the
next-largest of its composition (``schedule="spread"``, the reference's rule), except that the
least-visited lead again while one has had fewer than ``min_visit_share`` of the mean visits;
or always the least-visited (``schedule="round_robin"``). Geometries of one composition share
compiled functions (:mod:`vmc.geometries`): a set of H6 chains at ten spacings compiles one step.

Phases (:data:`vmc.config.PHASES`): the *HF fit*, supervised steps that fit the neural orbital
matrices [phi_k^d(r_i)] of every determinant d to the HF orbital matrix (spin-diagonal blocks,
zero spin-mixing blocks) by least squares with Adam, on walkers sampled from the HF density,
one geometry group after another; then VMC, from the fitted parameters with the walkers
re-equilibrated under the network (burn-in), alternating one MCMC call (``mcmc_steps``
Metropolis steps) and one optimiser step on the fresh walkers. Fine-tuning starts from the
parameters of a base run (``init_from``: every weight reused) and by default skips the HF fit.

A run directory (:mod:`molfoundation.runs`) holds ``config.json``, ``systems.xyz`` (the
resolved system set, read back on resume), ``log.jsonl`` (one line per step with per-geometry
lists: ``systems``, ``energy``, ``variance``, ``acceptance``, ...), ``energy.png`` and orbax
checkpoints of both phases with the whole state (parameters, optimiser state, every geometry's
walkers and step size, the schedule's statistics, PRNG key, step), so running again on the same
directory continues exactly where the last checkpoint was written. Walkers are split over all
devices (data parallel through ``jax.sharding``; the same code runs multi-host after
``jax.distributed.initialize()``).

Non-finite values are never averaged: walkers whose position or log|psi| is not finite are
replaced by copies of finite walkers (counted as ``n_walkers_reset``), local energies that are
not finite are left out of the energy and gradient (counted as ``n_nonfinite``), and a step
whose energy or new parameters are not finite, or where more than half of a geometry's local
energies are not finite, stops the run with :class:`molfoundation.errors.TrainingDiverged`,
keeping the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from molfoundation import compiling, distributed, runs, sharding
from molfoundation.errors import InputError, TrainingDiverged
from vmc import ansatz, geometries, loss, mcmc, optimizers, system_sets, systems
from vmc.config import RunConfig, run_directory
from vmc.geometries import GeometryBatch, GeometryGroup
from vmc.references import exact_energy

SYSTEMS_FILE = "systems.xyz"
# A step where more than this fraction of a geometry's local energies is not finite diverged.
MAX_NONFINITE_FRACTION = 0.5
# Scalar log entries shown next to the progress bar.
PROGRESS_KEYS = ("loss", "mean_energy")


@flax.struct.dataclass
class TrainState:
    """The whole state of one phase (a pytree, saved whole by orbax).

    Attributes:
      step: scalar int32, optimisation steps done in this phase.
      params: wavefunction parameters.
      opt_state: optimiser state (optax Adam in the HF fit; KFAC or Adam in VMC).
      samplers: one :class:`vmc.mcmc.MCMCState` per composition group, stacked over its
        geometries: walkers (size, W, n_el, 3) bohr, log_psi (size, W), step_size (size,).
      spread: (n_systems,) standard deviation of the local energies at each geometry's last
        visit, hartree (inf before the first visit; unused in the HF fit).
      visits: (n_systems,) int32, steps that included each geometry.
      key: PRNG key of the next step.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    samplers: tuple
    spread: jax.Array
    visits: jax.Array
    key: jax.Array


def choose_geometries(spread: np.ndarray, visits: np.ndarray, groups: list[GeometryGroup],
                      per_step: int, by_spread: bool, min_share: float = 0.0) -> tuple[int, np.ndarray]:
    """(group index, rows within the group) of the next step.

    The least-visited geometry leads (ties: the first in set order) while any geometry is
    unvisited, has fewer than ``min_share`` x the mean visits, or ``by_spread`` is False;
    otherwise the one with the largest spread. Its group then contributes
    ``min(per_step, group size)`` geometries ranked the same way."""
    if len(groups) == 1 and groups[0].size <= per_step:
        return 0, np.arange(groups[0].size)  # every geometry, every step
    spread, visits = np.asarray(spread), np.asarray(visits)
    use_spread = (by_spread and bool(np.all(visits > 0))
                  and bool(visits.min() >= min_share * visits.mean()))
    priority = spread if use_spread else -visits.astype(np.float64)
    # lexsort: the last key is primary; -priority ranks high priority first, index breaks ties.
    order = np.lexsort((np.arange(priority.size), -priority))
    leader = int(order[0])
    group_index = next(g for g, group in enumerate(groups) if leader in group.members)
    members = np.asarray(groups[group_index].members)
    ranked = [int(np.flatnonzero(members == i)[0]) for i in order if i in set(members.tolist())]
    return group_index, np.asarray(ranked[: min(per_step, members.size)])


class WalkerParallel(sharding.FirstAxisSharding):
    """Every geometry's walkers split over all devices along the walker axis; everything else
    replicated."""

    def __init__(self):
        super().__init__("walkers")

    def place(self, state: TrainState) -> TrainState:
        rest = self.replicate(state.replace(samplers=()))
        return rest.replace(samplers=tuple(self.place_sampler(s) for s in state.samplers))

    def place_sampler(self, sampler: mcmc.MCMCState) -> mcmc.MCMCState:
        """A group's sampler state with its walkers (and their log|psi|) split over the
        devices, its step sizes replicated."""
        walkers, log_psi = self.put_split((sampler.walkers, sampler.log_psi), axis=1)
        return self.replicate(sampler.replace(walkers=None, log_psi=None)).replace(walkers=walkers, log_psi=log_psi)

    def check_walkers(self, n_walkers: int) -> None:
        if n_walkers % self.n_devices:
            raise InputError(f"{n_walkers} walkers do not divide over {self.n_devices} devices")


def _init_params(key, network: ansatz.AnsatzConfig, float64: bool):
    """Parameters of ``network`` (their shapes do not depend on the molecule: H2 serves)."""
    dtype = runs.float_dtype(float64)
    h2 = systems.from_name("H2")
    slots = network.slots.dim
    inputs = ansatz.AnsatzInputs(jnp.asarray(h2.positions, dtype), jnp.asarray(h2.atomic_numbers, jnp.int32),
                                 jnp.zeros((1, 2, slots), dtype), jnp.zeros((1, 2, slots), dtype))
    params = ansatz.init_params(key, network, inputs)
    return jax.tree.map(lambda x: x.astype(dtype), params)


# Compiled: flax's initialisation run eagerly, operation by operation, is far slower.
init_params = compiling.jit_once(_init_params, static_argnums=(1, 2))


def param_shapes(network: ansatz.AnsatzConfig, float64: bool):
    """The shapes and dtypes of :func:`init_params`'s parameters, without compiling anything."""
    return jax.eval_shape(lambda key: _init_params(key, network, float64), jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------------------------
# The problem: geometries and compiled functions.


@dataclasses.dataclass(eq=False)
class Problem:
    """The system set with its orbitals, grouped by composition, and the functions every phase
    needs, compiled once per composition and batch size. Build it once and pass it to
    :func:`train` and :func:`vmc.evaluate.evaluate_model` again to reuse what was compiled."""

    config: RunConfig
    system_set: list
    groups: list[GeometryGroup]

    @classmethod
    def build(cls, config: RunConfig, system_set=None, progress: bool = True) -> "Problem":
        """Load the set (unless given) and solve for every system's orbitals."""
        s = config.systems
        if system_set is None:
            system_set = config.systems.load()
        with runs.precision(config.vmc.float64):
            groups = geometries.build_groups(system_set, config.ansatz, s.orbital_source(),
                                             runs.float_dtype(config.vmc.float64), progress)
        return cls(config, list(system_set), groups)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.system_set]

    @functools.cached_property
    def functions(self) -> geometries.GeometryFunctions:
        return geometries.functions(self.config.ansatz, self.config.vmc.laplacian, self.config.vmc.folx_sparsity)

    def init_walkers(self, key, group: GeometryGroup) -> jax.Array:
        """(size, W, n_el, 3) starting walkers around each geometry's atoms."""
        cfg = self.config.vmc
        keys = jax.random.split(key, group.size)
        return jnp.stack([
            mcmc.init_walkers(k, system.positions, system.charges, system.n_up, system.n_down,
                              cfg.n_walkers, width=cfg.walker_init_width, dtype=runs.float_dtype(cfg.float64))
            for k, system in zip(keys, group.systems)
        ])

    @functools.cached_property
    def _compiled(self) -> dict:
        return {}

    def _log_psi(self, group: GeometryGroup, hartree_fock: bool):
        return (geometries.make_hartree_fock_log_psi(group.ao_values, group.n_up)
                if hartree_fock else self.functions.log_psi)

    def sampler(self, group: GeometryGroup, hartree_fock: bool = False):
        """``fn(params, sampler (G stacked), rows (G,), key) -> (sampler, acceptance (G,),
        n_reset (G,))``: one MCMC call on the rows' geometries (under their HF orbitals with
        ``hartree_fock``); jit-compiled per group."""
        cache_key = (id(group), hartree_fock, "sample")
        if cache_key not in self._compiled:
            sample = make_sampler(self._log_psi(group, hartree_fock), self.config.vmc.mcmc_steps)
            batched = jax.vmap(sample, in_axes=((None, 0), 0, 0))

            @jax.jit
            def compiled(params, sampler, rows, key):
                return batched((params, group.select(rows)), sampler, jax.random.split(key, rows.shape[0]))

            if hartree_fock:
                # The HF wavefunction takes no parameters: whatever a caller passes, one
                # compiled sampler (jit would compile anew for every parameter structure).
                def run(params, sampler, rows, key):
                    return compiled(None, sampler, rows, key)
            else:
                run = compiled
            self._compiled[cache_key] = run
        return self._compiled[cache_key]

    def vmc_step(self, group: GeometryGroup) -> "VMCStep":
        """One VMC step on geometries of ``group`` (:class:`VMCStep`), compiled per group."""
        cache_key = (id(group), "vmc_step")
        if cache_key not in self._compiled:
            optimizer = self.optimizer

            @jax.jit
            def take(sampler, key, rows):
                key, key_sample, key_opt = jax.random.split(key, 3)
                return jax.tree.map(lambda x: x[rows], sampler), key, key_sample, key_opt

            @functools.partial(jax.jit, donate_argnums=(0, 1))
            def update(params, opt_state, sampler, picked, spread, visits, key_opt, rows, members):
                batch = GeometryBatch(picked.walkers, group.select(rows))
                params, opt_state, stats = optimizer.step(params, opt_state, key_opt, batch)
                sampler = jax.tree.map(lambda x, y: x.at[rows].set(y), sampler, picked)
                spread = spread.at[members].set(jnp.sqrt(stats["variance"].astype(spread.dtype)))
                # Checked here, not by a call of its own: one dispatch and wait less per step.
                stats = dict(stats, finite_params=runs.all_finite(params))
                return params, opt_state, sampler, spread, visits.at[members].add(1), stats

            self._compiled[cache_key] = VMCStep(take, self.sampler(group), update)
        return self._compiled[cache_key]

    def init_sampler(self, group: GeometryGroup, params, walkers, hartree_fock: bool = False) -> mcmc.MCMCState:
        """The stacked sampler state of every geometry of ``group`` for ``walkers`` (size, W,
        n_el, 3); jit-compiled per group."""
        cache_key = (id(group), hartree_fock, "init")
        if cache_key not in self._compiled:
            log_psi = self._log_psi(group, hartree_fock)
            step_size = self.config.vmc.initial_step_size

            @jax.jit
            def init(params, walkers):
                return jax.vmap(lambda g, w: mcmc.init_state(log_psi, (params, g), w, step_size))(
                    group.geometries, walkers)

            self._compiled[cache_key] = init
        return self._compiled[cache_key](params, walkers)

    def burn_in(self, group: GeometryGroup, params, sampler: mcmc.MCMCState, key, n_calls: int,
                hartree_fock: bool = False) -> mcmc.MCMCState:
        """``sampler`` after ``n_calls`` MCMC calls on every geometry of ``group`` under fixed
        ``params`` (on the HF densities with ``hartree_fock``)."""
        sample, rows = self.sampler(group, hartree_fock), _rows(np.arange(group.size))
        for k in jax.random.split(key, n_calls):
            sampler, _, _ = sample(params, sampler, rows, k)
        return sampler

    def hartree_fock_sampler(self, group: GeometryGroup, key, n_calls: int, place=None) -> mcmc.MCMCState:
        """The stacked HF-density sampler state of every geometry of ``group``: fresh walkers
        around the atoms after ``n_calls`` MCMC calls on the geometries' HF densities.
        ``place(sampler)`` (e.g. :meth:`WalkerParallel.place_sampler`) puts the fresh state on
        the devices before the calls.

        Every sampling of a network starts here (the HF fit, :meth:`fresh_sampler`): walkers
        that start as Gaussians around the atoms and are sampled under a network at once can
        get stuck. A trained network has never seen electrons far from every nucleus, and its
        |psi| can be nearly flat there, while the one step size that the core electrons set
        (0.06 bohr on H2O) moves such walkers too slowly to come back. On H2O (small preset,
        1719 VMC steps) four of 256 fresh walkers sat 22 to 29 below the median log|psi|, with
        local energies of -30 to -37 Ha, after 300 calls, and the mean energy of calls 500-600
        was 0.8 Ha above that of the training's walkers; with 100 HF calls first, it agreed
        with theirs within the noise from the first 50 calls on. The HF density decays
        everywhere."""
        sampler = self.init_sampler(group, None, self.init_walkers(key, group), hartree_fock=True)
        if place is not None:
            sampler = place(sampler)
        return self.burn_in(group, None, sampler, jax.random.fold_in(key, 1), n_calls, hartree_fock=True)

    def fresh_sampler(self, group: GeometryGroup, params, key, hartree_fock_calls: int,
                      place=None) -> mcmc.MCMCState:
        """The stacked sampler state of every geometry of ``group`` under ``params``, on the
        walkers of :meth:`hartree_fock_sampler` (``hartree_fock_calls`` calls on the HF
        densities, which says why; ``place`` as there); the step size adapted there is kept."""
        sampler = self.hartree_fock_sampler(group, key, hartree_fock_calls, place)
        return self.init_sampler(group, params, sampler.walkers).replace(step_size=sampler.step_size)

    def sample_walkers(self, group: GeometryGroup, params, n_calls: int, key) -> jax.Array:
        """(size, W, n_el, 3) walkers of every geometry of ``group`` after ``n_calls`` MCMC calls
        under ``params`` from fresh walkers (:meth:`fresh_sampler`, as many calls on the HF
        densities first): configurations drawn from |psi|^2."""
        key_walkers, key = jax.random.split(key)
        return self.burn_in(group, params, self.fresh_sampler(group, params, key_walkers, n_calls), key,
                            n_calls).walkers

    @functools.cached_property
    def energy_loss(self) -> loss.EnergyLoss:
        """``fn(params, batch) -> (energy, EnergyStats)``, the VMC loss of a geometry batch."""
        fns = self.functions
        return loss.make_energy_loss(None, fns.local_energy, self.config.vmc.clip_scale,
                                     batched_log_psi=geometries.over_batch(fns.log_psi))

    @functools.cached_property
    def optimizer(self) -> optimizers.Optimizer:
        cfg = self.config
        if cfg.vmc.optimizer == "kfac":
            return geometries.make_kfac(self.energy_loss, cfg.ansatz, cfg.kfac)
        return optimizers.make_adam(self.energy_loss, cfg.adam)

    @property
    def hf_fit_transform(self):
        return optax.adam(self.config.vmc.hf_fit_learning_rate)

    def hf_fit_update(self, group: GeometryGroup):
        """``fn(params, opt_state, batch) -> (params, opt_state, loss)``: one Adam step of the
        HF fit on a batch of the group's geometries, jit-compiled per group."""
        cache_key = (id(group), "hf_fit")
        if cache_key not in self._compiled:
            value_and_grad = jax.value_and_grad(
                geometries.make_hf_fit_loss(self.config.ansatz, group.ao_values, group.n_up))
            transform = self.hf_fit_transform

            @jax.jit
            def update(params, opt_state, batch):
                value, grads = value_and_grad(params, batch)
                updates, opt_state = transform.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, value

            self._compiled[cache_key] = update
        return self._compiled[cache_key]

    @functools.cached_property
    def local_energy(self):
        """``fn(params, batch) -> (G, W)`` local energies, jit-compiled."""
        return jax.jit(self.functions.local_energy)


class VMCStep(NamedTuple):
    """``step(params, opt_state, sampler, spread, visits, key, rows (G,), members (G,)) ->
    (params, opt_state, sampler, spread, visits, key, stats)``: one VMC step on the rows'
    geometries of a group (``members``: their indices in the system set): the MCMC call on
    their walkers (``sampler``, the group's whole stack), the optimiser's update on the new
    walkers, and the schedule's spread and visits. ``stats``: the optimiser's, with the
    sampler's ``acceptance``, ``step_size`` and ``n_reset`` (G,), and ``finite_params`` (whether
    every new parameter is finite). ``params`` and ``opt_state`` are donated.

    Three compiled calls, dispatched one after the other without waiting for results:
    ``take`` (the rows' samplers and keys), ``sample`` (the MCMC call: :meth:`Problem.sampler`,
    the very function the burn-in runs, so it is compiled once for both: about 3 s less
    start-up for LiH's small preset) and ``update``."""

    take: Any
    sample: Any
    update: Any

    def __call__(self, params, opt_state, sampler, spread, visits, key, rows, members):
        picked, key, key_sample, key_opt = self.take(sampler, key, rows)
        picked, acceptance, n_reset = self.sample(params, picked, rows, key_sample)
        params, opt_state, sampler, spread, visits, stats = self.update(
            params, opt_state, sampler, picked, spread, visits, key_opt, rows, members)
        stats = dict(stats, acceptance=acceptance, step_size=picked.step_size, n_reset=n_reset)
        return params, opt_state, sampler, spread, visits, key, stats


def make_sampler(log_psi, n_steps: int):
    """``fn(params, sampler, key) -> (sampler, acceptance, n_walkers_reset)``: refresh log|psi|
    under ``params``, ``n_steps`` Metropolis steps with step-size adaptation, then replacement
    of non-finite walkers."""
    mcmc_step = mcmc.make_mcmc_step(log_psi, n_steps)

    def sample(params, sampler, key):
        key_move, key_repair = jax.random.split(key)
        sampler = mcmc.refresh(log_psi, params, sampler)
        sampler, acceptance = mcmc.advance(mcmc_step, params, sampler, key_move)
        sampler, n_reset = mcmc.replace_nonfinite_walkers(sampler, key_repair)
        return sampler, acceptance, n_reset

    return sample


# ----------------------------------------------------------------------------------------------
# Phases.


def _rows(group_rows) -> jax.Array:
    return jnp.asarray(group_rows, jnp.int32)


def _batch_rows(problem: Problem, group: GeometryGroup) -> np.ndarray:
    """The first ``min(geometries_per_step, group size)`` rows of ``group``: as many geometries
    as a step batches (:func:`choose_geometries`)."""
    return np.arange(min(problem.config.schedule.geometries_per_step, group.size))


def _whole(rows: np.ndarray, size: int) -> bool:
    """Whether ``rows`` are all ``size`` rows of a stack, in order (then no copy is needed)."""
    return rows.size == size and np.array_equal(rows, np.arange(size))


def _take(sampler: mcmc.MCMCState, rows: np.ndarray, size: int) -> mcmc.MCMCState:
    """The rows' samplers of a stack of ``size``."""
    return sampler if _whole(rows, size) else jax.tree.map(lambda x: x[rows], sampler)


def _put(sampler: mcmc.MCMCState, rows: np.ndarray, new: mcmc.MCMCState) -> mcmc.MCMCState:
    """The stack with the rows' samplers replaced by ``new``."""
    if _whole(rows, sampler.walkers.shape[0]):
        return new
    return jax.tree.map(lambda x, y: x.at[rows].set(y), sampler, new)


def _burn_in_all(problem: Problem, state: TrainState, n_calls: int) -> TrainState:
    """``n_calls`` MCMC calls on every geometry under the state's parameters."""
    key, *keys = jax.random.split(state.key, len(problem.groups) + 1)
    return state.replace(key=key, samplers=tuple(
        problem.burn_in(group, state.params, sampler, k, n_calls)
        for group, sampler, k in zip(problem.groups, state.samplers, keys)))


def _statistics(problem: Problem) -> tuple[jax.Array, jax.Array]:
    """Fresh (spread, visits) of the schedule."""
    n = len(problem.system_set)
    return (jnp.full((n,), jnp.inf, runs.float_dtype(problem.config.vmc.float64)), jnp.zeros((n,), jnp.int32))


def _fresh_hf_fit_state(problem: Problem, params_from, n_calls: int = 0, devices: WalkerParallel | None = None
                        ) -> TrainState:
    """Step 0 of the HF fit: parameters ``params_from(key)``, walkers after ``n_calls`` MCMC
    calls on the HF densities (:meth:`Problem.hartree_fock_sampler`), everything on
    ``devices`` if given."""
    cfg = problem.config.vmc
    key_params, key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params = params_from(key_params)
    key_walkers, key_run = jax.random.split(key)
    keys = jax.random.split(key_walkers, len(problem.groups))
    place = None if devices is None else devices.place_sampler
    samplers = tuple(problem.hartree_fock_sampler(group, k, n_calls, place) for k, group in zip(keys, problem.groups))
    state = TrainState(jnp.asarray(0, jnp.int32), params, problem.hf_fit_transform.init(params), (),
                       *_statistics(problem), key_run)
    if devices is not None:
        state = devices.place(state)
    return state.replace(samplers=samplers)


def _initial_params(problem: Problem, key):
    """Fresh parameters, or the base model's for a fine-tuning run."""
    from vmc.evaluate import load_model

    cfg = problem.config
    if cfg.init_from is None:
        return init_params(key, cfg.ansatz, cfg.vmc.float64)
    network, params, _ = load_model(cfg.init_from)
    if network != cfg.ansatz:
        raise InputError(f"the base model in {cfg.init_from} has another network configuration")
    return params


def fit_hartree_fock(run: runs.RunDirectory, problem: Problem, devices: WalkerParallel, phase_options: dict
                     ) -> tuple[TrainState, str]:
    """The HF fit: supervised steps towards every geometry's HF orbitals, round-robin over
    the geometries (resumable). Returns (state, why it stopped)."""
    cfg = problem.config.vmc
    # The template needs shapes only: no base model is read for it.
    template = functools.partial(_fresh_hf_fit_state, problem,
                                 lambda k: _init_params(k, problem.config.ansatz, cfg.float64))
    state = run.restore("hf_fit", lambda: jax.eval_shape(template))
    if state is None:
        state = _fresh_hf_fit_state(problem, functools.partial(_initial_params, problem), cfg.burn_in_sweeps,
                                    devices)
    else:
        state = devices.place(state)
    if int(state.step) >= cfg.hf_fit_steps:
        return state, "max_steps"
    per_step = problem.config.schedule.geometries_per_step

    def step_fn(state: TrainState):
        t = time.perf_counter()
        g, rows = choose_geometries(state.spread, state.visits, problem.groups, per_step, by_spread=False)
        group = problem.groups[g]
        key, key_sample = jax.random.split(state.key)
        picked = _take(state.samplers[g], rows, group.size)
        picked, acceptance, _ = problem.sampler(group, hartree_fock=True)(None, picked, _rows(rows), key_sample)
        batch = GeometryBatch(picked.walkers, group.select(_rows(rows)))
        params, opt_state, value = problem.hf_fit_update(group)(state.params, state.opt_state, batch)
        value = float(value)
        if not np.isfinite(value):
            raise TrainingDiverged(f"non-finite HF-fit loss at step {int(state.step)}")
        members = np.asarray(group.members)[rows]
        samplers = list(state.samplers)
        samplers[g] = _put(samplers[g], rows, picked)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            samplers=tuple(samplers), visits=state.visits.at[members].add(1), key=key)
        return new, [{"step": int(new.step), "systems": [problem.names[i] for i in members],
                      "loss": value, "acceptance": np.asarray(acceptance).tolist(),
                      "seconds": time.perf_counter() - t}]

    phase = runs.Phase(run, "hf_fit", cfg.hf_fit_steps, checkpoint_every=cfg.checkpoint_every,
                       shown=PROGRESS_KEYS, **phase_options)
    return phase(state, step_fn)


def _fresh_vmc_state(problem: Problem, params, samplers, key) -> TrainState:
    """VMC state from ``params`` and walkers ``samplers`` (log|psi| recomputed for the network)."""
    key_opt, key_run = jax.random.split(key)
    samplers = tuple(problem.init_sampler(g, params, s.walkers) for g, s in zip(problem.groups, samplers))
    # KFAC is initialised on a batch shaped like the first group's steps.
    first = problem.groups[0]
    rows = _rows(_batch_rows(problem, first))
    example = GeometryBatch(samplers[0].walkers[rows], first.select(rows))
    opt_state = problem.optimizer.init(params, key_opt, example)
    return TrainState(jnp.asarray(0, jnp.int32), params, opt_state, samplers, *_statistics(problem), key_run)


def _vmc_template(problem: Problem) -> TrainState:
    """A fresh VMC state (for its shapes: :func:`jax.eval_shape`)."""
    cfg = problem.config
    params = _init_params(jax.random.PRNGKey(0), cfg.ansatz, cfg.vmc.float64)
    samplers = tuple(mcmc.MCMCState(problem.init_walkers(jax.random.PRNGKey(0), g), None, None)
                     for g in problem.groups)
    return _fresh_vmc_state(problem, params, samplers, jax.random.PRNGKey(0))


def _compile_vmc_updates(problem: Problem, devices: WalkerParallel) -> compiling.Background:
    """Starts compiling every group's optimiser update (:class:`VMCStep`'s ``update``, the
    longest compilation of a run: about 15 s of LiH's small preset on 2 CPU cores) for a
    stand-in VMC state: zeros of a fresh state's shapes (:func:`_vmc_template`'s) in its
    placement. The updates are traced here; XLA compiles them in the returned thread while
    the HF fit trains and VMC starts (:func:`train`), and the real steps find them compiled
    for exactly their arguments."""
    state = devices.place(jax.tree.map(jnp.zeros_like, jax.eval_shape(functools.partial(_vmc_template, problem))))
    calls = []
    for g, group in enumerate(problem.groups):
        step = problem.vmc_step(group)
        rows = _batch_rows(problem, group)
        rows, members = _rows(rows), _rows(np.asarray(group.members)[rows])
        picked, _, _, key_opt = step.take(state.samplers[g], state.key, rows)
        calls.append((step.update, (state.params, state.opt_state, state.samplers[g], picked,
                                    state.spread, state.visits, key_opt, rows, members)))
    return compiling.compile_ahead(calls)


def run_vmc(run: runs.RunDirectory, problem: Problem, devices: WalkerParallel, start: TrainState | None,
            max_steps: int, phase_options: dict, updates: compiling.Background | None = None
            ) -> tuple[TrainState, str]:
    """VMC up to ``max_steps`` optimisation steps in all (resumable); ``start`` is the HF-fit
    state, None when a VMC checkpoint exists. ``updates``: a running
    :func:`_compile_vmc_updates`, waited for before the first step."""
    cfg = problem.config
    by_spread = cfg.schedule.schedule == "spread"

    state = run.restore("vmc", lambda: jax.eval_shape(functools.partial(_vmc_template, problem)))
    if state is None:
        if start is None:
            raise InputError(f"{run.path} has no HF-fit state to start VMC from")
        key_start, key_burn = jax.random.split(start.key)
        state = _fresh_vmc_state(problem, start.params, start.samplers, key_start)
        state = devices.place(state.replace(key=key_burn))
        state = _burn_in_all(problem, state, cfg.vmc.burn_in_sweeps)
    else:
        state = devices.place(state)
    if updates is not None:
        updates.result()
    n_walkers = cfg.vmc.n_walkers

    def step_fn(state: TrainState):
        t = time.perf_counter()
        step = int(state.step)
        g, rows = choose_geometries(state.spread, state.visits, problem.groups,
                                    cfg.schedule.geometries_per_step, by_spread, cfg.schedule.min_visit_share)
        group = problem.groups[g]
        members = np.asarray(group.members)[rows]
        names = [problem.names[i] for i in members]
        params, opt_state, sampler, spread, visits, key, stats = problem.vmc_step(group)(
            state.params, state.opt_state, state.samplers[g], state.spread, state.visits, state.key,
            _rows(rows), _rows(members))
        stats = jax.device_get(stats)
        n_reset = stats["n_reset"]
        if np.any(n_reset == n_walkers):
            raise TrainingDiverged(f"no walker of {names[int(np.argmax(n_reset))]} has a finite "
                                   f"wavefunction at VMC step {step}")
        energy = np.asarray(stats["energy"], np.float64)
        n_nonfinite = stats["n_nonfinite"]
        if not np.all(np.isfinite(energy)) or np.any(n_nonfinite > MAX_NONFINITE_FRACTION * n_walkers):
            raise TrainingDiverged(f"local energies of {names} not finite at VMC step {step} "
                                   f"({n_nonfinite.tolist()} of {n_walkers} walkers)")
        if not stats["finite_params"]:
            raise TrainingDiverged(f"non-finite parameters after VMC step {step}")
        variance = np.asarray(stats["variance"], np.float64)
        samplers = list(state.samplers)
        samplers[g] = sampler
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            samplers=tuple(samplers), spread=spread, visits=visits, key=key)
        entry = {"step": step + 1, "systems": names, "energy": energy.tolist(),
                 "mean_energy": float(energy.mean()), "variance": variance.tolist(),
                 "acceptance": stats["acceptance"].tolist(), "step_size": stats["step_size"].tolist(),
                 "clipped_fraction": stats["clipped_fraction"].tolist(),
                 "n_nonfinite": int(n_nonfinite.sum()), "n_walkers_reset": int(n_reset.sum()),
                 "learning_rate": float(stats["learning_rate"])}
        if "damping" in stats:
            entry["damping"] = float(stats["damping"])
        entry["seconds"] = time.perf_counter() - t
        return new, [entry]

    phase = runs.Phase(run, "vmc", max_steps, checkpoint_every=cfg.vmc.checkpoint_every,
                       shown=PROGRESS_KEYS, **phase_options)
    return phase(state, step_fn)


# ----------------------------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """``energies``: per system, the mean energy of its last 10 % of VMC visits (at least
    one; hartree); ``visits``: per system, VMC steps that included it."""

    hf_fit_steps: int
    steps: int
    stopped_because: str
    energies: dict
    visits: dict
    seconds: float


def run_systems(run_dir: str, config: RunConfig) -> list:
    """The system set of a run: read from its ``systems.xyz`` if there is one, else built from
    ``config.systems`` and passed through the same file format (nothing is written to the run
    directory), so a resumed run computes with the very same numbers."""
    path = os.path.join(run_dir, SYSTEMS_FILE)
    if os.path.exists(path):
        return system_sets.read_system_set(path)
    with tempfile.TemporaryDirectory() as scratch:
        copy = os.path.join(scratch, SYSTEMS_FILE)
        system_sets.write_system_set(copy, config.systems.load())
        return system_sets.read_system_set(copy)


def same_systems(a: list, b: list) -> bool:
    """Whether two system lists hold the same systems (names, charges, spins, geometries) in
    the same order."""
    return len(a) == len(b) and all(
        x.name == y.name and x.charge == y.charge and x.spin == y.spin
        and np.array_equal(x.atomic_numbers, y.atomic_numbers) and np.array_equal(x.positions, y.positions)
        for x, y in zip(a, b))


def train(run_dir: str, config: RunConfig, max_steps: int, time_budget: float | None = None,
          progress: bool = True, problem: Problem | None = None) -> TrainResult:
    """The HF fit (``config.vmc.hf_fit_steps``), then VMC to ``max_steps`` optimisation steps or
    ``time_budget`` seconds (both phases together); resume whatever ``run_dir`` holds. A
    different configuration in an existing run directory is rejected. ``problem``: a
    :class:`Problem` of ``config`` on :func:`run_systems` built before (its compiled functions
    are reused)."""
    run = run_directory(run_dir)
    run.check(config.to_record())
    if config.init_from is not None and os.path.abspath(config.init_from) == os.path.abspath(run_dir):
        raise InputError("a fine-tuning run needs its own run directory, not the base model's")
    phase_options = dict(time_budget=time_budget, started=time.perf_counter(), progress=progress)
    with runs.precision(config.vmc.float64):
        system_set = run_systems(run_dir, config)
        if problem is not None and (problem.config != config or not same_systems(problem.system_set, system_set)):
            raise ValueError("the problem was built for another configuration or other systems than the "
                             "run's; build it from run_systems(run_dir, config)")
        if config.init_from is not None:
            from vmc.evaluate import load_model

            load_model(config.init_from)  # a missing or unreadable base fails before any output
        devices = WalkerParallel()
        devices.check_walkers(config.vmc.n_walkers)
        if problem is None:
            problem = Problem.build(config, system_set, progress)  # orbitals before anything is written
        run.claim(config.to_record())
        if not os.path.exists(os.path.join(run_dir, SYSTEMS_FILE)) and distributed.is_writer():
            system_sets.write_system_set(os.path.join(run_dir, SYSTEMS_FILE), system_set)
        start, stopped, updates = None, "max_steps", None
        try:
            if run.latest_step("vmc") is None:
                # VMC's updates compile alongside the HF fit.
                if max_steps > 0 and compiling.can_compile_ahead():
                    updates = _compile_vmc_updates(problem, devices)
                start, stopped = fit_hartree_fock(run, problem, devices, phase_options)
            vmc_steps = 0
            if stopped == "max_steps":
                state, stopped = run_vmc(run, problem, devices, start, max_steps, phase_options, updates)
                vmc_steps = int(state.step)
        finally:
            # Also on Ctrl-C or a stop during the HF fit: a process that exits while another
            # thread is inside XLA crashes (SIGSEGV) instead of exiting with its code.
            if updates is not None:
                updates.wait()
        plot_energies(run_dir, {s.name: exact_energy(s) for s in system_set})
    energies, visits = recent_energies(run.read_log("vmc"))
    return TrainResult(hf_fit_steps=run.latest_step("hf_fit") or 0, steps=vmc_steps, stopped_because=stopped,
                       energies=energies, visits=visits, seconds=time.perf_counter() - phase_options["started"])


def energy_traces(entries: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per system, (VMC steps that visited it, its energy at those steps) from VMC log entries."""
    traces: dict[str, tuple[list, list]] = {}
    for entry in entries:
        for name, energy in zip(entry["systems"], entry["energy"]):
            steps, energies = traces.setdefault(name, ([], []))
            steps.append(entry["step"])
            energies.append(energy)
    return {name: (np.asarray(s), np.asarray(e)) for name, (s, e) in traces.items()}


def recent_energies(entries: list[dict]) -> tuple[dict, dict]:
    """(per system: the mean energy of its last 10 % of visits, at least one; per system: its
    visits) from VMC log entries."""
    traces = energy_traces(entries)
    return ({name: float(np.mean(e[-max(1, len(e) // 10):])) for name, (_, e) in traces.items()},
            {name: len(e) for name, (_, e) in traces.items()})


def plot_energies(run_dir: str, references: dict[str, float | None], max_lines: int = 12) -> None:
    """energy.png: each system's energy (running mean over its visits) against the step, and
    its exact energy as a dashed line where ``references`` knows it."""
    traces = energy_traces(run_directory(run_dir).read_log("vmc"))
    if not traces:
        return
    fig, ax = runs.figure(7, 4.5)
    values = []
    for color, (name, (steps, energies)) in enumerate(list(traces.items())[:max_lines]):
        window, smooth = runs.running_mean(energies)
        ax.plot(steps[window - 1:], smooth, lw=1, color=f"C{color % 10}", label=name)
        values.append(energies)
        if references.get(name) is not None:
            ax.axhline(references[name], color=f"C{color % 10}", ls="--", lw=1,
                       label=f"{name} exact {references[name]:.5f}")
            values.append([references[name]])
    low, high = np.percentile(np.concatenate(values), [1, 99])
    ax.set_ylim(low - 0.05 * (high - low) - 1e-3, high + 0.05 * (high - low) + 1e-3)
    ax.set_xlabel("VMC step")
    ax.set_ylabel("energy (hartree), running mean over visits")
    ax.legend(fontsize="small", ncol=2)
    runs.save_figure(fig, os.path.join(run_dir, "energy.png"))
