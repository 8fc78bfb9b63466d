"""Training PhiSNet: loss, optimiser, data-parallel steps, checkpoints and the training loop.

The recipe follows the paper: MSE + MAE on F and S, AdamW with AMSGrad (betas 0.99, 0.999),
gradient clipping at norm 1, reduce-on-plateau (halve the learning rate after 10 validations
without improvement, stop below 1e-5) and an exponential moving average of the parameters,
which is what validation, evaluation and prediction use. For a run with a fixed budget of steps
or time, ``lr_schedule="budget"`` instead decays the learning rate linearly to its minimum over
the budget (see :func:`budget_learning_rate`): a plateau rule rarely lowers it within a short
budget, and the last part of a budget is then spent at a rate too high to settle.

A model with the core-Hamiltonian head also learns H_core (MSE + MAE, like F) and can learn
energies and forces end to end: the energy is ``observables.total_energy`` of the predicted
F and H_core with the exact overlap matrix of the geometry, the forces its negative gradient
with respect to the positions (autodiff inside the loss, so the parameter gradient is a second
derivative). The energy and force
labels are the dataset's own level (``energy_source="scf"``) or CCSD(T) (``"ccsd_t"``), which
is how a model trained on Hartree-Fock matrices is fine-tuned to CCSD(T) (``init_from``: a new
run that starts from another run's EMA parameters with a fresh optimiser).

A run directory holds ``config.json`` (the resolved model, training and data configuration),
``log.jsonl`` (one JSON object per logged step or validation), ``learning_curve.png``,
``distance_ranges.json`` (interatomic distances seen in training, to flag extrapolation) and
orbax checkpoints in ``checkpoints/``. Running again on the same directory resumes exactly:
step, optimiser state, EMA, plateau state and the data order (a function of the step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from molfoundation import compiling, runs, sharding
from molfoundation.errors import InputError, TrainingDiverged
from phisnet_jax import observables
from phisnet_jax.data import HamiltonianData, SplitSpec, batch_rows, distance_ranges, load_splits
from phisnet_jax.model import (
    MoleculeInputs,
    PhiSNet,
    PhiSNetConfig,
    initial_onsite_offsets,
    make_exact_overlap,
    make_phisnet,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults are the paper's (batch size depends on the molecule)."""

    batch_size: int = 50
    learning_rate: float = 1e-3
    beta1: float = 0.99
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    ema_decay: float = 0.999
    validate_every: int = 1000
    lr_schedule: str = "plateau"  # "plateau" (the paper's) or "budget" (linear decay over the run's limits)
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    min_learning_rate: float = 1e-5
    fock_mse_weight: float = 1.0
    fock_mae_weight: float = 1.0
    overlap_mse_weight: float = 1.0
    overlap_mae_weight: float = 1.0
    core_mse_weight: float = 1.0  # H_core terms: only for a model with the core-Hamiltonian head
    core_mae_weight: float = 1.0
    energy_weight: float = 0.0  # MSE of the energy per molecule, hartree^2
    forces_weight: float = 0.0  # MSE of the force components, (hartree/bohr)^2
    energy_source: str = "scf"  # energy/force labels: "scf" (the dataset's level) or "ccsd_t"
    log_every: int = 10
    seed: int = 0
    float64: bool = False


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data a run trains on."""

    dataset: str
    molecules: tuple[str, ...] = ()
    n_train: int = 500
    n_valid: int = 500
    split_seed: int = 42


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs (a pytree, saved whole by orbax)."""

    step: jnp.ndarray
    params: Any
    ema_params: Any
    opt_state: Any
    best_valid: jnp.ndarray  # best validation loss so far (inf before the first)
    bad_validations: jnp.ndarray  # validations since the last improvement
    budget_progress: jnp.ndarray  # fraction of the budget schedule done (lr_schedule "budget")


# Settings the training loop reads and the compiled functions do not: functions made for one
# configuration serve another that differs only in these (no second compilation).
LOOP_SETTINGS = ("validate_every", "log_every", "lr_schedule", "plateau_patience", "plateau_factor",
                 "min_learning_rate")


def compiled_settings(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its loop settings at their defaults: equal for configurations whose
    :class:`TrainingFunctions` are the same."""
    return dataclasses.replace(cfg, **{name: getattr(TrainConfig, name) for name in LOOP_SETTINGS})


ENERGY_SOURCES = {"scf": ("energy", "forces"), "ccsd_t": ("ccsd_t_energy", "ccsd_t_forces")}
LR_SCHEDULES = ("plateau", "budget")


def check_settings(model_cfg: PhiSNetConfig, cfg: TrainConfig) -> None:
    """InputError for training settings that cannot work with this model."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise InputError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {cfg.lr_schedule!r}")
    if cfg.energy_source not in ENERGY_SOURCES:
        raise InputError(f"energy_source must be one of {', '.join(ENERGY_SOURCES)}, not {cfg.energy_source!r}")
    weights = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name.endswith("_weight")}
    negative = [k for k, v in weights.items() if v < 0]
    if negative:
        raise InputError(f"loss weights must not be negative: {', '.join(negative)}")
    if (cfg.energy_weight > 0 or cfg.forces_weight > 0) and not model_cfg.core_hamiltonian:
        raise InputError("energy and force losses need a model with the core-Hamiltonian head "
                         "(core_hamiltonian=true)")


def _fits_core(model_cfg: PhiSNetConfig, cfg: TrainConfig) -> bool:
    return model_cfg.core_hamiltonian and (cfg.core_mse_weight > 0 or cfg.core_mae_weight > 0)


def _needs_energy(cfg: TrainConfig) -> bool:
    return cfg.energy_weight > 0 or cfg.forces_weight > 0


def label_fields(model_cfg: PhiSNetConfig, cfg: TrainConfig) -> dict[str, str]:
    """The labels the loss uses beyond F and S: loss key -> dataset field (``data.LABEL_KINDS``)."""
    energy_field, forces_field = ENERGY_SOURCES[cfg.energy_source]
    fields = {}
    if _fits_core(model_cfg, cfg):
        fields["core_hamiltonian"] = "core_hamiltonian"
    if cfg.energy_weight > 0:
        fields["energy"] = energy_field
    if cfg.forces_weight > 0:
        fields["forces"] = forces_field
    return fields


def batch_labels(data: HamiltonianData, model_cfg: PhiSNetConfig, cfg: TrainConfig, dtype) -> dict[str, np.ndarray]:
    """The loss's ``labels`` argument for a batch: label arrays by loss key, plus ``n_occupied``."""
    labels = {key: data.labels[field].astype(dtype) for key, field in label_fields(model_cfg, cfg).items()}
    if _needs_energy(cfg):
        labels["n_occupied"] = data.n_occupied
    return labels


def padded_total_energy(fock, overlap, core_hamiltonian, ao_mask, n_occupied, charges, positions):
    """``observables.total_energy`` of one molecule padded to M AOs and N atoms, hartree.

    fock, overlap, core_hamiltonian: (M, M), zero on padded AOs; ao_mask: (M,) bool;
    n_occupied: () int, may be traced; charges: (N,) nuclear charges, 0 on padding atoms;
    positions: (N, 3) bohr. Each padded AO becomes a decoupled orbital with its own energy in
    [1, 2) hartree: above every occupied orbital of a bound molecule, so never occupied, and
    never degenerate, since degenerate levels would make eigenvector second derivatives infinite.
    """
    m = fock.shape[-1]
    pad_level = jnp.where(ao_mask, 0.0, 1.0 + jnp.arange(m, dtype=fock.dtype) / m)
    eps, coefficients = observables.roothaan(fock + jnp.diag(pad_level**2), overlap + jnp.diag(pad_level))
    occupied = (jnp.arange(m) < n_occupied).astype(fock.dtype)
    one_electron = jnp.einsum("mk,mn,nk->k", coefficients, core_hamiltonian, coefficients)
    return observables.nuclear_repulsion(charges, positions) + jnp.sum(occupied * (eps + one_electron))


def make_energy_and_forces(model: PhiSNet, with_forces: bool = True) -> Callable:
    """``f(params, inputs, n_occupied) -> (energy (n,), forces (n, N, 3) or None, outputs)``.

    For a batch of padded molecules (inputs with leading axis n, n_occupied (n,)): the model's
    energy (hartree), forces = -dE/dpositions (hartree/bohr; zero on padding atoms) and the
    model's output matrices (batched dict). The energy is ``padded_total_energy`` of the
    predicted F and H_core with the *exact* overlap matrix of the geometry (whose derivative
    dS/dR enters the forces): the predicted S is a learned approximation of a closed-form
    quantity, and an energy built on it inherits its errors. Needs the core-Hamiltonian head.
    """
    elements = np.asarray(model.config.elements, np.float64)
    exact_overlap = make_exact_overlap(model.config)

    def energy(positions, params, inputs, n_occupied):
        inputs = dataclasses.replace(inputs, positions=positions)
        out = model.apply(params, inputs)
        charges = jnp.where(inputs.atom_mask, jnp.asarray(elements, positions.dtype)[inputs.element_index], 0.0)
        e = padded_total_energy(out["fock"], exact_overlap(inputs), out["core_hamiltonian"], inputs.ao_mask,
                                n_occupied, charges, positions)
        return e, out

    if with_forces:
        value_and_grad = jax.vmap(jax.value_and_grad(energy, has_aux=True), in_axes=(0, None, 0, 0))

        def batched(params, inputs, n_occupied):
            (e, out), gradient = value_and_grad(inputs.positions, params, inputs, n_occupied)
            return e, -gradient, out
    else:
        values = jax.vmap(energy, in_axes=(0, None, 0, 0))

        def batched(params, inputs, n_occupied):
            e, out = values(inputs.positions, params, inputs, n_occupied)
            return e, None, out

    return batched


def masked_matrix_errors(pred: jnp.ndarray, ref: jnp.ndarray, ao_mask: jnp.ndarray):
    """(MSE, MAE) over the real (unpadded) matrix elements of a batch (..., M, M)."""
    mask = (ao_mask[..., :, None] & ao_mask[..., None, :]).astype(pred.dtype)
    diff = (pred - ref) * mask
    count = jnp.maximum(mask.sum(), 1.0)
    return jnp.sum(diff**2) / count, jnp.sum(jnp.abs(diff)) / count


def weighted_loss(cfg: TrainConfig, metrics: dict):
    """The training objective from the metrics of the active terms (F, S, H_core, energy, forces)."""
    total = (cfg.fock_mse_weight * metrics["fock_mse"] + cfg.fock_mae_weight * metrics["fock_mae"]
             + cfg.overlap_mse_weight * metrics["overlap_mse"] + cfg.overlap_mae_weight * metrics["overlap_mae"])
    if "core_mse" in metrics:
        total = total + cfg.core_mse_weight * metrics["core_mse"] + cfg.core_mae_weight * metrics["core_mae"]
    if "energy_mse" in metrics:
        total = total + cfg.energy_weight * metrics["energy_mse"]
    if "forces_mse" in metrics:
        total = total + cfg.forces_weight * metrics["forces_mse"]
    return total


def make_loss(model: PhiSNet, cfg: TrainConfig) -> Callable:
    """loss(params, inputs, fock, overlap, labels) -> (loss, metrics) for a batch.

    inputs: batched ``MoleculeInputs`` (n, ...); fock, overlap: (n, M, M) hartree; labels: the
    dict of ``batch_labels`` (may be omitted when only F and S are fitted). Molecules without
    any real AO (padding rows of an evaluation batch) count in no term.
    """
    batched_apply = jax.vmap(model.apply, in_axes=(None, 0))
    fit_core = _fits_core(model.config, cfg)
    energy_and_forces = make_energy_and_forces(model, with_forces=cfg.forces_weight > 0) if _needs_energy(cfg) else None

    def loss_fn(params, inputs: MoleculeInputs, fock, overlap, labels=None):
        labels = labels or {}
        if energy_and_forces is None:
            out = batched_apply(params, inputs)
        else:
            energy, forces, out = energy_and_forces(params, inputs, labels["n_occupied"])
        f_mse, f_mae = masked_matrix_errors(out["fock"], fock, inputs.ao_mask)
        s_mse, s_mae = masked_matrix_errors(out["overlap"], overlap, inputs.ao_mask)
        metrics = {"fock_mae": f_mae, "overlap_mae": s_mae, "fock_mse": f_mse, "overlap_mse": s_mse}
        if fit_core:
            metrics["core_mse"], metrics["core_mae"] = masked_matrix_errors(
                out["core_hamiltonian"], labels["core_hamiltonian"], inputs.ao_mask)
        molecules = inputs.ao_mask.any(axis=-1)
        if cfg.energy_weight > 0:
            error = jnp.where(molecules, energy - labels["energy"], 0.0)
            count = jnp.maximum(molecules.sum(), 1)
            metrics["energy_mse"] = jnp.sum(error**2) / count
            metrics["energy_mae"] = jnp.sum(jnp.abs(error)) / count
        if cfg.forces_weight > 0:
            atoms = inputs.atom_mask & molecules[:, None]
            error = jnp.where(atoms[..., None], forces - labels["forces"], 0.0)
            count = jnp.maximum(3 * atoms.sum(), 1)
            metrics["forces_mse"] = jnp.sum(error**2) / count
            metrics["forces_mae"] = jnp.sum(jnp.abs(error)) / count
        return weighted_loss(cfg, metrics), metrics

    return loss_fn


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with AMSGrad and gradient clipping; the learning rate lives in the state.

    It works on all parameters as one vector (``optax.flatten``): per array, its element-wise
    updates compiled to some 900 more kernels for the small preset's 191 arrays (its training
    step: 4976 kernels against 5906, compiled in 22.6 s against 24.4 s, steps of 72 against 77
    ms on 2 CPU cores; experiments/results/phisnet_compile_flat_optimiser_cpu.json)."""

    def build(learning_rate):
        return optax.chain(
            optax.clip_by_global_norm(cfg.grad_clip_norm),
            optax.scale_by_amsgrad(b1=cfg.beta1, b2=cfg.beta2),
            optax.add_decayed_weights(cfg.weight_decay),
            optax.scale_by_learning_rate(learning_rate),
        )

    return optax.flatten(optax.inject_hyperparams(build)(learning_rate=cfg.learning_rate))


def current_learning_rate(state: TrainState) -> float:
    return float(state.opt_state.hyperparams["learning_rate"])


def _with_learning_rate(state: TrainState, lr: float) -> TrainState:
    hyper = dict(state.opt_state.hyperparams)
    hyper["learning_rate"] = _like(lr, hyper["learning_rate"])
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def budget_progress(start: float, step: int, max_steps: int | None, elapsed: float,
                    time_budget: float | None) -> float:
    """Fraction of a run's budget done, in [0, 1]: the larger of the steps done of ``max_steps``
    (the run's step total, so a resumed run continues where it was) and, from ``start`` (the
    fraction done when this invocation began), the time ``elapsed`` of ``time_budget`` seconds
    (which a resumed invocation is granted anew, so its time covers what was left)."""
    done = start
    if max_steps:
        done = max(done, step / max_steps)
    if time_budget:
        done = max(done, start + (1.0 - start) * elapsed / time_budget)
    return min(1.0, done)


def budget_learning_rate(cfg: TrainConfig, progress: float) -> float:
    """The learning rate of ``lr_schedule="budget"``: linear from ``learning_rate`` at the start
    of the budget to ``min_learning_rate`` at its end."""
    return cfg.learning_rate + (cfg.min_learning_rate - cfg.learning_rate) * progress


def make_train_step(model: PhiSNet, cfg: TrainConfig, optimizer) -> Callable:
    loss_fn = make_loss(model, cfg)

    def train_step(state: TrainState, inputs, fock, overlap, labels=None):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, inputs, fock, overlap, labels)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Warm-up of the average: early on it follows the fast-changing weights closely.
        t = state.step.astype(loss.dtype)
        decay = jnp.minimum(cfg.ema_decay, (1.0 + t) / (10.0 + t))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new_state, dict(metrics, loss=loss)

    return train_step


def cast_inputs(inputs: MoleculeInputs, dtype) -> MoleculeInputs:
    return MoleculeInputs(**{
        k: (np.asarray(v, dtype) if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v))
        for k, v in vars(inputs).items()
    })


def init_state(model: PhiSNet, cfg: TrainConfig, example: MoleculeInputs, optimizer,
               data: HamiltonianData | None = None, params=None, init: Callable | None = None) -> TrainState:
    """A fresh state (step 0, new optimiser).

    With ``data``, on-site scalar offsets of F (and of H_core, if the data has it) start at the
    data's means; with ``params`` (e.g. another run's), those are the starting parameters.
    ``init``: a compiled ``model.init`` to reuse (default: a new one).
    """
    if params is None:
        single = jax.tree.map(lambda a: a[0], example)
        params = (init or compiling.jit_once(model.init))(jax.random.PRNGKey(cfg.seed), single)
    else:
        params = jax.tree.map(lambda x: jnp.asarray(x, runs.float_dtype(cfg.float64)), params)
    if data is not None:
        i = data.inputs
        matrices = {"onsite_offset": data.fock}
        if model.config.core_hamiltonian and "core_hamiltonian" in data.labels:
            matrices["core_onsite_offset"] = data.labels["core_hamiltonian"]
        inner = dict(params["params"])
        for name, matrix in matrices.items():
            offsets = initial_onsite_offsets(model.config, np.asarray(i.element_index), np.asarray(i.ao_atom),
                                             np.asarray(i.ao_local), np.asarray(i.ao_mask), matrix)
            inner[name] = jnp.asarray(offsets, inner[name].dtype)
        params = {**params, "params": inner}
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),  # own buffers: the step donates both
        opt_state=optimizer.init(params),
        best_valid=jnp.asarray(np.inf, runs.float_dtype(cfg.float64)),
        bad_validations=jnp.asarray(0, jnp.int32),
        budget_progress=jnp.asarray(0.0, runs.float_dtype(cfg.float64)),
    )


def state_shapes(model: PhiSNet, cfg: TrainConfig, example: MoleculeInputs, optimizer) -> TrainState:
    """The shapes and dtypes of a fresh ``TrainState``, without compiling or running anything."""
    return jax.eval_shape(lambda ex: init_state(model, cfg, ex, optimizer, init=model.init), example)


def _config_record(model_cfg: PhiSNetConfig, train_cfg: TrainConfig, data_cfg: DataConfig) -> dict:
    return {
        "model": dataclasses.asdict(model_cfg),
        "train": dataclasses.asdict(train_cfg),
        "data": dataclasses.asdict(data_cfg),
    }


# The format of a run (config.json, the parameter layout of its checkpoints); a run directory
# of another version is refused.
SCHEMA_VERSION = 4
# The phase every log line and the checkpoints belong to.
PHASE = "train"
# [shortest, longest] distance (bohr) per element pair of the training data, written when the
# run starts (evaluate.TrainedModel.distance_ranges).
DISTANCE_RANGES_FILE = "distance_ranges.json"


def run_directory(run_dir: str) -> runs.RunDirectory:
    return runs.RunDirectory(run_dir, "phisnet", "PhiSNet training", SCHEMA_VERSION, (PHASE,))


def load_run_origin(run_dir: str) -> dict | None:
    """Where a fine-tuning run's parameters came from (``{"run_dir", "step", "parameters"}``), else None."""
    return run_directory(run_dir).read_config().get("init_from")


def _configs_from_record(record: dict) -> tuple[PhiSNetConfig, TrainConfig, DataConfig]:
    model, data = dict(record["model"]), dict(record["data"])
    model["elements"] = tuple(model["elements"])
    data["molecules"] = tuple(data["molecules"])
    return PhiSNetConfig(**model), TrainConfig(**record["train"]), DataConfig(**data)


def load_run_config(run_dir: str) -> tuple[PhiSNetConfig, TrainConfig, DataConfig]:
    return run_directory(run_dir).parse_config(_configs_from_record)


def load_ema_parameters(run_dir: str, step: int | None = None) -> tuple[PhiSNetConfig, TrainConfig, Any, int]:
    """(model config, training config, EMA parameters, step) of a run's latest checkpoint, or
    of the checkpoint of ``step``."""
    from phisnet_jax.model import make_inputs

    model_cfg, train_cfg, _ = load_run_config(run_dir)
    model = make_phisnet(model_cfg)
    # Shapes of the parameters do not depend on the molecule: a one-atom example suffices.
    example = make_inputs(model_cfg, [model_cfg.elements[0]], np.zeros((1, 3)))
    example = cast_inputs(jax.tree.map(lambda a: np.asarray(a)[None], example), runs.float_dtype(train_cfg.float64))
    with runs.precision(train_cfg.float64):
        state = restore_state(run_dir, lambda: state_shapes(model, train_cfg, example, make_optimizer(train_cfg)), step)
    if state is None:
        raise InputError(f"{run_dir} has no checkpoint to load")
    return model_cfg, train_cfg, state.ema_params, int(state.step)


def restore_state(run_dir: str, template: Callable[[], TrainState], step: int | None = None) -> TrainState | None:
    """The latest checkpoint of a run, or the one of ``step`` (None if it has none);
    ``template()`` gives shapes only and is called only when there is a checkpoint."""
    return run_directory(run_dir).restore(PHASE, template, step)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    steps: int
    stopped_because: str
    best_valid: float
    learning_rate: float
    seconds: float


class TrainingFunctions(NamedTuple):
    """Everything a training run compiles, for one model and training configuration (and those
    that differ from it only in ``LOOP_SETTINGS``). Build it once (:func:`make_training_functions`)
    and pass it to :func:`train` again to reuse what was compiled (resumed or repeated runs in
    one process)."""

    model: PhiSNet
    train_config: TrainConfig
    optimizer: optax.GradientTransformation
    init: Callable  # model.init, compiled once (molfoundation.compiling.jit_once)
    step: Callable  # jitted (state, inputs, fock, overlap, labels) -> (state, metrics); donates state
    evaluate: Callable  # make_evaluator(model, cfg, cfg.batch_size)


def make_training_functions(model_cfg: PhiSNetConfig, train_cfg: TrainConfig) -> TrainingFunctions:
    """The model, optimiser and jitted functions of a configuration."""
    model = make_phisnet(model_cfg)
    optimizer = make_optimizer(train_cfg)
    return TrainingFunctions(model, train_cfg, optimizer, compiling.jit_once(model.init),
                             jax.jit(make_train_step(model, train_cfg, optimizer), donate_argnums=(0,)),
                             make_evaluator(model, train_cfg, train_cfg.batch_size))


def train(
    run_dir: str,
    model_cfg: PhiSNetConfig,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    max_steps: int | None = None,
    time_budget: float | None = None,
    progress: bool = True,
    init_from: str | None = None,
    functions: TrainingFunctions | None = None,
) -> TrainResult:
    """Train (or resume training) in ``run_dir`` until ``max_steps``, the time budget (seconds),
    or the learning rate falls below its minimum.

    ``init_from``: another run directory; a new run then starts from the EMA parameters of its
    latest checkpoint (same model configuration required) with a fresh optimiser, saves them
    as its step-0 checkpoint (a resumed run restarts from this copy, whatever happens to the
    source run later) and records the origin in ``config.json``. A resumed fine-tuning
    run continues from its own checkpoints (``init_from`` may then be left out). ``functions``:
    :func:`make_training_functions` of these configurations, made before (reused compiled code).
    """
    check_settings(model_cfg, train_cfg)
    if train_cfg.lr_schedule == "budget" and not (max_steps or time_budget):
        raise InputError('lr_schedule "budget" needs a step limit or a time budget')
    run = run_directory(run_dir)
    record = _config_record(model_cfg, train_cfg, data_cfg)
    if init_from is not None:
        init_from = os.path.abspath(init_from)
    if run.has_config():
        stored_origin = (load_run_origin(run_dir) or {}).get("run_dir")
        if init_from is not None and init_from != stored_origin:
            raise InputError(f"{run_dir} holds a run with another configuration (started from "
                             f"{stored_origin or 'fresh parameters'}); use a new run directory")
        init_from = stored_origin
    if functions is None:
        functions = make_training_functions(model_cfg, train_cfg)
    elif functions.model.config != model_cfg or compiled_settings(functions.train_config) != compiled_settings(train_cfg):
        raise ValueError("the training functions were made for another configuration")
    model, optimizer = functions.model, functions.optimizer
    dtype = runs.float_dtype(train_cfg.float64)
    splits = load_splits(data_cfg.dataset, list(data_cfg.molecules), model_cfg,
                         SplitSpec(data_cfg.n_train, data_cfg.n_valid, data_cfg.split_seed),
                         labels=tuple(label_fields(model_cfg, train_cfg).values()))
    train_data, valid_data = splits["train"], splits["valid"]
    if len(train_data) == 0:
        raise InputError("the training split is empty")
    devices = sharding.FirstAxisSharding("data")
    if train_cfg.batch_size % devices.n_devices:
        raise InputError(f"batch size {train_cfg.batch_size} is not divisible by {devices.n_devices} devices")

    with runs.precision(train_cfg.float64):
        example = cast_inputs(train_data.inputs, dtype)
        source = None
        if init_from is not None:
            source_cfg, _, source_params, source_step = load_ema_parameters(init_from)
            if source_cfg != model_cfg:
                raise InputError(f"the model configuration differs from that of {init_from}; "
                                 "fine-tuning needs the same model")
            record["init_from"] = {"run_dir": init_from, "step": source_step, "parameters": "ema"}
            source = source_params
        run.claim(record, ignore=("init_from",))
        state = restore_state(run_dir, lambda: state_shapes(model, train_cfg, example, optimizer))
        step_ahead = None
        try:
            if state is None:
                # The step compiles while the parameters are made.
                if compiling.can_compile_ahead():
                    step_ahead = _compile_step(functions, train_cfg, devices,
                                               state_shapes(model, train_cfg, example, optimizer), train_data)
                state = init_state(model, train_cfg, example, optimizer, None if source is not None else train_data,
                                   params=source, init=functions.init)
                ranges = distance_ranges(train_data, model_cfg.elements)
                if init_from is not None:
                    ranges = _merged_ranges(ranges, read_distance_ranges(init_from))
                runs.write_json(os.path.join(run_dir, DISTANCE_RANGES_FILE), ranges)
            state = devices.replicate(state)
            if step_ahead is not None:
                step_ahead.result()
            return _loop(run, functions, train_cfg, devices, state, train_data, valid_data,
                         max_steps, time_budget, progress)
        finally:
            # Also after an error or Ctrl-C: a process that exits while another thread is
            # inside XLA crashes instead of exiting with its code.
            if step_ahead is not None:
                step_ahead.wait()


def _compile_step(functions: TrainingFunctions, cfg: TrainConfig, devices: sharding.FirstAxisSharding,
                  shapes: TrainState, train_data: HamiltonianData) -> compiling.Background:
    """Starts compiling the training step (the longest compilation of a run: about 25 s of the
    small preset on 2 CPU cores) for a stand-in state, zeros of the real state's ``shapes`` in
    its placement, and the first batch. The step is traced here; XLA compiles it in the
    returned thread while :func:`train` makes the parameters, and the run's steps find it
    compiled for exactly their arguments."""
    state = devices.replicate(jax.tree.map(jnp.zeros_like, shapes))
    batch = training_batch(train_data, 0, functions.model.config, cfg, devices)
    return compiling.compile_ahead([(functions.step, (state, *batch))])


def read_distance_ranges(run_dir: str) -> dict[str, list[float]]:
    """The interatomic distances a run was trained on: element pair ("1-8") -> [shortest,
    longest] bohr; InputError if the run's file is missing or unreadable."""
    path = os.path.join(run_dir, DISTANCE_RANGES_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def _merged_ranges(ranges: dict[str, list[float]], other: dict[str, list[float]]) -> dict[str, list[float]]:
    """Distance ranges widened by those of another run (a fine-tuned model has seen both)."""
    merged = dict(other)
    for key, (lo, hi) in ranges.items():
        old_lo, old_hi = merged.get(key, [lo, hi])
        merged[key] = [min(lo, old_lo), max(hi, old_hi)]
    return merged


def make_evaluator(model: PhiSNet, cfg: TrainConfig, batch_size: int):
    """Mean loss and MAEs over a whole dataset, in fixed-size batches (last one padded)."""
    loss_fn = jax.jit(make_loss(model, cfg))
    dtype = runs.float_dtype(cfg.float64)

    def evaluate(params, data: HamiltonianData) -> dict[str, float]:
        """Mean loss and metrics (hartree, hartree/bohr) over ``data``."""
        totals: dict[str, float] = {}
        n = len(data)
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            real = rows.size
            rows = np.concatenate([rows, np.full(batch_size - real, rows[-1])])
            part = data.take(rows)
            inputs = cast_inputs(part.inputs, dtype)
            # Padded rows repeat the last sample but carry no AOs, so they add nothing.
            inputs = MoleculeInputs(**{**vars(inputs), "ao_mask": inputs.ao_mask & (np.arange(batch_size) < real)[:, None]})
            labels = batch_labels(part, model.config, cfg, dtype)
            _, metrics = loss_fn(params, inputs, part.fock.astype(dtype), part.overlap.astype(dtype), labels)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) * real
        out = {k: v / n for k, v in totals.items()}
        out["loss"] = weighted_loss(cfg, out)
        return out

    return evaluate


def training_batch(data: HamiltonianData, step: int, model_cfg: PhiSNetConfig, cfg: TrainConfig,
                   devices: sharding.FirstAxisSharding) -> tuple:
    """The training step's batch ``step`` of ``data`` on the devices, split over them:
    (inputs, fock, overlap, labels) in the run's float dtype."""
    dtype = runs.float_dtype(cfg.float64)
    batch = data.take(batch_rows(step, len(data), cfg.batch_size, cfg.seed))
    return devices.put_split((cast_inputs(batch.inputs, dtype), batch.fock.astype(dtype), batch.overlap.astype(dtype),
                              batch_labels(batch, model_cfg, cfg, dtype)))


def _loop(run: runs.RunDirectory, functions: TrainingFunctions, cfg, devices, state, train_data, valid_data,
          max_steps, time_budget, progress) -> TrainResult:
    model, train_step, evaluate = functions.model, functions.step, functions.evaluate
    started = time.perf_counter()
    start_progress = float(state.budget_progress)

    def step_fn(state: TrainState):
        step = int(state.step)
        if cfg.lr_schedule == "budget":
            done = budget_progress(start_progress, step, max_steps, phase.elapsed(), time_budget)
            state = _with_learning_rate(state, budget_learning_rate(cfg, done))
            state = state.replace(budget_progress=_like(done, state.budget_progress))
        state, metrics = train_step(state, *training_batch(train_data, step, model.config, cfg, devices))
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss at step {step}")
        entries = []
        if (step + 1) % cfg.log_every == 0:
            entries.append({"step": step + 1, "loss": loss,
                            **{k: float(v) for k, v in metrics.items() if k.endswith("_mae")},
                            "learning_rate": current_learning_rate(state),
                            "seconds": time.perf_counter() - started})
        if (step + 1) % cfg.validate_every == 0 and len(valid_data):
            state, entry = _validate(state, evaluate, valid_data, cfg)
            entries.append({"step": step + 1, **entry, "seconds": time.perf_counter() - started})
        return state, entries

    def stop(state: TrainState) -> str | None:
        # The budget schedule ends at the minimum learning rate: its limits stop it.
        if cfg.lr_schedule == "plateau" and current_learning_rate(state) < cfg.min_learning_rate:
            return "min_learning_rate"
        return None

    phase = runs.Phase(run, PHASE, max_steps, checkpoint_every=cfg.validate_every, time_budget=time_budget,
                       started=started, progress=progress, shown=("loss", "learning_rate"))
    state, stopped = phase(state, step_fn, stop)
    plot_learning_curve(run.path)
    return TrainResult(
        steps=int(state.step), stopped_because=stopped, best_valid=float(state.best_valid),
        learning_rate=current_learning_rate(state), seconds=time.perf_counter() - started,
    )


def _validate(state: TrainState, evaluate, valid_data, cfg: TrainConfig) -> tuple[TrainState, dict]:
    """Validation of the EMA parameters and the reduce-on-plateau rule (which sets the learning
    rate of ``lr_schedule="plateau"``): (state with the new learning rate and plateau counters,
    log entry)."""
    metrics = evaluate(state.ema_params, valid_data)
    improved = metrics["loss"] < float(state.best_valid)
    best = min(metrics["loss"], float(state.best_valid))
    bad = 0 if improved else int(state.bad_validations) + 1
    lr = current_learning_rate(state)
    if bad >= cfg.plateau_patience:
        bad = 0
        if cfg.lr_schedule == "plateau":
            lr *= cfg.plateau_factor
            state = _with_learning_rate(state, lr)
    entry = {"valid_loss": metrics["loss"], **{f"valid_{k}": v for k, v in metrics.items() if k.endswith("_mae")},
             "learning_rate": lr}
    return state.replace(
        best_valid=_like(best, state.best_valid),
        bad_validations=_like(bad, state.bad_validations),
    ), entry


def _like(value, reference: jax.Array) -> jax.Array:
    """``value`` as an array of ``reference``'s dtype and sharding, so that the jitted step,
    whose cache key includes both, is not compiled again for it (made from host data, which
    every process of a multi-process run holds)."""
    return jax.make_array_from_process_local_data(reference.sharding, np.asarray(value, reference.dtype))


def plot_learning_curve(run_dir: str) -> None:
    """learning_curve.png from log.jsonl: training loss and validation MAEs (F, and energy and
    forces when trained on them) against step."""
    curves = {"valid_fock_mae": "validation MAE F (uHa)", "valid_energy_mae": "validation MAE E (uHa)",
              "valid_forces_mae": "validation MAE forces (uHa/bohr)"}
    entries = run_directory(run_dir).read_log(PHASE)
    training = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    if not training:
        return
    fig, ax = runs.figure()
    ax.semilogy(*zip(*training), label="training loss (batch)", alpha=0.7)
    validation = {key: [(e["step"], e[key] * 1e6) for e in entries if key in e] for key in curves}
    if any(validation.values()):
        ax2 = ax.twinx()
        for color, (key, label) in enumerate(curves.items(), start=1):
            if validation[key]:
                ax2.semilogy(*zip(*validation[key]), "o-", color=f"C{color}", label=label + ", EMA")
        ax2.set_ylabel("validation MAE (micro-hartree, per bohr for forces)")
        ax2.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="lower left")
    runs.save_figure(fig, os.path.join(run_dir, "learning_curve.png"))
