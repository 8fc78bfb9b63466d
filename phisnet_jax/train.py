"""Training PhiSNet: loss, optimiser, data-parallel steps, checkpoints and the training loop.

The recipe follows the paper: MSE + MAE on F and S, AdamW with AMSGrad (betas 0.99, 0.999),
gradient clipping at norm 1, reduce-on-plateau (halve the learning rate after 10 validations
without improvement, stop below 1e-5) and an exponential moving average of the parameters,
which is what validation, evaluation and prediction use.

A run directory holds ``config.json`` (the resolved model, training and data configuration),
``log.jsonl`` (one JSON object per logged step or validation), ``learning_curve.png``,
``distance_ranges.json`` (interatomic distances seen in training, to flag extrapolation) and
orbax checkpoints in ``checkpoints/``. Running again on the same directory resumes exactly:
step, optimiser state, EMA, plateau state and the data order (a function of the step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phisnet_jax.data import HamiltonianData, SplitSpec, batch_rows, distance_ranges, load_splits
from phisnet_jax.errors import InputError
from phisnet_jax.model import MoleculeInputs, PhiSNet, PhiSNetConfig, initial_onsite_offsets, make_phisnet


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
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    min_learning_rate: float = 1e-5
    fock_mse_weight: float = 1.0
    fock_mae_weight: float = 1.0
    overlap_mse_weight: float = 1.0
    overlap_mae_weight: float = 1.0
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


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs (a pytree, saved whole by orbax)."""

    step: jnp.ndarray
    params: Any
    ema_params: Any
    opt_state: Any
    best_valid: jnp.ndarray  # best validation loss so far (inf before the first)
    bad_validations: jnp.ndarray  # validations since the last improvement


def masked_matrix_errors(pred: jnp.ndarray, ref: jnp.ndarray, ao_mask: jnp.ndarray):
    """(MSE, MAE) over the real (unpadded) matrix elements of a batch (..., M, M)."""
    mask = (ao_mask[..., :, None] & ao_mask[..., None, :]).astype(pred.dtype)
    diff = (pred - ref) * mask
    count = jnp.maximum(mask.sum(), 1.0)
    return jnp.sum(diff**2) / count, jnp.sum(jnp.abs(diff)) / count


def weighted_loss(cfg: TrainConfig, metrics: dict):
    """The training objective from the MSE and MAE of F and S."""
    return (cfg.fock_mse_weight * metrics["fock_mse"] + cfg.fock_mae_weight * metrics["fock_mae"]
            + cfg.overlap_mse_weight * metrics["overlap_mse"] + cfg.overlap_mae_weight * metrics["overlap_mae"])


def make_loss(model: PhiSNet, cfg: TrainConfig) -> Callable:
    """loss(params, inputs, fock, overlap) -> (loss, metrics) for a batch."""
    batched_apply = jax.vmap(model.apply, in_axes=(None, 0))

    def loss_fn(params, inputs: MoleculeInputs, fock, overlap):
        out = batched_apply(params, inputs)
        f_mse, f_mae = masked_matrix_errors(out["fock"], fock, inputs.ao_mask)
        s_mse, s_mae = masked_matrix_errors(out["overlap"], overlap, inputs.ao_mask)
        metrics = {"fock_mae": f_mae, "overlap_mae": s_mae, "fock_mse": f_mse, "overlap_mse": s_mse}
        return weighted_loss(cfg, metrics), metrics

    return loss_fn


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with AMSGrad and gradient clipping; the learning rate lives in the state."""

    def build(learning_rate):
        return optax.chain(
            optax.clip_by_global_norm(cfg.grad_clip_norm),
            optax.scale_by_amsgrad(b1=cfg.beta1, b2=cfg.beta2),
            optax.add_decayed_weights(cfg.weight_decay),
            optax.scale_by_learning_rate(learning_rate),
        )

    return optax.inject_hyperparams(build)(learning_rate=cfg.learning_rate)


def current_learning_rate(state: TrainState) -> float:
    return float(state.opt_state.hyperparams["learning_rate"])


def make_train_step(model: PhiSNet, cfg: TrainConfig, optimizer) -> Callable:
    loss_fn = make_loss(model, cfg)

    def train_step(state: TrainState, inputs, fock, overlap):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, inputs, fock, overlap)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Warm-up of the average: early on it follows the fast-changing weights closely.
        t = state.step.astype(loss.dtype)
        decay = jnp.minimum(cfg.ema_decay, (1.0 + t) / (10.0 + t))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new_state, dict(metrics, loss=loss)

    return train_step


class DataParallel:
    """Batch split over all devices (all hosts after ``jax.distributed.initialize()``)."""

    def __init__(self):
        self.mesh = Mesh(np.array(jax.devices()), ("data",))
        self.batch = NamedSharding(self.mesh, PartitionSpec("data"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    def put_batch(self, tree):
        """Global arrays sharded along axis 0; every process holds the same full batch."""
        n_proc, proc = jax.process_count(), jax.process_index()

        def put(x):
            x = np.asarray(x)
            local = np.array_split(x, n_proc)[proc] if n_proc > 1 else x
            return jax.make_array_from_process_local_data(self.batch, local, x.shape)

        return jax.tree.map(put, tree)

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)


def _float_dtype(cfg: TrainConfig):
    return jnp.float64 if cfg.float64 else jnp.float32


def cast_inputs(inputs: MoleculeInputs, dtype) -> MoleculeInputs:
    return MoleculeInputs(**{
        k: (np.asarray(v, dtype) if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v))
        for k, v in vars(inputs).items()
    })


def init_state(model: PhiSNet, cfg: TrainConfig, example: MoleculeInputs, optimizer,
               data: HamiltonianData | None = None) -> TrainState:
    """A fresh state; with ``data``, on-site scalar offsets start at the data's means."""
    single = jax.tree.map(lambda a: a[0], example)
    params = jax.jit(model.init)(jax.random.PRNGKey(cfg.seed), single)
    if data is not None:
        i = data.inputs
        offsets = initial_onsite_offsets(model.config, np.asarray(i.element_index), np.asarray(i.ao_atom),
                                         np.asarray(i.ao_local), np.asarray(i.ao_mask), data.fock)
        inner = dict(params["params"])
        inner["onsite_offset"] = jnp.asarray(offsets, inner["onsite_offset"].dtype)
        params = {**params, "params": inner}
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),  # own buffers: the step donates both
        opt_state=optimizer.init(params),
        best_valid=jnp.asarray(np.inf, _float_dtype(cfg)),
        bad_validations=jnp.asarray(0, jnp.int32),
    )


def state_shapes(model: PhiSNet, cfg: TrainConfig, example: MoleculeInputs, optimizer) -> TrainState:
    """The shapes and dtypes of a fresh ``TrainState``, without compiling or running anything."""
    return jax.eval_shape(lambda ex: init_state(model, cfg, ex, optimizer), example)


def _config_record(model_cfg: PhiSNetConfig, train_cfg: TrainConfig, data_cfg: DataConfig) -> dict:
    return {
        "model": dataclasses.asdict(model_cfg),
        "train": dataclasses.asdict(train_cfg),
        "data": dataclasses.asdict(data_cfg),
    }


def load_run_config(run_dir: str) -> tuple[PhiSNetConfig, TrainConfig, DataConfig]:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"{run_dir} is not a training run directory (no config.json)")
    try:
        with open(path) as f:
            record = json.load(f)
        model = record["model"]
        model["elements"] = tuple(model["elements"])
        data = record["data"]
        data["molecules"] = tuple(data["molecules"])
        return PhiSNetConfig(**model), TrainConfig(**record["train"]), DataConfig(**data)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"corrupt run configuration {path}: {exc}") from None


def _checkpoint_manager(run_dir: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )


def restore_state(run_dir: str, template: TrainState) -> TrainState | None:
    """The latest checkpoint of a run (None if it has none); ``template`` gives shapes only."""
    import orbax.checkpoint as ocp

    manager = _checkpoint_manager(run_dir)
    step = manager.latest_step()
    if step is None:
        return None
    # Restore replicated over this process's devices, whatever topology saved the checkpoint.
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), template)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as exc:
        raise InputError(f"cannot restore checkpoint {step} of {run_dir}: {str(exc).splitlines()[0]}") from None


def save_state(manager, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


@dataclasses.dataclass(frozen=True)
class TrainResult:
    steps: int
    stopped_because: str
    best_valid: float
    learning_rate: float
    seconds: float


def train(
    run_dir: str,
    model_cfg: PhiSNetConfig,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    max_steps: int | None = None,
    time_budget: float | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume training) in ``run_dir`` until ``max_steps``, the time budget (seconds),
    or the learning rate falls below its minimum."""
    os.makedirs(run_dir, exist_ok=True)
    record = _config_record(model_cfg, train_cfg, data_cfg)
    config_path = os.path.join(run_dir, "config.json")
    if os.path.exists(config_path):
        existing = load_run_config(run_dir)
        if _config_record(*existing) != record:
            raise InputError(
                f"{run_dir} holds a run with another configuration; use a new run directory"
            )
    model = make_phisnet(model_cfg)
    dtype = _float_dtype(train_cfg)
    splits = load_splits(data_cfg.dataset, list(data_cfg.molecules), model_cfg,
                         SplitSpec(data_cfg.n_train, data_cfg.n_valid, data_cfg.split_seed))
    train_data, valid_data = splits["train"], splits["valid"]
    if len(train_data) == 0:
        raise InputError("the training split is empty")
    parallel = DataParallel()
    if train_cfg.batch_size % parallel.n_devices:
        raise InputError(f"batch size {train_cfg.batch_size} is not divisible by {parallel.n_devices} devices")

    optimizer = make_optimizer(train_cfg)
    with precision(train_cfg):
        example = cast_inputs(train_data.inputs, dtype)
        state = restore_state(run_dir, state_shapes(model, train_cfg, example, optimizer))
        if state is None:
            state = init_state(model, train_cfg, example, optimizer, train_data)
            ranges_path = os.path.join(run_dir, "distance_ranges.json")
            with open(ranges_path + ".tmp", "w") as f:
                json.dump(distance_ranges(train_data, model_cfg.elements), f, indent=2)
            os.replace(ranges_path + ".tmp", ranges_path)
            with open(config_path + ".tmp", "w") as f:
                json.dump(record, f, indent=2)
            os.replace(config_path + ".tmp", config_path)
        state = parallel.replicate(state)
        return _loop(run_dir, model, train_cfg, optimizer, parallel, state, train_data, valid_data,
                     max_steps, time_budget, progress)


def precision(cfg: TrainConfig):
    """float64 (jax's x64 mode) for the duration of a block when the run asks for it."""
    return jax.enable_x64(True) if cfg.float64 else contextlib.nullcontext()


def make_evaluator(model: PhiSNet, cfg: TrainConfig, batch_size: int):
    """Mean loss and MAEs over a whole dataset, in fixed-size batches (last one padded)."""
    loss_fn = jax.jit(make_loss(model, cfg))
    dtype = _float_dtype(cfg)

    def evaluate(params, data: HamiltonianData) -> dict[str, float]:
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
            _, metrics = loss_fn(params, inputs, part.fock.astype(dtype), part.overlap.astype(dtype))
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) * real
        out = {k: v / n for k, v in totals.items()}
        out["loss"] = weighted_loss(cfg, out)
        return out

    return evaluate


def _loop(run_dir, model, cfg, optimizer, parallel, state, train_data, valid_data, max_steps, time_budget, progress):
    from tqdm import tqdm

    dtype = _float_dtype(cfg)
    step_fn = jax.jit(make_train_step(model, cfg, optimizer), donate_argnums=(0,))
    evaluate = make_evaluator(model, cfg, cfg.batch_size)
    manager = _checkpoint_manager(run_dir)
    log_path = os.path.join(run_dir, "log.jsonl")
    start_step = int(state.step)
    t0 = time.perf_counter()
    bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
               disable=None if progress else True, dynamic_ncols=True)
    stopped = "max_steps"
    last_good = state
    try:
        with open(log_path, "a") as log:
            while True:
                step = int(state.step)
                if max_steps is not None and step >= max_steps:
                    stopped = "max_steps"
                    break
                if time_budget is not None and time.perf_counter() - t0 >= time_budget:
                    stopped = "time_budget"
                    break
                if current_learning_rate(state) < cfg.min_learning_rate:
                    stopped = "min_learning_rate"
                    break
                rows = batch_rows(step, len(train_data), cfg.batch_size, cfg.seed)
                batch = train_data.take(rows)
                inputs, fock, overlap = parallel.put_batch(
                    (cast_inputs(batch.inputs, dtype), batch.fock.astype(dtype), batch.overlap.astype(dtype)))
                state, metrics = step_fn(state, inputs, fock, overlap)
                loss = float(metrics["loss"])
                if not np.isfinite(loss):
                    raise TrainingDiverged(
                        f"non-finite loss at step {step}; the last checkpoint (step "
                        f"{manager.latest_step()}) is kept"
                    )
                last_good = state
                bar.update(1)
                new_step = step + 1
                if new_step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{loss:.3e}", lr=f"{current_learning_rate(state):.1e}")
                    log.write(json.dumps({
                        "step": new_step, "loss": loss, "fock_mae": float(metrics["fock_mae"]),
                        "overlap_mae": float(metrics["overlap_mae"]),
                        "learning_rate": current_learning_rate(state),
                        "seconds": time.perf_counter() - t0,
                    }) + "\n")
                    log.flush()
                if new_step % cfg.validate_every == 0:
                    state = _validate(state, evaluate, valid_data, cfg, log, new_step, t0)
                    save_state(manager, state)
                    last_good = state
    finally:
        bar.close()
    if int(last_good.step) != (manager.latest_step() or 0):
        save_state(manager, last_good)
    plot_learning_curve(run_dir)
    return TrainResult(
        steps=int(last_good.step), stopped_because=stopped, best_valid=float(last_good.best_valid),
        learning_rate=current_learning_rate(last_good), seconds=time.perf_counter() - t0,
    )


def _validate(state, evaluate, valid_data, cfg, log, step, t0):
    if len(valid_data) == 0:
        return state
    metrics = evaluate(state.ema_params, valid_data)
    improved = metrics["loss"] < float(state.best_valid)
    best = min(metrics["loss"], float(state.best_valid))
    bad = 0 if improved else int(state.bad_validations) + 1
    lr = current_learning_rate(state)
    if bad >= cfg.plateau_patience:
        lr, bad = lr * cfg.plateau_factor, 0
    hyper = dict(state.opt_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(lr, hyper["learning_rate"].dtype)
    opt_state = state.opt_state._replace(hyperparams=hyper)
    log.write(json.dumps({
        "step": step, "valid_loss": metrics["loss"], "valid_fock_mae": metrics["fock_mae"],
        "valid_overlap_mae": metrics["overlap_mae"], "learning_rate": lr,
        "seconds": time.perf_counter() - t0,
    }) + "\n")
    log.flush()
    return state.replace(
        opt_state=opt_state,
        best_valid=jnp.asarray(best, state.best_valid.dtype),
        bad_validations=jnp.asarray(bad, jnp.int32),
    )


def plot_learning_curve(run_dir: str) -> None:
    """learning_curve.png from log.jsonl: training loss and validation F MAE against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_steps, train_loss, valid_steps, valid_mae = [], [], [], []
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            entry = json.loads(line)
            if "loss" in entry:
                train_steps.append(entry["step"])
                train_loss.append(entry["loss"])
            if "valid_fock_mae" in entry:
                valid_steps.append(entry["step"])
                valid_mae.append(entry["valid_fock_mae"] * 1e6)
    if not train_steps:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(train_steps, train_loss, label="training loss (batch)", alpha=0.7)
    if valid_steps:
        ax2 = ax.twinx()
        ax2.semilogy(valid_steps, valid_mae, "o-", color="C1", label="validation MAE F (uHa, EMA)")
        ax2.set_ylabel("validation MAE of F (micro-hartree)")
        ax2.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "learning_curve.png"), dpi=100)
    plt.close(fig)
