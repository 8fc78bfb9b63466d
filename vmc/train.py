"""Training a transferable wavefunction on one system: supervised pretraining to the
Hartree-Fock orbitals, then variational Monte Carlo with KFAC (or Adam).

Pretraining fits the neural orbital matrices [phi_k^d(r_i)] of every determinant d to the HF
orbital matrix (spin-up electrons x spin-up orbitals and spin-down x spin-down blocks, zero
spin-mixing blocks) by least squares, with Adam, on walkers sampled from the HF density
|det Phi_up|^2 |det Phi_down|^2. VMC then starts from the pretrained parameters with the walkers
re-equilibrated under the network (burn-in), and alternates one MCMC call (``mcmc_steps``
Metropolis steps) and one optimiser step on the fresh walkers.

A run directory holds ``config.json`` (system, ansatz, sampling and optimiser settings),
``log.jsonl`` (one JSON object per step, ``"phase": "pretrain"`` or ``"vmc"``),
``energy.png`` (VMC energy against step) and orbax checkpoints in ``checkpoints/pretrain`` and
``checkpoints/vmc``. Each checkpoint holds the whole state: parameters, optimiser state,
walkers with their step size, the PRNG key and the step, so running again on the same
directory continues exactly where the last checkpoint was written (log lines written after it
are dropped). Walkers are split over all local devices (data parallel through ``jax.sharding``;
the same code runs multi-host after ``jax.distributed.initialize()``).

Non-finite values are never averaged: walkers whose position or log|psi| is not finite are
replaced by copies of finite walkers (counted as ``n_walkers_reset``), local energies that are
not finite are left out of the energy and gradient (counted as ``n_nonfinite``), and a step
whose energy or new parameters are not finite, or where more than half of the local energies
are not finite, stops the run with :class:`TrainingDiverged`, keeping the last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from phisnet_jax import checkpoints, parallel
from phisnet_jax.errors import InputError
from phisnet_jax.orbital_features import FeatureSlots
from vmc import ansatz, hamiltonian, loss, mcmc, optimizers, orbitals, systems
from vmc.references import exact_energy

OPTIMIZERS = ("kfac", "adam")
# A step where more than this fraction of local energies is not finite is treated as diverged.
MAX_NONFINITE_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class SystemConfig:
    """Which system, and the Hartree-Fock calculation its orbital features come from.

    Attributes:
      spec: a name (``H2``, ``LiH``, ``H6``, ``Be``, ...) or an XYZ file (angstrom); see
        :func:`vmc.systems.load`.
      charge, spin: total charge and 2S (None: the default of :func:`vmc.systems.load`).
      basis: minimal basis of the HF orbitals (pyscf name).
      localization: "boys" or None (canonical orbitals).
    """

    spec: str
    charge: int = 0
    spin: int | None = None
    basis: str = orbitals.DEFAULT_BASIS
    localization: str | None = "boys"


@dataclasses.dataclass(frozen=True)
class VMCConfig:
    """Sampling, pretraining and VMC settings (defaults: the reference recipe).

    Attributes:
      n_walkers: walkers (the batch of every step); must divide evenly over the devices.
      mcmc_steps: Metropolis steps between two optimiser steps.
      burn_in_sweeps: MCMC calls of ``mcmc_steps`` steps before VMC starts (and before
        pretraining, on the HF density).
      initial_step_size: bohr, of the Gaussian proposals (then adapted to 50 % acceptance).
      walker_init_width: bohr, spread of the starting walkers around their atoms.
      pretrain_steps: supervised steps towards the HF orbitals (0 to skip).
      pretrain_learning_rate: Adam's rate during pretraining.
      optimizer: "kfac" or "adam".
      laplacian: "folx" (forward Laplacian) or "hessian" (reference loop).
      clip_scale: local energies clipped at median +- clip_scale x mean absolute deviation
        for the gradient.
      checkpoint_every: steps between checkpoints (also written at the end of every run).
      seed: PRNG seed of parameters, walkers and sampling.
      float64: run in double precision.
    """

    n_walkers: int = 2048
    mcmc_steps: int = 40
    burn_in_sweeps: int = 50
    initial_step_size: float = 0.2
    walker_init_width: float = 1.0
    pretrain_steps: int = 1000
    pretrain_learning_rate: float = 3e-4
    optimizer: str = "kfac"
    laplacian: str = "folx"
    clip_scale: float = loss.DEFAULT_CLIP_SCALE
    checkpoint_every: int = 500
    seed: int = 0
    float64: bool = False

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.laplacian not in hamiltonian.METHODS:
            raise InputError(f"unknown laplacian {self.laplacian!r}; expected one of {hamiltonian.METHODS}")
        if self.n_walkers < 2 or self.mcmc_steps < 1 or self.burn_in_sweeps < 0 or self.pretrain_steps < 0:
            raise InputError("n_walkers >= 2, mcmc_steps >= 1, burn_in_sweeps >= 0 and pretrain_steps >= 0 needed")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run is defined by; stored as ``config.json``."""

    system: SystemConfig
    ansatz: ansatz.AnsatzConfig = ansatz.AnsatzConfig()
    vmc: VMCConfig = VMCConfig()
    kfac: optimizers.KFACConfig = optimizers.KFACConfig()
    adam: optimizers.AdamConfig = optimizers.AdamConfig()

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "RunConfig":
        return cls(system=SystemConfig(**record["system"]), **model_sections(record))


def model_sections(record: dict) -> dict:
    """The network, sampling and optimiser sections of a stored run configuration (shared by
    one-system and shared runs), as their dataclasses."""
    ansatz_record = dict(record["ansatz"])
    ansatz_record["slots"] = FeatureSlots(tuple(ansatz_record["slots"]["channels"]))
    # Models stored before these options existed were trained without them.
    ansatz_record.setdefault("smooth_distance_features", False)
    ansatz_record.setdefault("atom_messages", False)
    ansatz_record.setdefault("local_pooling", False)
    return dict(
        ansatz=ansatz.AnsatzConfig(**ansatz_record),
        vmc=VMCConfig(**record["vmc"]),
        kfac=optimizers.KFACConfig(**record["kfac"]),
        adam=optimizers.AdamConfig(**record["adam"]),
    )


PRESET_NAMES = ("paper", "small", "tiny")


def preset_config(name: str, system: SystemConfig, **vmc_settings) -> RunConfig:
    """A named configuration for ``system``; ``vmc_settings`` override :class:`VMCConfig` fields
    (presets: :func:`preset_settings`)."""
    network, sampling, kfac = preset_settings(name, **vmc_settings)
    return RunConfig(system=system, ansatz=network, vmc=sampling, kfac=kfac)


def preset_settings(name: str, **vmc_settings) -> tuple[ansatz.AnsatzConfig, VMCConfig, optimizers.KFACConfig]:
    """The network, sampling and KFAC settings of a named preset; ``vmc_settings`` override
    :class:`VMCConfig` fields.

    - ``paper``: the reference network and recipe (2048 walkers, 40 Metropolis steps per
      update, KFAC damping decaying from 1 to 2e-3 over ~5000-step time constants: made for
      runs of 10^5 steps).
    - ``small``: a CPU-sized network with 256 walkers and 10 Metropolis steps, and FermiNet's
      constant KFAC damping 1e-3, which suits runs of a few thousand steps (on H2 it reaches the
      energy plateau within 250 steps, where the decaying damping needs about 1000).
    - ``tiny``: for tests; the Hessian-loop Laplacian, which compiles in about half the time
      of folx's at these sizes and is as fast to run.
    """
    if name == "paper":
        network, sampling, kfac = ansatz.AnsatzConfig(), {}, {}
    elif name == "small":
        network = ansatz.small_config()
        sampling = dict(n_walkers=256, mcmc_steps=10, burn_in_sweeps=20, pretrain_steps=200,
                        checkpoint_every=200)
        kfac = dict(damping=1e-3, min_damping=1e-3)
    elif name == "tiny":
        network = ansatz.small_config(n_determinants=1, embedding_layers=1, gnn_iterations=1)
        sampling = dict(n_walkers=32, mcmc_steps=5, burn_in_sweeps=4, pretrain_steps=10,
                        checkpoint_every=50, laplacian="hessian")
        kfac = {}
    else:
        raise InputError(f"unknown preset {name!r}; expected one of {PRESET_NAMES}")
    return network, VMCConfig(**{**sampling, **vmc_settings}), optimizers.KFACConfig(**kfac)


def load_run_config(run_dir: str) -> RunConfig:
    return read_config(run_dir, RunConfig.from_record)


def read_config(run_dir: str, from_record):
    """``from_record`` of the run directory's config.json; InputError if it is missing or
    does not parse."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"{run_dir} is not a VMC run directory (no config.json)")
    try:
        with open(path) as f:
            return from_record(json.load(f))
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"corrupt run configuration {path}: {exc}") from None


class TrainingDiverged(RuntimeError):
    """Energies or parameters became non-finite; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
    """The whole state of one phase (a pytree, saved whole by orbax).

    Attributes:
      step: scalar int32, steps done in this phase.
      params: wavefunction parameters.
      opt_state: optimiser state (optax Adam in pretraining; KFAC or Adam in VMC).
      sampler: walkers (n_walkers, n_electrons, 3) bohr, their log|psi| and the step size.
      key: PRNG key of the next step.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    sampler: mcmc.MCMCState
    key: jax.Array


def precision(cfg: VMCConfig):
    """float64 (jax's x64 mode) for the duration of a block when the run asks for it."""
    return jax.enable_x64(True) if cfg.float64 else contextlib.nullcontext()


def float_dtype(cfg: VMCConfig):
    return jnp.float64 if cfg.float64 else jnp.float32


class WalkerParallel(parallel.FirstAxisSharding):
    """Walkers split over all devices along axis 0; everything else replicated."""

    def __init__(self):
        super().__init__("walkers")

    def place(self, state: TrainState) -> TrainState:
        """The state with walkers (and their log|psi|) sharded and everything else replicated."""
        walkers, log_psi = self.put_split((state.sampler.walkers, state.sampler.log_psi))
        rest = self.replicate(state.replace(sampler=state.sampler.replace(walkers=None, log_psi=None)))
        return rest.replace(sampler=rest.sampler.replace(walkers=walkers, log_psi=log_psi))


@dataclasses.dataclass(eq=False)
class Problem:
    """The system with its HF orbitals and the functions every phase needs."""

    config: RunConfig
    system: systems.System
    hartree_fock: orbitals.HartreeFockOrbitals
    inputs: ansatz.AnsatzInputs
    log_psi: Any  # fn(params, electrons (n_el, 3)) -> log|psi|

    @classmethod
    def build(cls, config: RunConfig) -> "Problem":
        """Load the system and run Hartree-Fock (call inside :func:`precision`)."""
        s = config.system
        system = systems.load(s.spec, charge=s.charge, spin=s.spin)
        hf = orbitals.hartree_fock(system, basis=s.basis, localization=s.localization)
        inputs = ansatz.inputs_from_hartree_fock(hf, config.ansatz)
        inputs = jax.tree.map(lambda x: x.astype(float_dtype(config.vmc)) if jnp.issubdtype(x.dtype, jnp.floating) else x, inputs)
        return cls(config, system, hf, inputs, ansatz.make_log_psi(config.ansatz, inputs).log_psi)

    def init_params(self, key):
        params = ansatz.init_params(key, self.config.ansatz, self.inputs)
        return jax.tree.map(lambda x: x.astype(float_dtype(self.config.vmc)), params)

    def init_walkers(self, key, n_walkers: int | None = None):
        """Starting walkers (n_walkers, n_electrons, 3) bohr; default: the run's number."""
        cfg = self.config.vmc
        return mcmc.init_walkers(
            key, self.system.positions, self.system.charges, self.system.n_up, self.system.n_down,
            n_walkers or cfg.n_walkers, width=cfg.walker_init_width, dtype=float_dtype(cfg),
        )

    def hartree_fock_log_psi(self):
        """``fn(params (ignored), electrons (n_el, 3)) -> log|det Phi_up det Phi_down|`` of HF."""
        values = orbitals.make_orbital_values(self.hartree_fock)
        n_up = self.system.n_up

        def log_psi(params, electrons):
            del params
            up, down = values(electrons)
            return jnp.linalg.slogdet(up[:n_up])[1] + jnp.linalg.slogdet(down[n_up:])[1]

        return log_psi

    def pretrain_loss(self):
        """``fn(params, walkers (W, n_el, 3)) -> mean_walkers sum_d ||Phi^d - Phi_HF||^2``."""
        values = orbitals.make_orbital_values(self.hartree_fock)
        matrices = ansatz.make_orbital_matrices(self.config.ansatz)
        n_up, n_down = self.system.n_up, self.system.n_down
        inputs = self.inputs

        def target(electrons):
            up, down = values(electrons)
            dtype = up.dtype
            top = jnp.concatenate([up[:n_up], jnp.zeros((n_up, n_down), dtype)], axis=1)
            bottom = jnp.concatenate([jnp.zeros((n_down, n_up), dtype), down[n_up:]], axis=1)
            return jnp.concatenate([top, bottom], axis=0)

        def pretrain_loss(params, walkers):
            predicted = jax.vmap(matrices, in_axes=(None, 0, None))(params, walkers, inputs)
            reference = jax.vmap(target)(walkers)[:, None]
            return jnp.mean(jnp.sum((predicted - reference) ** 2, axis=(-2, -1)))

        return pretrain_loss

    @functools.cached_property
    def local_energy(self):
        """``fn(params, walkers (W, n_el, 3)) -> (W,)`` local energies, hartree."""
        dtype = float_dtype(self.config.vmc)
        return hamiltonian.make_batched_local_energy(
            self.log_psi, jnp.asarray(self.system.positions, dtype),
            jnp.asarray(self.system.charges, dtype), self.config.vmc.laplacian,
        )

    @functools.cached_property
    def optimizer(self) -> optimizers.Optimizer:
        cfg = self.config
        energy_loss = loss.make_energy_loss(self.log_psi, self.local_energy, cfg.vmc.clip_scale)
        if cfg.vmc.optimizer == "kfac":
            return optimizers.make_kfac(
                energy_loss, optimizers.make_kfac_log_psi(cfg.ansatz, self.inputs), cfg.kfac)
        return optimizers.make_adam(energy_loss, cfg.adam)

    @functools.cached_property
    def sample(self):
        """The network's sampler (:func:`make_sampler`)."""
        return make_sampler(self.log_psi, self.config.vmc.mcmc_steps)

    @functools.cached_property
    def sample_hartree_fock(self):
        """The sampler of the HF density (parameters ignored)."""
        return make_sampler(self.hartree_fock_log_psi(), self.config.vmc.mcmc_steps)

    @functools.cached_property
    def pretrain_update(self):
        """``fn(params, opt_state, walkers) -> (params, opt_state, loss)``: one Adam step of
        pretraining, jit-compiled."""
        transform = self.pretrain_transform
        value_and_grad = jax.value_and_grad(self.pretrain_loss())

        @jax.jit
        def update(params, opt_state, walkers):
            value, grads = value_and_grad(params, walkers)
            updates, opt_state = transform.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        return update

    @property
    def pretrain_transform(self):
        return optax.adam(self.config.vmc.pretrain_learning_rate)


@functools.lru_cache(maxsize=4)
def problem_for(config: RunConfig) -> Problem:
    """The :class:`Problem` of ``config``, reused within a process so that repeated runs and
    evaluations of one configuration (resumes, tests, notebooks) do not trace and compile
    again. Call inside :func:`precision` (the precision is part of ``config``)."""
    return Problem.build(config)


def make_sampler(log_psi, n_steps: int):
    """``fn(params, sampler, key) -> (sampler, acceptance, n_walkers_reset)``: refresh log|psi|
    under ``params``, ``n_steps`` Metropolis steps with step-size adaptation, then replacement
    of non-finite walkers. jit-compiled."""
    mcmc_step = mcmc.make_mcmc_step(log_psi, n_steps)

    @jax.jit
    def sample(params, sampler, key):
        key_move, key_repair = jax.random.split(key)
        sampler = mcmc.refresh(log_psi, params, sampler)
        sampler, acceptance = mcmc.advance(mcmc_step, params, sampler, key_move)
        sampler, n_reset = mcmc.replace_nonfinite_walkers(sampler, key_repair)
        return sampler, acceptance, n_reset

    return sample


# ----------------------------------------------------------------------------------------------
# Checkpoints and logs.


def _checkpoint_dir(run_dir: str, phase: str) -> str:
    return os.path.join(run_dir, "checkpoints", phase)


def restore(run_dir: str, phase: str, template) -> TrainState | None:
    """The latest checkpoint of a phase, replicated on this process's devices (None if there
    is none); ``template()`` gives shapes and dtypes, and is called only if there is one."""
    return checkpoints.restore_latest(_checkpoint_dir(run_dir, phase), template)


def restore_params(run_dir: str, phase: str, template):
    """The parameters alone from the latest checkpoint of a phase (whatever optimiser state
    it holds); ``template`` gives their structure, shapes and dtypes."""
    saved = checkpoints.restore_raw(_checkpoint_dir(run_dir, phase))["params"]
    try:
        return jax.tree.map(lambda t, x: jnp.asarray(x, t.dtype).reshape(t.shape), template, saved)
    except (ValueError, TypeError) as exc:
        raise InputError(f"the {phase} checkpoint of {run_dir} does not fit this model: "
                         f"{str(exc).splitlines()[0]}") from None


def truncate_log(path: str, phase: str, step: int) -> None:
    """Drop log lines of ``phase`` after ``step`` (written after the checkpoint resumed from),
    and every line of later phases, so a resumed run's log has no duplicates."""
    if not os.path.exists(path):
        return
    order = {"pretrain": 0, "vmc": 1}
    kept = []
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if order[entry["phase"]] < order[phase] or (entry["phase"] == phase and entry["step"] <= step):
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def read_log(run_dir: str, phase: str = "vmc") -> list[dict]:
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return [e for e in entries if e["phase"] == phase]


def plot_energy(run_dir: str, reference: float | None = None) -> None:
    """energy.png from log.jsonl: VMC energy per step and its running mean; the reference
    energy as a line when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_log(run_dir, "vmc")
    if not entries:
        return
    steps = np.array([e["step"] for e in entries])
    energy = np.array([e["energy"] for e in entries])
    window = max(1, len(energy) // 20)
    smooth = np.convolve(energy, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, energy, alpha=0.3, label="energy per step")
    ax.plot(steps[window - 1:], smooth, label=f"running mean ({window} steps)")
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label=f"reference {reference:.5f}")
    low, high = np.percentile(energy, [1, 99])
    lower = min(low, reference) if reference is not None else low
    ax.set_ylim(lower - 0.05 * (high - lower) - 1e-3, high + 0.05 * (high - lower))
    ax.set_xlabel("VMC step")
    ax.set_ylabel("energy (hartree)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "energy.png"), dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The two phases.


@dataclasses.dataclass(frozen=True)
class TrainResult:
    pretrain_steps: int
    steps: int
    stopped_because: str
    energy: float | None  # mean energy of the last up to 10 % of logged VMC steps, hartree
    seconds: float


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _fresh_pretrain_state(problem: Problem, transform) -> TrainState:
    cfg = problem.config.vmc
    key_params, key_walkers, key_run = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    params = problem.init_params(key_params)
    walkers = problem.init_walkers(key_walkers)
    sampler = mcmc.init_state(problem.hartree_fock_log_psi(), None, walkers, cfg.initial_step_size)
    return TrainState(jnp.asarray(0, jnp.int32), params, transform.init(params), sampler, key_run)


def burn_in(sample, params, state: TrainState, n_sweeps: int) -> TrainState:
    """``n_sweeps`` calls of ``sample`` (from :func:`make_sampler`) under fixed ``params``,
    taking keys from and advancing ``state.key``; parameters and optimiser state unchanged."""
    key = state.key
    sampler = state.sampler
    for _ in range(n_sweeps):
        key, key_sweep = jax.random.split(key)
        sampler, _, _ = sample(params, sampler, key_sweep)
    return state.replace(sampler=sampler, key=key)


# Scalar log entries shown next to the progress bar.
PROGRESS_KEYS = ("loss", "energy", "mean_energy", "acceptance")


class Phase:
    """Shared bookkeeping of a training phase: log file, progress bar, checkpoints, budget."""

    def __init__(self, run_dir, phase, total, time_budget, started, progress):
        from tqdm import tqdm

        self.run_dir, self.phase, self.total = run_dir, phase, total
        self.time_budget, self.started = time_budget, started
        self.manager = checkpoints.manager(_checkpoint_dir(run_dir, phase))
        self.log = open(os.path.join(run_dir, "log.jsonl"), "a")
        self.bar = tqdm(total=total, desc=phase, unit="step", file=sys.stderr,
                        disable=None if progress else True, dynamic_ncols=True)

    def out_of_time(self) -> bool:
        return self.time_budget is not None and time.perf_counter() - self.started >= self.time_budget

    def record(self, entry: dict) -> None:
        self.log.write(json.dumps({"phase": self.phase, **entry}) + "\n")
        self.log.flush()

    def save(self, state: TrainState) -> None:
        if int(state.step) != (self.manager.latest_step() or -1):
            checkpoints.save(self.manager, state, int(state.step))

    def close(self):
        self.bar.close()
        self.log.close()


def run_phase(phase: Phase, state: TrainState, step_fn, checkpoint_every: int):
    """Run ``step_fn(state) -> (state, log entry)`` until the phase's step total or the time
    budget; checkpoint periodically and on the way out (also on Ctrl-C and divergence, with the
    last good state). Returns (state, why it stopped)."""
    phase.bar.update(int(state.step))
    stopped = "max_steps"
    try:
        while int(state.step) < phase.total:
            if phase.out_of_time():
                stopped = "time_budget"
                break
            state, entry = step_fn(state)
            phase.record(entry)
            phase.bar.update(1)
            phase.bar.set_postfix({k: f"{entry[k]:.5g}" for k in PROGRESS_KEYS
                                   if isinstance(entry.get(k), (int, float))})
            if int(state.step) % checkpoint_every == 0:
                phase.save(state)
    except TrainingDiverged as exc:
        # The failed step may have consumed (donated) the last state: keep the checkpoint.
        raise TrainingDiverged(f"{exc}; the last checkpoint ({phase.phase} step "
                               f"{phase.manager.latest_step()}) is kept") from None
    except KeyboardInterrupt:
        if not is_deleted(state):
            phase.save(state)
        raise
    else:
        phase.save(state)
    finally:
        phase.close()
    return state, stopped


def is_deleted(tree) -> bool:
    """Whether any array of ``tree`` was donated to a computation (and is gone)."""
    return any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(tree))


def pretrain(run_dir: str, problem: Problem, devices: WalkerParallel, time_budget, started, progress) -> tuple[Any, TrainState | None, str]:
    """Supervised pretraining to the HF orbitals (resumable). Returns the parameters, the final
    pretraining state (walkers on the HF density) and why it stopped."""
    cfg = problem.config.vmc
    fresh = functools.partial(_fresh_pretrain_state, problem, problem.pretrain_transform)
    state = restore(run_dir, "pretrain", lambda: jax.eval_shape(fresh))
    hf_sample = problem.sample_hartree_fock
    if state is None:
        state = fresh()
        state = devices.place(state)
        state = burn_in(hf_sample, None, state, cfg.burn_in_sweeps)
    else:
        truncate_log(os.path.join(run_dir, "log.jsonl"), "pretrain", int(state.step))
        state = devices.place(state)
    if int(state.step) >= cfg.pretrain_steps:
        return state.params, state, "max_steps"
    update = problem.pretrain_update

    def step_fn(state: TrainState):
        t = time.perf_counter()
        key, key_sample = jax.random.split(state.key)
        sampler, acceptance, _ = hf_sample(None, state.sampler, key_sample)
        params, opt_state, value = update(state.params, state.opt_state, sampler.walkers)
        value = float(value)
        if not np.isfinite(value):
            raise TrainingDiverged(f"non-finite pretraining loss at step {int(state.step)}")
        new = TrainState(state.step + 1, params, opt_state, sampler, key)
        return new, {"step": int(new.step), "loss": value, "acceptance": float(acceptance),
                     "seconds": time.perf_counter() - t}

    phase = Phase(run_dir, "pretrain", cfg.pretrain_steps, time_budget, started, progress)
    state, stopped = run_phase(phase, state, step_fn, cfg.checkpoint_every)
    return state.params, state, stopped


def _fresh_vmc_state(problem: Problem, optimizer: optimizers.Optimizer, params, walkers, key) -> TrainState:
    key_opt, key_run = jax.random.split(key)
    sampler = mcmc.init_state(problem.log_psi, params, walkers, problem.config.vmc.initial_step_size)
    return TrainState(jnp.asarray(0, jnp.int32), params, optimizer.init(params, key_opt, walkers), sampler, key_run)


def run_vmc(run_dir: str, problem: Problem, devices: WalkerParallel, start: TrainState | None,
            max_steps: int, time_budget, started, progress) -> tuple[TrainState, str]:
    """VMC steps up to ``max_steps`` in all (resumable). ``start`` is the pretraining state
    (parameters and HF walkers), None when a VMC checkpoint exists."""
    cfg = problem.config.vmc
    optimizer = problem.optimizer
    sample = problem.sample

    def template():
        params = problem.init_params(jax.random.PRNGKey(0))
        walkers = problem.init_walkers(jax.random.PRNGKey(0))
        return _fresh_vmc_state(problem, optimizer, params, walkers, jax.random.PRNGKey(0))

    state = restore(run_dir, "vmc", lambda: jax.eval_shape(template))
    if state is None:
        if start is None:
            raise InputError(f"{run_dir} has no pretraining state to start VMC from")
        key_start, key_burn = jax.random.split(start.key)
        state = _fresh_vmc_state(problem, optimizer, start.params, start.sampler.walkers, key_start)
        state = devices.place(state.replace(key=key_burn))
        state = burn_in(sample, state.params, state, cfg.burn_in_sweeps)
    else:
        truncate_log(os.path.join(run_dir, "log.jsonl"), "vmc", int(state.step))
        state = devices.place(state)
    params_finite = jax.jit(all_finite)

    def step_fn(state: TrainState):
        t = time.perf_counter()
        step = int(state.step)
        key, key_sample, key_opt = jax.random.split(state.key, 3)
        sampler, acceptance, n_reset = sample(state.params, state.sampler, key_sample)
        if int(n_reset) == cfg.n_walkers:
            raise TrainingDiverged(f"no walker has a finite wavefunction at VMC step {step}")
        params, opt_state, stats = optimizer.step(state.params, state.opt_state, key_opt, sampler.walkers)
        energy, n_nonfinite = float(stats["energy"]), int(stats["n_nonfinite"])
        if not np.isfinite(energy) or n_nonfinite > MAX_NONFINITE_FRACTION * cfg.n_walkers:
            raise TrainingDiverged(f"{n_nonfinite} of {cfg.n_walkers} local energies not finite at VMC step {step}")
        if not bool(params_finite(params)):
            raise TrainingDiverged(f"non-finite parameters after VMC step {step}")
        new = TrainState(state.step + 1, params, opt_state, sampler, key)
        entry = {"step": step + 1, "energy": energy, "variance": float(stats["variance"]),
                 "acceptance": float(acceptance), "step_size": float(sampler.step_size),
                 "clipped_fraction": float(stats["clipped_fraction"]), "n_nonfinite": n_nonfinite,
                 "n_walkers_reset": int(n_reset), "learning_rate": float(stats["learning_rate"])}
        if "damping" in stats:
            entry["damping"] = float(stats["damping"])
        entry["seconds"] = time.perf_counter() - t
        return new, entry

    phase = Phase(run_dir, "vmc", max_steps, time_budget, started, progress)
    return run_phase(phase, state, step_fn, cfg.checkpoint_every)


def train(run_dir: str, config: RunConfig, max_steps: int, time_budget: float | None = None,
          progress: bool = True) -> TrainResult:
    """Pretrain (``config.vmc.pretrain_steps``) and then run VMC to ``max_steps`` steps in all,
    or until ``time_budget`` seconds (both phases together) have passed; resume whatever the
    run directory already holds. A different configuration in an existing run directory is
    rejected (use a new directory)."""
    config_path = os.path.join(run_dir, "config.json")
    if os.path.exists(config_path):
        if load_run_config(run_dir) != config:
            raise InputError(f"{run_dir} holds a run with another configuration; use a new run directory")
    started = time.perf_counter()
    with precision(config.vmc):
        problem = problem_for(config)  # validates the system and runs HF before anything is written
        devices = WalkerParallel()
        if config.vmc.n_walkers % devices.n_devices:
            raise InputError(f"{config.vmc.n_walkers} walkers do not divide over {devices.n_devices} devices")
        os.makedirs(run_dir, exist_ok=True)
        if not os.path.exists(config_path):
            with open(config_path + ".tmp", "w") as f:
                json.dump(config.to_record(), f, indent=2)
            os.replace(config_path + ".tmp", config_path)
        has_vmc = restore_step(run_dir, "vmc") is not None
        start = None
        pretrain_stopped = "max_steps"
        if not has_vmc:
            _, start, pretrain_stopped = pretrain(run_dir, problem, devices, time_budget, started, progress)
        if pretrain_stopped != "max_steps":
            state, stopped = start, pretrain_stopped
            vmc_steps = 0
        else:
            state, stopped = run_vmc(run_dir, problem, devices, start, max_steps, time_budget, started, progress)
            vmc_steps = int(state.step)
        plot_energy(run_dir, exact_energy(problem.system))
    energies = [e["energy"] for e in read_log(run_dir, "vmc")]
    tail = energies[-max(1, len(energies) // 10):] if energies else []
    return TrainResult(
        pretrain_steps=restore_step(run_dir, "pretrain") or 0, steps=vmc_steps, stopped_because=stopped,
        energy=float(np.mean(tail)) if tail else None, seconds=time.perf_counter() - started,
    )


def restore_step(run_dir: str, phase: str) -> int | None:
    """The step of the latest checkpoint of a phase, None if there is none."""
    return checkpoints.latest_step(_checkpoint_dir(run_dir, phase))
