"""Shared training: one set of wavefunction parameters over a set of molecules and geometries
(after Scherbela, Gerard and Grohs 2023), and fine-tuning of such a base model on new systems.

Every geometry keeps its own walkers, MCMC step size and clipping window (the local energies
of a step are clipped and centred per geometry, :mod:`vmc.loss`). One optimisation *step*
updates the parameters once, from ``geometries_per_step`` geometries of one composition
batched together (the reference code uses one). Which geometries: the least-visited first
until every geometry has been visited once (round-robin), then the geometry whose local
energies had the largest standard deviation at its last visit, together with the
next-largest of its composition (``schedule="spread"``, the reference's rule), except that the
least-visited lead again while one has had fewer than ``min_visit_share`` of the mean visits;
or always the least-visited (``schedule="round_robin"``). Geometries of one composition share compiled
functions (:mod:`vmc.geometries`): a set of H6 chains at ten spacings compiles one step.

Phases, as for one system (:mod:`vmc.train`): supervised pretraining of the orbitals to each
geometry's HF orbitals (round-robin), then VMC. Fine-tuning starts from the parameters of a
base run (``init_from``: every weight reused) and by default skips pretraining.

A run directory holds ``config.json``, ``systems.xyz`` (the resolved system set, read back on
resume), ``log.jsonl`` (one line per step with per-geometry lists: ``systems``, ``energy``,
``variance``, ``acceptance``, ...), ``energy.png`` and orbax checkpoints of both phases with
the whole state (parameters, optimiser state, every geometry's walkers and step size, the
schedule's statistics, PRNG key, step). Resuming continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from phisnet_jax.errors import InputError
from vmc import ansatz, geometries, loss, mcmc, optimizers, orbitals, system_sets, train
from vmc.geometries import GeometryBatch, GeometryGroup

SCHEDULES = ("spread", "round_robin")
SYSTEMS_FILE = "systems.xyz"


@dataclasses.dataclass(frozen=True)
class SystemSetConfig:
    """Which systems, and the Hartree-Fock calculations their orbital features come from.

    Attributes:
      spec: a system-set specification (:data:`vmc.system_sets.SPEC_HELP`).
      seed: seed of the random rotations and distortions of generated geometries.
      basis: minimal basis of the HF orbitals (pyscf name).
      localization: "boys" or None (canonical orbitals).
      orbitals: None for Hartree-Fock orbitals, or the run directory of a trained PhiSNet model
        whose predicted orbitals replace the SCF (:func:`vmc.orbitals.predicted_orbitals`).
    """

    spec: str
    seed: int = 0
    basis: str = orbitals.DEFAULT_BASIS
    localization: str | None = "boys"
    orbitals: str | None = None

    def orbital_source(self):
        """``fn(system) -> orbitals`` for :func:`vmc.geometries.build_groups`; None for HF."""
        if self.orbitals is None:
            return None
        from phisnet_jax.evaluate import load_trained_model

        trained = load_trained_model(self.orbitals)
        return functools.partial(orbitals.predicted_orbitals, trained=trained, basis=self.basis,
                                 localization=self.localization)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Attributes:
      geometries_per_step: geometries of one composition batched into one optimisation step
        (fewer when a composition has fewer geometries).
      schedule: "spread" (round-robin first, then the largest energy spread) or
        "round_robin" (always the least-visited geometries).
      min_visit_share: with "spread", the least-visited geometries lead again whenever one has
        had fewer than this fraction of the mean number of visits, so a set whose compositions
        differ in their typical spreads (water's local energies spread far more than
        methane's) still trains every geometry. 0: the spread alone decides (configurations
        stored before the option existed).
    """

    geometries_per_step: int = 1
    schedule: str = "spread"
    min_visit_share: float = 0.5

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.geometries_per_step < 1:
            raise InputError("geometries_per_step must be at least 1")
        if not 0.0 <= self.min_visit_share <= 1.0:
            raise InputError(f"min_visit_share must be in [0, 1], got {self.min_visit_share}")


@dataclasses.dataclass(frozen=True)
class SharedRunConfig:
    """Everything a shared run is defined by; stored as ``config.json``. ``vmc.n_walkers`` is
    per geometry. ``init_from``: the run directory of a base model whose parameters start
    this run (fine-tuning), or None."""

    systems: SystemSetConfig
    ansatz: ansatz.AnsatzConfig = ansatz.AnsatzConfig()
    vmc: train.VMCConfig = train.VMCConfig()
    kfac: optimizers.KFACConfig = optimizers.KFACConfig()
    adam: optimizers.AdamConfig = optimizers.AdamConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    init_from: str | None = None

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "SharedRunConfig":
        return cls(systems=SystemSetConfig(**record["systems"]), **train.model_sections(record),
                   schedule=ScheduleConfig(**{"min_visit_share": 0.0, **record["schedule"]}),
                   init_from=record.get("init_from"))


def preset_config(name: str, systems: SystemSetConfig, schedule: ScheduleConfig = ScheduleConfig(),
                  **vmc_settings) -> SharedRunConfig:
    """A named preset (:func:`vmc.train.preset_settings`) for a system set."""
    network, sampling, kfac = train.preset_settings(name, **vmc_settings)
    return SharedRunConfig(systems=systems, ansatz=network, vmc=sampling, kfac=kfac, schedule=schedule)


def is_shared_run(run_dir: str) -> bool:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            return "systems" in json.load(f)
    except ValueError:
        return False


def load_config(run_dir: str) -> SharedRunConfig:
    return train.read_config(run_dir, SharedRunConfig.from_record)


def finetuning_config(base_run: str, spec: str, *, set_seed: int = 0, orbitals_from: str | None = None,
                      schedule: ScheduleConfig | None = None, **vmc_settings) -> SharedRunConfig:
    """The configuration that fine-tunes the model of ``base_run`` (any single-system or shared
    run directory) on the system set ``spec`` (geometries generated with seed ``set_seed``).

    It keeps the base run's network, sampling and optimiser settings, HF basis and localisation,
    skips HF pretraining (``vmc_settings`` override any sampling setting, ``pretrain_steps``
    included), and starts from the base run's parameters. ``orbitals_from``: a PhiSNet run whose
    predicted orbitals replace the SCF. ``schedule``: default the base run's (a single-system
    base: the default schedule).
    """
    if is_shared_run(base_run):
        base = load_config(base_run)
        basis, localization, base_schedule = base.systems.basis, base.systems.localization, base.schedule
    else:
        base = train.load_run_config(base_run)
        basis, localization, base_schedule = base.system.basis, base.system.localization, ScheduleConfig()
    systems = SystemSetConfig(spec, seed=set_seed, basis=basis, localization=localization,
                              orbitals=orbitals_from and os.path.abspath(orbitals_from))
    return SharedRunConfig(
        systems=systems, ansatz=base.ansatz,
        vmc=dataclasses.replace(base.vmc, **{"pretrain_steps": 0, **vmc_settings}),
        kfac=base.kfac, adam=base.adam, schedule=schedule or base_schedule,
        init_from=os.path.abspath(base_run),
    )


def load_model(run_dir: str) -> tuple[ansatz.AnsatzConfig, Any, str]:
    """(network config, parameters, phase and step they come from) of any VMC run directory,
    single-system or shared: the latest VMC checkpoint, else the latest pretraining one."""
    cfg = load_config(run_dir) if is_shared_run(run_dir) else train.load_run_config(run_dir)
    network, vmc_cfg = cfg.ansatz, cfg.vmc
    for phase in ("vmc", "pretrain"):
        step = train.restore_step(run_dir, phase)
        if step is None:
            continue
        with train.precision(vmc_cfg):
            template = jax.eval_shape(lambda: _init_params(jax.random.PRNGKey(0), network, vmc_cfg))
            params = train.restore_params(run_dir, phase, template)
        return network, params, f"{phase} step {step}"
    raise InputError(f"{run_dir} has no checkpoint to start from")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_params(key, network: ansatz.AnsatzConfig, vmc_cfg: train.VMCConfig):
    """Parameters of ``network`` (their shapes do not depend on the molecule: H2 serves).
    Compiled: flax's initialisation run eagerly, operation by operation, is far slower."""
    from vmc import systems

    dtype = train.float_dtype(vmc_cfg)
    h2 = systems.from_name("H2")
    positions = jnp.asarray(h2.positions, dtype)
    slots = network.slots.dim
    inputs = ansatz.AnsatzInputs(positions, jnp.asarray(h2.atomic_numbers, jnp.int32),
                                 jnp.zeros((1, 2, slots), dtype), jnp.zeros((1, 2, slots), dtype))
    params = ansatz.init_params(key, network, inputs)
    return jax.tree.map(lambda x: x.astype(dtype), params)


# ----------------------------------------------------------------------------------------------
# State and schedule.


@flax.struct.dataclass
class SharedState:
    """The whole state of one phase (a pytree, saved whole by orbax).

    Attributes:
      step: scalar int32, optimisation steps done in this phase.
      params: wavefunction parameters.
      opt_state: optimiser state.
      samplers: one :class:`vmc.mcmc.MCMCState` per composition group, stacked over its
        geometries: walkers (size, W, n_el, 3) bohr, log_psi (size, W), step_size (size,).
      spread: (n_systems,) standard deviation of the local energies at each geometry's last
        visit, hartree (inf before the first visit; unused in pretraining).
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


class WalkerParallel(train.WalkerParallel):
    """Every geometry's walkers split over all devices along the walker axis; everything else
    replicated."""

    def place(self, state: SharedState) -> SharedState:
        walkers = self.put_split([(s.walkers, s.log_psi) for s in state.samplers], axis=1)
        rest = self.replicate(state.replace(
            samplers=tuple(s.replace(walkers=None, log_psi=None) for s in state.samplers)))
        samplers = tuple(s.replace(walkers=w, log_psi=v) for s, (w, v) in zip(rest.samplers, walkers))
        return rest.replace(samplers=samplers)


# ----------------------------------------------------------------------------------------------
# The problem: geometries and compiled functions.


@dataclasses.dataclass(eq=False)
class SharedProblem:
    """The system set with its HF orbitals, grouped by composition, and the functions every
    phase needs (compiled once per composition and batch size)."""

    config: SharedRunConfig
    system_set: list
    groups: list[GeometryGroup]

    @classmethod
    def build(cls, config: SharedRunConfig, system_set=None, progress: bool = True) -> "SharedProblem":
        """Load the set (unless given) and run Hartree-Fock on every system (call inside
        :func:`vmc.train.precision`)."""
        s = config.systems
        if system_set is None:
            system_set = load_systems(s.spec, seed=s.seed)
        groups = geometries.build_groups(system_set, config.ansatz, s.basis, s.localization,
                                         train.float_dtype(config.vmc), progress, s.orbital_source())
        return cls(config, list(system_set), groups)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.system_set]

    @functools.cached_property
    def functions(self) -> geometries.GeometryFunctions:
        return geometries.functions(self.config.ansatz, self.config.vmc.laplacian)

    def init_walkers(self, key, group: GeometryGroup, n_walkers: int | None = None) -> jax.Array:
        """(size, W, n_el, 3) starting walkers around each geometry's atoms."""
        cfg = self.config.vmc
        keys = jax.random.split(key, group.size)
        return jnp.stack([
            mcmc.init_walkers(k, system.positions, system.charges, system.n_up, system.n_down,
                              n_walkers or cfg.n_walkers, width=cfg.walker_init_width,
                              dtype=train.float_dtype(cfg))
            for k, system in zip(keys, group.systems)
        ])

    @functools.cached_property
    def _samplers(self) -> dict:
        return {}

    def sampler(self, group: GeometryGroup, hartree_fock: bool = False):
        """``fn(params, sampler (G stacked), rows (G,), key) -> (sampler, acceptance (G,),
        n_reset (G,))``: one MCMC call on the rows' geometries (under their HF orbitals with
        ``hartree_fock``); jit-compiled per group."""
        cache_key = (id(group), hartree_fock)
        if cache_key not in self._samplers:
            log_psi = (geometries.make_hartree_fock_log_psi(group.ao_values, group.n_up)
                       if hartree_fock else self.functions.log_psi)
            sample = train.make_sampler(log_psi, self.config.vmc.mcmc_steps)
            batched = jax.vmap(sample, in_axes=((None, 0), 0, 0))

            @jax.jit
            def run(params, sampler, rows, key):
                return batched((params, group.select(rows)), sampler, jax.random.split(key, rows.shape[0]))

            self._samplers[cache_key] = run
        return self._samplers[cache_key]

    def init_sampler(self, group: GeometryGroup, params, walkers, hartree_fock: bool = False) -> mcmc.MCMCState:
        """The stacked sampler state of every geometry of ``group`` for ``walkers`` (size, W,
        n_el, 3); jit-compiled per group."""
        cache_key = (id(group), hartree_fock, "init")
        if cache_key not in self._samplers:
            log_psi = (geometries.make_hartree_fock_log_psi(group.ao_values, group.n_up)
                       if hartree_fock else self.functions.log_psi)
            step_size = self.config.vmc.initial_step_size

            @jax.jit
            def init(params, walkers):
                return jax.vmap(lambda g, w: mcmc.init_state(log_psi, (params, g), w, step_size))(
                    group.geometries, walkers)

            self._samplers[cache_key] = init
        return self._samplers[cache_key](params, walkers)

    @functools.cached_property
    def optimizer(self) -> optimizers.Optimizer:
        cfg = self.config
        fns = self.functions
        energy_loss = loss.make_energy_loss(None, fns.local_energy, cfg.vmc.clip_scale,
                                            batched_log_psi=geometries.over_batch(fns.log_psi))
        if cfg.vmc.optimizer == "kfac":
            return optimizers.make_kfac(energy_loss, fns.kfac_log_psi, cfg.kfac,
                                        batch_size=geometries.walkers_in)
        return optimizers.make_adam(energy_loss, cfg.adam)

    @property
    def pretrain_transform(self):
        return optax.adam(self.config.vmc.pretrain_learning_rate)

    @functools.cached_property
    def _pretrain_updates(self) -> dict:
        return {}

    def pretrain_update(self, group: GeometryGroup):
        """``fn(params, opt_state, batch) -> (params, opt_state, loss)``, jitted per group."""
        if id(group) not in self._pretrain_updates:
            value_and_grad = jax.value_and_grad(
                geometries.make_pretrain_loss(self.config.ansatz, group.ao_values, group.n_up))
            transform = self.pretrain_transform

            @jax.jit
            def update(params, opt_state, batch):
                value, grads = value_and_grad(params, batch)
                updates, opt_state = transform.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, value

            self._pretrain_updates[id(group)] = update
        return self._pretrain_updates[id(group)]

    @functools.cached_property
    def local_energy(self):
        """``fn(params, batch) -> (G, W)`` local energies, jit-compiled."""
        return jax.jit(self.functions.local_energy)

    def batch(self, state: SharedState, group_index: int, rows) -> GeometryBatch:
        sampler = state.samplers[group_index]
        return GeometryBatch(sampler.walkers[rows], self.groups[group_index].select(rows))


class _SystemSetKey:
    """A system set as a dictionary key: equal when names, charges, spins, elements and
    positions are equal."""

    def __init__(self, system_set):
        self.systems = list(system_set)
        # Positions rounded far below any physical scale: a set read back from its file
        # (exact to ~1e-12 bohr) is the same set.
        self.key = tuple((s.name, s.charge, s.spin, s.atomic_numbers.tobytes(),
                          np.round(s.positions, 9).tobytes()) for s in self.systems)

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _SystemSetKey) and self.key == other.key


@functools.lru_cache(maxsize=8)
def _problem_for(config: SharedRunConfig, system_set: _SystemSetKey) -> SharedProblem:
    return SharedProblem.build(config, system_set.systems)


def problem_for(config: SharedRunConfig, system_set) -> SharedProblem:
    """The :class:`SharedProblem` of ``config`` on ``system_set``, reused within a process
    (resumes, evaluation, tests) so compiled functions are kept. Call inside
    :func:`vmc.train.precision`."""
    return _problem_for(config, _SystemSetKey(system_set))


# ----------------------------------------------------------------------------------------------
# Phases.


def _rows(group_rows) -> jax.Array:
    return jnp.asarray(group_rows, jnp.int32)


def _scatter(sampler: mcmc.MCMCState, rows, new: mcmc.MCMCState) -> mcmc.MCMCState:
    return jax.tree.map(lambda x, y: x.at[rows].set(y), sampler, new)


def _burn_in_all(problem: SharedProblem, state: SharedState, params, n_sweeps: int,
                 hartree_fock: bool) -> SharedState:
    """``n_sweeps`` MCMC calls on every geometry under fixed ``params``."""
    key = state.key
    samplers = list(state.samplers)
    for g, group in enumerate(problem.groups):
        sample = problem.sampler(group, hartree_fock)
        rows = _rows(np.arange(group.size))
        for _ in range(n_sweeps):
            key, key_sweep = jax.random.split(key)
            samplers[g], _, _ = sample(params, samplers[g], rows, key_sweep)
    return state.replace(samplers=tuple(samplers), key=key)


def _fresh_state(problem: SharedProblem, params, opt_state, key, hartree_fock: bool) -> SharedState:
    key_walkers, key_run = jax.random.split(key)
    keys = jax.random.split(key_walkers, len(problem.groups))
    samplers = tuple(problem.init_sampler(group, params, problem.init_walkers(k, group), hartree_fock)
                     for k, group in zip(keys, problem.groups))
    n = len(problem.system_set)
    dtype = train.float_dtype(problem.config.vmc)
    return SharedState(jnp.asarray(0, jnp.int32), params, opt_state, samplers,
                       jnp.full((n,), jnp.inf, dtype), jnp.zeros((n,), jnp.int32), key_run)


def _initial_params(problem: SharedProblem, key):
    """Fresh parameters, or the base model's for a fine-tuning run."""
    cfg = problem.config
    if cfg.init_from is None:
        return _init_params(key, cfg.ansatz, cfg.vmc)
    network, params, _ = load_model(cfg.init_from)
    if network != cfg.ansatz:
        raise InputError(f"the base model in {cfg.init_from} has another network configuration")
    return params


def pretrain(run_dir: str, problem: SharedProblem, devices: WalkerParallel, time_budget, started,
             progress) -> tuple[SharedState, str]:
    """Supervised pretraining to every geometry's HF orbitals, round-robin (resumable)."""
    cfg = problem.config.vmc
    transform = problem.pretrain_transform

    def fresh(initial_params):
        key_params, key = jax.random.split(jax.random.PRNGKey(cfg.seed))
        params = initial_params(key_params)
        return _fresh_state(problem, params, transform.init(params), key, hartree_fock=True)

    # The template needs shapes only: no base model is read for it.
    template = functools.partial(fresh, lambda k: _init_params(k, problem.config.ansatz, cfg))
    state = train.restore(run_dir, "pretrain", lambda: jax.eval_shape(template))
    if state is None:
        state = devices.place(fresh(functools.partial(_initial_params, problem)))
        state = _burn_in_all(problem, state, state.params, cfg.burn_in_sweeps, hartree_fock=True)
    else:
        train.truncate_log(os.path.join(run_dir, "log.jsonl"), "pretrain", int(state.step))
        state = devices.place(state)
    if int(state.step) >= cfg.pretrain_steps:
        return state, "max_steps"

    def step_fn(state: SharedState):
        t = time.perf_counter()
        g, rows = choose_geometries(state.spread, state.visits, problem.groups,
                                    problem.config.schedule.geometries_per_step, by_spread=False)
        group, rows = problem.groups[g], _rows(rows)
        key, key_sample = jax.random.split(state.key)
        picked = jax.tree.map(lambda x: x[rows], state.samplers[g])
        picked, acceptance, _ = problem.sampler(group, hartree_fock=True)(None, picked, rows, key_sample)
        batch = GeometryBatch(picked.walkers, group.select(rows))
        params, opt_state, value = problem.pretrain_update(group)(state.params, state.opt_state, batch)
        value = float(value)
        if not np.isfinite(value):
            raise train.TrainingDiverged(f"non-finite pretraining loss at step {int(state.step)}")
        members = np.asarray(group.members)[np.asarray(rows)]
        samplers = list(state.samplers)
        samplers[g] = _scatter(samplers[g], rows, picked)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            samplers=tuple(samplers), visits=state.visits.at[members].add(1), key=key)
        return new, {"step": int(new.step), "systems": [problem.names[i] for i in members],
                     "loss": value, "acceptance": np.asarray(acceptance).tolist(),
                     "seconds": time.perf_counter() - t}

    phase = train.Phase(run_dir, "pretrain", cfg.pretrain_steps, time_budget, started, progress)
    return train.run_phase(phase, state, step_fn, cfg.checkpoint_every)


def _fresh_vmc_state(problem: SharedProblem, params, samplers, key) -> SharedState:
    """VMC state from ``params`` and walkers ``samplers`` (log|psi| recomputed for the network)."""
    key_opt, key_run = jax.random.split(key)
    samplers = tuple(problem.init_sampler(g, params, s.walkers) for g, s in zip(problem.groups, samplers))
    # KFAC is initialised on a batch shaped like the first group's steps.
    first = problem.groups[0]
    rows = _rows(np.arange(min(problem.config.schedule.geometries_per_step, first.size)))
    example = GeometryBatch(samplers[0].walkers[rows], first.select(rows))
    opt_state = problem.optimizer.init(params, key_opt, example)
    n = len(problem.system_set)
    return SharedState(jnp.asarray(0, jnp.int32), params, opt_state, samplers,
                       jnp.full((n,), jnp.inf, train.float_dtype(problem.config.vmc)),
                       jnp.zeros((n,), jnp.int32), key_run)


def run_vmc(run_dir: str, problem: SharedProblem, devices: WalkerParallel, start: SharedState | None,
            max_steps: int, time_budget, started, progress) -> tuple[SharedState, str]:
    """Shared VMC up to ``max_steps`` optimisation steps in all (resumable); ``start`` is the
    pretraining state, None when a VMC checkpoint exists."""
    cfg = problem.config
    optimizer = problem.optimizer
    by_spread = cfg.schedule.schedule == "spread"

    def template():
        params = _init_params(jax.random.PRNGKey(0), cfg.ansatz, cfg.vmc)
        samplers = tuple(mcmc.MCMCState(problem.init_walkers(jax.random.PRNGKey(0), g), None, None)
                         for g in problem.groups)
        return _fresh_vmc_state(problem, params, samplers, jax.random.PRNGKey(0))

    state = train.restore(run_dir, "vmc", lambda: jax.eval_shape(template))
    if state is None:
        if start is None:
            raise InputError(f"{run_dir} has no pretraining state to start VMC from")
        key_start, key_burn = jax.random.split(start.key)
        state = _fresh_vmc_state(problem, start.params, start.samplers, key_start)
        state = devices.place(state.replace(key=key_burn))
        state = _burn_in_all(problem, state, state.params, cfg.vmc.burn_in_sweeps, hartree_fock=False)
    else:
        train.truncate_log(os.path.join(run_dir, "log.jsonl"), "vmc", int(state.step))
        state = devices.place(state)
    all_finite = jax.jit(train.all_finite)
    n_walkers = cfg.vmc.n_walkers

    def step_fn(state: SharedState):
        t = time.perf_counter()
        step = int(state.step)
        g, rows = choose_geometries(state.spread, state.visits, problem.groups,
                                    cfg.schedule.geometries_per_step, by_spread,
                                    cfg.schedule.min_visit_share)
        group, rows = problem.groups[g], _rows(rows)
        members = np.asarray(group.members)[np.asarray(rows)]
        names = [problem.names[i] for i in members]
        key, key_sample, key_opt = jax.random.split(state.key, 3)
        picked = jax.tree.map(lambda x: x[rows], state.samplers[g])
        picked, acceptance, n_reset = problem.sampler(group)(state.params, picked, rows, key_sample)
        n_reset = np.asarray(n_reset)
        if np.any(n_reset == n_walkers):
            raise train.TrainingDiverged(f"no walker of {names[int(np.argmax(n_reset))]} has a finite "
                                         f"wavefunction at VMC step {step}")
        batch = GeometryBatch(picked.walkers, group.select(rows))
        params, opt_state, stats = optimizer.step(state.params, state.opt_state, key_opt, batch)
        energy = np.asarray(stats["energy"], np.float64)
        n_nonfinite = np.asarray(stats["n_nonfinite"])
        if not np.all(np.isfinite(energy)) or np.any(n_nonfinite > train.MAX_NONFINITE_FRACTION * n_walkers):
            raise train.TrainingDiverged(f"local energies of {names} not finite at VMC step {step} "
                                         f"({n_nonfinite.tolist()} of {n_walkers} walkers)")
        if not bool(all_finite(params)):
            raise train.TrainingDiverged(f"non-finite parameters after VMC step {step}")
        variance = np.asarray(stats["variance"], np.float64)
        samplers = list(state.samplers)
        samplers[g] = _scatter(samplers[g], rows, picked)
        new = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, samplers=tuple(samplers),
            spread=state.spread.at[members].set(jnp.sqrt(jnp.asarray(variance, state.spread.dtype))),
            visits=state.visits.at[members].add(1), key=key)
        entry = {"step": step + 1, "systems": names, "energy": energy.tolist(),
                 "mean_energy": float(energy.mean()), "variance": variance.tolist(),
                 "acceptance": np.asarray(acceptance).tolist(),
                 "step_size": np.asarray(picked.step_size).tolist(),
                 "clipped_fraction": np.asarray(stats["clipped_fraction"]).tolist(),
                 "n_nonfinite": int(n_nonfinite.sum()), "n_walkers_reset": int(n_reset.sum()),
                 "learning_rate": float(stats["learning_rate"])}
        if "damping" in stats:
            entry["damping"] = float(stats["damping"])
        entry["seconds"] = time.perf_counter() - t
        return new, entry

    phase = train.Phase(run_dir, "vmc", max_steps, time_budget, started, progress)
    return train.run_phase(phase, state, step_fn, cfg.vmc.checkpoint_every)


# ----------------------------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass(frozen=True)
class SharedResult:
    """``energies``: per system, the mean energy of its last up to 10 VMC visits (hartree);
    ``visits``: per system, VMC steps that included it."""

    pretrain_steps: int
    steps: int
    stopped_because: str
    energies: dict
    visits: dict
    seconds: float


def load_systems(spec: str, seed: int = 0) -> list:
    """A system set from a specification (:func:`vmc.system_sets.load_system_set`), or a
    one-system set from a system name or single-molecule XYZ (:func:`vmc.systems.load`)."""
    from vmc import systems as system_module

    try:
        return system_sets.load_system_set(spec, seed=seed)
    except InputError as exc:
        if not str(exc).startswith("unknown system set"):
            raise
        try:
            return [system_module.load(spec)]
        except InputError:
            raise exc from None


def run_systems(run_dir: str, config: SharedRunConfig) -> list:
    """The system set of a run: read from its ``systems.xyz`` if there is one, else built
    from ``config.systems`` (validated, nothing written)."""
    path = os.path.join(run_dir, SYSTEMS_FILE)
    if os.path.exists(path):
        return system_sets.read_system_set(path)
    return load_systems(config.systems.spec, seed=config.systems.seed)


def _write_json(path: str, record: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


def train_shared(run_dir: str, config: SharedRunConfig, max_steps: int, time_budget: float | None = None,
                 progress: bool = True) -> SharedResult:
    """Pretrain to HF (``config.vmc.pretrain_steps``), then shared VMC to ``max_steps``
    optimisation steps or ``time_budget`` seconds; resume whatever ``run_dir`` holds. A
    different configuration in an existing run directory is rejected."""
    config_path = os.path.join(run_dir, "config.json")
    if os.path.exists(config_path) and load_config(run_dir) != config:
        raise InputError(f"{run_dir} holds a run with another configuration; use a new run directory")
    if config.init_from is not None and os.path.abspath(config.init_from) == os.path.abspath(run_dir):
        raise InputError("a fine-tuning run needs its own run directory, not the base model's")
    started = time.perf_counter()
    with train.precision(config.vmc):
        system_set = run_systems(run_dir, config)
        if config.init_from is not None:
            load_model(config.init_from)  # a missing or unreadable base fails before any output
        problem = problem_for(config, system_set)  # HF on every system before anything is written
        devices = WalkerParallel()
        if config.vmc.n_walkers % devices.n_devices:
            raise InputError(f"{config.vmc.n_walkers} walkers do not divide over {devices.n_devices} devices")
        os.makedirs(run_dir, exist_ok=True)
        if not os.path.exists(os.path.join(run_dir, SYSTEMS_FILE)):
            system_sets.write_system_set(os.path.join(run_dir, SYSTEMS_FILE), system_set)
        if not os.path.exists(config_path):
            _write_json(config_path, config.to_record())
        start, pretrain_stopped = None, "max_steps"
        if train.restore_step(run_dir, "vmc") is None:
            start, pretrain_stopped = pretrain(run_dir, problem, devices, time_budget, started, progress)
        if pretrain_stopped != "max_steps":
            stopped, vmc_steps = pretrain_stopped, 0
        else:
            state, stopped = run_vmc(run_dir, problem, devices, start, max_steps, time_budget, started, progress)
            vmc_steps = int(state.step)
        plot_energies(run_dir)
    energies, visits = _recent_energies(train.read_log(run_dir, "vmc"))
    return SharedResult(pretrain_steps=train.restore_step(run_dir, "pretrain") or 0, steps=vmc_steps,
                        stopped_because=stopped, energies=energies, visits=visits,
                        seconds=time.perf_counter() - started)


def _recent_energies(entries: list[dict], last: int = 10) -> tuple[dict, dict]:
    per_system: dict[str, list[float]] = {}
    for entry in entries:
        for name, energy in zip(entry["systems"], entry["energy"]):
            per_system.setdefault(name, []).append(energy)
    return ({name: float(np.mean(values[-last:])) for name, values in per_system.items()},
            {name: len(values) for name, values in per_system.items()})


def energy_traces(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per system, (VMC steps that visited it, its energy at those steps) from the log."""
    traces: dict[str, tuple[list, list]] = {}
    for entry in train.read_log(run_dir, "vmc"):
        for name, energy in zip(entry["systems"], entry["energy"]):
            steps, energies = traces.setdefault(name, ([], []))
            steps.append(entry["step"])
            energies.append(energy)
    return {name: (np.asarray(s), np.asarray(e)) for name, (s, e) in traces.items()}


def plot_energies(run_dir: str, max_lines: int = 12) -> None:
    """energy.png: each system's energy (running mean over its visits) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = energy_traces(run_dir)
    if not traces:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (steps, energies) in list(traces.items())[:max_lines]:
        window = max(1, len(energies) // 20)
        smooth = np.convolve(energies, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1, label=name)
    ax.set_xlabel("VMC step")
    ax.set_ylabel("energy (hartree), running mean over visits")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "energy.png"), dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Evaluation, also zero-shot (a model on systems it was not trained on).


@dataclasses.dataclass(frozen=True)
class SystemEvaluation:
    """One system's energy from fresh walkers (hartree), with a blocking error bar;
    ``reference`` is the exact energy where :mod:`vmc.references` knows it."""

    name: str
    energy: float
    error: float
    variance: float
    n_nonfinite: int
    acceptance: float
    reference: float | None


def evaluate_model(network: ansatz.AnsatzConfig, params, vmc_config: train.VMCConfig, system_set,
                   n_steps: int = 200, n_walkers: int | None = None, burn_in_sweeps: int | None = None,
                   seed: int = 1, basis: str = orbitals.DEFAULT_BASIS, localization: str | None = "boys",
                   orbitals_from: str | None = None, progress: bool = True) -> list[SystemEvaluation]:
    """Energies of the wavefunction ``params`` on every system of ``system_set``: fresh
    walkers per system, ``burn_in_sweeps`` MCMC calls, then ``n_steps`` calls each followed
    by a local-energy evaluation (all geometries of a composition at once). Sampling settings
    default to ``vmc_config``'s, the burn-in to :func:`vmc.evaluate.evaluation_burn_in`;
    ``orbitals_from`` is a PhiSNet run whose predicted orbitals replace HF
    (:class:`SystemSetConfig`)."""
    import sys

    from tqdm import tqdm

    from vmc.evaluate import blocking_error, evaluation_burn_in
    from vmc.references import exact_energy

    if n_steps < 2:
        raise InputError("evaluation needs at least 2 steps")
    cfg = dataclasses.replace(vmc_config, n_walkers=n_walkers or vmc_config.n_walkers,
                              burn_in_sweeps=evaluation_burn_in(burn_in_sweeps, vmc_config.burn_in_sweeps))
    config = SharedRunConfig(SystemSetConfig("evaluation", basis=basis, localization=localization,
                                             orbitals=orbitals_from),
                             ansatz=network, vmc=cfg)
    results: dict[int, SystemEvaluation] = {}
    with train.precision(cfg):
        problem = problem_for(config, system_set)
        devices = WalkerParallel()
        if cfg.n_walkers % devices.n_devices:
            raise InputError(f"{cfg.n_walkers} walkers do not divide over {devices.n_devices} devices")
        params = devices.replicate(params)
        key = jax.random.PRNGKey(seed)
        bar = tqdm(total=len(problem.groups) * (cfg.burn_in_sweeps + n_steps), desc="evaluate",
                   unit="call", file=sys.stderr, disable=None if progress else True, dynamic_ncols=True)
        for group in problem.groups:
            key, key_walkers = jax.random.split(key)
            sampler = problem.init_sampler(group, params, problem.init_walkers(key_walkers, group))
            sampler = devices.put_split(sampler.replace(step_size=None), axis=1).replace(
                step_size=sampler.step_size)
            sample, rows = problem.sampler(group), _rows(np.arange(group.size))
            means, variances, acceptances = [], [], []
            n_nonfinite = np.zeros(group.size, int)
            for call in range(cfg.burn_in_sweeps + n_steps):
                key, key_sample = jax.random.split(key)
                sampler, acceptance, _ = sample(params, sampler, rows, key_sample)
                bar.update(1)
                if call < cfg.burn_in_sweeps:
                    continue
                energies = np.asarray(problem.local_energy(params, GeometryBatch(sampler.walkers, group.geometries)),
                                      np.float64)
                finite = np.isfinite(energies)
                n_nonfinite += (~finite).sum(axis=1)
                means.append(np.where(finite, energies, 0).sum(1) / np.maximum(finite.sum(1), 1))
                variances.append([e[f].var() if f.any() else np.nan for e, f in zip(energies, finite)])
                acceptances.append(np.asarray(acceptance))
            means, variances = np.asarray(means), np.asarray(variances)
            for row, member in enumerate(group.members):
                system = group.systems[row]
                results[member] = SystemEvaluation(
                    name=system.name, energy=float(means[:, row].mean()),
                    error=blocking_error(means[:, row]), variance=float(np.nanmean(variances[:, row])),
                    n_nonfinite=int(n_nonfinite[row]), acceptance=float(np.mean(np.asarray(acceptances)[:, row])),
                    reference=exact_energy(system))
        bar.close()
    return [results[i] for i in range(len(system_set))]


def evaluate_run(run_dir: str, systems_spec: str | None = None, seed_systems: int = 0, **options
                 ) -> tuple[str, list[SystemEvaluation]]:
    """Evaluate the latest parameters of any VMC run directory on its own systems, or on the
    systems of ``systems_spec`` (zero-shot). Returns (where the parameters come from,
    per-system results); ``options`` go to :func:`evaluate_model`."""
    from vmc import systems as system_module

    network, params, origin = load_model(run_dir)
    if is_shared_run(run_dir):
        cfg = load_config(run_dir)
        own = run_systems(run_dir, cfg)
        basis, localization, orbitals_from = cfg.systems.basis, cfg.systems.localization, cfg.systems.orbitals
    else:
        cfg = train.load_run_config(run_dir)
        s = cfg.system
        own = [system_module.load(s.spec, charge=s.charge, spin=s.spin)]
        basis, localization, orbitals_from = s.basis, s.localization, None
    system_set = own if systems_spec is None else load_systems(systems_spec, seed=seed_systems)
    return origin, evaluate_model(network, params, cfg.vmc, system_set, basis=basis, localization=localization,
                                  orbitals_from=orbitals_from, **options)
