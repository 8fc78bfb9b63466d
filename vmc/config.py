"""The configuration of a VMC run, its presets, and where runs keep it.

One configuration type serves every run: a single system is a system set of one, so ``vmc
train H2``, ``vmc pretrain SET`` and ``vmc finetune BASE SET`` all describe their run with a
:class:`RunConfig` and train it with :func:`vmc.train.train`. A run directory stores it as
``config.json`` (schema version :data:`SCHEMA_VERSION`, see :mod:`molfoundation.runs`).

Two words that are easy to confuse: the *HF fit* is the supervised phase that fits the neural
orbitals to the Hartree-Fock orbitals before VMC (``VMCConfig.hf_fit_steps``, log phase
``hf_fit``); *pretraining* is training a base model over many systems (``vmc pretrain``), which
fine-tuning then starts from.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from molfoundation import runs
from molfoundation.errors import InputError
from molfoundation.orbital_features import FeatureSlots
from vmc import ansatz, hamiltonian, loss, optimizers, orbitals, system_sets, systems

SCHEMA_VERSION = 3
# The phases of a run, in the order they run.
PHASES = ("hf_fit", "vmc")
OPTIMIZERS = ("kfac", "adam")
SCHEDULES = ("spread", "round_robin")


@dataclasses.dataclass(frozen=True)
class SystemsConfig:
    """Which systems, and where their orbitals come from.

    Attributes:
      spec: one system (a name such as ``H2``, ``LiH``, ``H6``, or a one-molecule XYZ file in
        angstrom; :func:`vmc.systems.load`) or a system set (:data:`vmc.system_sets.SPEC_HELP`).
      charge, spin: total charge and 2S of a single system (None: its usual spin); a set
        carries its own.
      seed: seed of the random rotations and distortions of generated geometries.
      basis: minimal basis of the HF orbitals (pyscf name).
      localization: "boys" or None (canonical orbitals).
      orbitals: None for Hartree-Fock orbitals, or the run directory of a trained PhiSNet model
        whose predicted orbitals replace the SCF (:func:`vmc.orbitals.predicted_orbitals`).
    """

    spec: str
    charge: int = 0
    spin: int | None = None
    seed: int = 0
    basis: str = orbitals.DEFAULT_BASIS
    localization: str | None = "boys"
    orbitals: str | None = None

    def load(self) -> list[systems.System]:
        """The systems of ``spec``: a set, or a set of one system."""
        try:
            found = system_sets.load_system_set(self.spec, seed=self.seed)
        except InputError as exc:
            if not str(exc).startswith("unknown system set"):
                raise
            try:
                return [systems.load(self.spec, charge=self.charge, spin=self.spin)]
            except InputError as single:
                if not str(single).startswith("unknown system"):
                    raise
                raise InputError(f"{single}; or a system set: {system_sets.SPEC_HELP}") from None
        if self.charge != 0 or self.spin is not None:
            raise InputError(f"charge and spin are given per system in a system set, not for {self.spec!r}")
        return found

    def orbital_source(self):
        """``fn(system) -> orbitals`` for :func:`vmc.geometries.build_groups`."""
        if self.orbitals is None:
            return functools.partial(orbitals.hartree_fock, basis=self.basis, localization=self.localization)
        from phisnet_jax.evaluate import load_trained_model

        trained = load_trained_model(self.orbitals)
        return functools.partial(orbitals.predicted_orbitals, trained=trained, basis=self.basis,
                                 localization=self.localization)


@dataclasses.dataclass(frozen=True)
class VMCConfig:
    """Sampling, HF fit and VMC settings (defaults: the reference recipe).

    Attributes:
      n_walkers: walkers per geometry (the batch of a step on one geometry); must divide
        evenly over the devices.
      mcmc_steps: Metropolis steps between two optimiser steps.
      burn_in_sweeps: MCMC calls of ``mcmc_steps`` steps before VMC starts (and before the
        HF fit, on the HF density).
      initial_step_size: bohr, of the Gaussian proposals (then adapted to 50 % acceptance).
      walker_init_width: bohr, spread of the starting walkers around their atoms.
      hf_fit_steps: supervised steps towards the HF orbitals before VMC (0 to skip).
      hf_fit_learning_rate: Adam's rate during the HF fit.
      optimizer: "kfac" or "adam".
      laplacian: "folx" (forward Laplacian) or "hessian" (reference loop).
      folx_sparsity: folx keeps a Jacobian sparse while each entry depends on at most this
        many electron coordinates (0: dense); None: chosen by the electron count
        (:func:`vmc.hamiltonian.folx_sparsity_threshold`). Speed only: the local energies
        differ by rounding.
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
    hf_fit_steps: int = 1000
    hf_fit_learning_rate: float = 3e-4
    optimizer: str = "kfac"
    laplacian: str = "folx"
    folx_sparsity: int | None = None
    clip_scale: float = loss.DEFAULT_CLIP_SCALE
    checkpoint_every: int = 500
    seed: int = 0
    float64: bool = False

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.laplacian not in hamiltonian.METHODS:
            raise InputError(f"unknown laplacian {self.laplacian!r}; expected one of {hamiltonian.METHODS}")
        if self.folx_sparsity is not None and self.folx_sparsity < 0:
            raise InputError(f"folx_sparsity must be at least 0, got {self.folx_sparsity}")
        if self.n_walkers < 2 or self.mcmc_steps < 1 or self.burn_in_sweeps < 0 or self.hf_fit_steps < 0:
            raise InputError("n_walkers >= 2, mcmc_steps >= 1, burn_in_sweeps >= 0 and hf_fit_steps >= 0 needed")
        if self.checkpoint_every < 1:
            raise InputError("checkpoint_every must be at least 1")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Which geometries a step takes.

    Attributes:
      geometries_per_step: geometries of one composition batched into one optimisation step
        (fewer when a composition has fewer geometries).
      schedule: "spread" (round-robin first, then the largest energy spread) or
        "round_robin" (always the least-visited geometries).
      min_visit_share: with "spread", the least-visited geometries lead again whenever one has
        had fewer than this fraction of the mean number of visits, so a set whose compositions
        differ in their typical spreads (water's local energies spread far more than
        methane's) still trains every geometry. 0: the spread alone decides.
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
class RunConfig:
    """Everything a run is defined by; stored as ``config.json``. ``init_from``: the run
    directory (or shipped model name) of a base model whose parameters start this run
    (fine-tuning), or None."""

    systems: SystemsConfig
    ansatz: ansatz.AnsatzConfig = ansatz.AnsatzConfig()
    vmc: VMCConfig = VMCConfig()
    kfac: optimizers.KFACConfig = optimizers.KFACConfig()
    adam: optimizers.AdamConfig = optimizers.AdamConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    init_from: str | None = None

    def __post_init__(self):
        if self.vmc.n_walkers % self.kfac.curvature_walker_stride:
            raise InputError(f"curvature_walker_stride {self.kfac.curvature_walker_stride} does not divide "
                             f"n_walkers {self.vmc.n_walkers}")

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "RunConfig":
        network = dict(record["ansatz"])
        network["slots"] = FeatureSlots(tuple(network["slots"]["channels"]))
        return cls(systems=SystemsConfig(**record["systems"]), ansatz=ansatz.AnsatzConfig(**network),
                   vmc=VMCConfig(**record["vmc"]), kfac=optimizers.KFACConfig(**record["kfac"]),
                   adam=optimizers.AdamConfig(**record["adam"]), schedule=ScheduleConfig(**record["schedule"]),
                   init_from=record["init_from"])


def run_directory(run_dir: str) -> runs.RunDirectory:
    return runs.RunDirectory(run_dir, "vmc", "VMC", SCHEMA_VERSION, PHASES)


def load_config(run_dir: str) -> RunConfig:
    """The configuration stored in a VMC run directory."""
    return run_directory(run_dir).parse_config(RunConfig.from_record)


def model_config(run_or_name: str) -> RunConfig:
    """The configuration of a VMC run directory, or of the shipped model of that name
    (:mod:`vmc.shipped`)."""
    from vmc import shipped

    return shipped.load_config(run_or_name) if shipped.MODELS.is_shipped(run_or_name) else load_config(run_or_name)


PRESET_NAMES = ("paper", "small", "tiny")


def preset_config(name: str, systems_config: SystemsConfig, schedule: ScheduleConfig = ScheduleConfig(),
                  **vmc_settings) -> RunConfig:
    """A named preset for ``systems_config``; ``vmc_settings`` override :class:`VMCConfig` fields.

    - ``paper``: the reference network and recipe (2048 walkers, 40 Metropolis steps per
      update, KFAC damping decaying from 1 to 2e-3 over ~5000-step time constants: made for
      runs of 10^5 steps).
    - ``small``: a CPU-sized network with 256 walkers and 10 Metropolis steps, and FermiNet's
      constant KFAC damping 1e-3, which suits runs of a few thousand steps (on H2 it reaches the
      energy plateau within 250 steps, where the decaying damping needs about 1000). KFAC
      estimates its curvature from every 4th walker and inverts its factors every 4th step:
      on LiH this cuts the step from 52 to 40 ms, and after 6 minutes of training the
      evaluated error was 0.46(44) mHa against 1.73(40) mHa with the full curvature, two runs
      on one machine with sparse folx Jacobians (the latter is
      experiments/results/budget_lih_full_curvature_cpu.json).
    - ``tiny``: for tests; the Hessian-loop Laplacian, which compiles in about half the time
      of folx's at these sizes and is as fast to run.
    """
    if name == "paper":
        network, sampling, kfac = ansatz.AnsatzConfig(), {}, {}
    elif name == "small":
        network = ansatz.small_config()
        sampling = dict(n_walkers=256, mcmc_steps=10, burn_in_sweeps=20, hf_fit_steps=200, checkpoint_every=200)
        kfac = dict(damping=1e-3, min_damping=1e-3, curvature_walker_stride=4, inverse_update_period=4)
    elif name == "tiny":
        network = ansatz.small_config(n_determinants=1, embedding_layers=1, gnn_iterations=1)
        sampling = dict(n_walkers=32, mcmc_steps=5, burn_in_sweeps=4, hf_fit_steps=10, checkpoint_every=50,
                        laplacian="hessian")
        kfac = {}
    else:
        raise InputError(f"unknown preset {name!r}; expected one of {PRESET_NAMES}")
    return RunConfig(systems=systems_config, ansatz=network, vmc=VMCConfig(**{**sampling, **vmc_settings}),
                     kfac=optimizers.KFACConfig(**kfac), schedule=schedule)


def finetuning_config(base_run: str, spec: str, *, set_seed: int = 0, orbitals_from: str | None = None,
                      schedule: ScheduleConfig | None = None, **vmc_settings) -> RunConfig:
    """The configuration that fine-tunes the model of ``base_run`` (any VMC run directory, or the
    name of a shipped model) on the systems ``spec`` (geometries generated with seed ``set_seed``).

    It keeps the base run's network, sampling and optimiser settings, HF basis and localisation,
    skips the HF fit (``vmc_settings`` override any sampling setting, ``hf_fit_steps``
    included), and starts from the base run's parameters. ``orbitals_from``: a PhiSNet run whose
    predicted orbitals replace the SCF. ``schedule``: default the base run's.
    """
    from vmc import shipped

    base = model_config(base_run)
    systems_config = SystemsConfig(spec, seed=set_seed, basis=base.systems.basis,
                                   localization=base.systems.localization,
                                   orbitals=orbitals_from and os.path.abspath(orbitals_from))
    return RunConfig(
        systems=systems_config, ansatz=base.ansatz,
        vmc=dataclasses.replace(base.vmc, **{"hf_fit_steps": 0, **vmc_settings}),
        kfac=base.kfac, adam=base.adam, schedule=schedule or base.schedule,
        init_from=base_run if shipped.MODELS.is_shipped(base_run) else os.path.abspath(base_run),
    )
