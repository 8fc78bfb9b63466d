"""Evaluating and using a trained PhiSNet model: loading runs, predicting, accuracy metrics.

Metrics, as defined for the PhiSNet/SchNOrb benchmarks:
- MAE of F over all matrix elements (reported in micro-hartree) and of S;
- MAE of the occupied orbital energies (lowest N_electrons / 2) of F C = S C eps, solved with the
  *reference* S for both the prediction and the reference (micro-hartree);
- psi: mean over occupied orbitals of |cosine similarity| of the coefficient vectors.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import scipy.linalg

from molfoundation import runs
from molfoundation.errors import InputError
from phisnet_jax.data import HamiltonianData, SplitSpec, load_splits, outside_distance_ranges
from phisnet_jax.model import MoleculeInputs, PhiSNet, PhiSNetConfig, make_exact_overlap, make_phisnet
from phisnet_jax.train import (
    DataConfig,
    TrainConfig,
    cast_inputs,
    load_ema_parameters,
    make_energy_and_forces,
    read_distance_ranges,
)

HARTREE_TO_MICRO = 1e6


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedModel:
    """A model with its (EMA) parameters and a jitted single-molecule apply.

    ``distance_ranges``: for each element pair ("1-8"), the [shortest, longest] interatomic
    distance (bohr) of the training data, so that predictions can tell when they extrapolate;
    None for a model that no training run describes (then no such warnings)."""

    config: PhiSNetConfig
    train_config: TrainConfig
    model: PhiSNet
    params: object
    step: int
    distance_ranges: dict[str, list[float]] | None = None

    def extrapolation_warnings(self, atomic_numbers, positions) -> list[str]:
        """The atom pairs of a geometry (positions in bohr) that lie outside the training data:
        element pairs never seen and distances outside the training range (empty if none)."""
        if self.distance_ranges is None:
            return []
        return outside_distance_ranges(atomic_numbers, positions, self.distance_ranges)

    @property
    def dtype(self):
        return runs.float_dtype(self.train_config.float64)

    @functools.cached_property
    def batched_apply(self):
        """Jitted ``(params, stacked inputs) -> matrices`` over a batch of molecules."""
        return jax.jit(jax.vmap(self.model.apply, in_axes=(None, 0)))

    @functools.cached_property
    def apply(self):
        """Jitted ``(params, inputs) -> matrices`` for one molecule, compiled once per shape."""
        return jax.jit(self.model.apply)

    @functools.cached_property
    def batched_energy_and_forces(self):
        """Jitted ``(params, stacked inputs, n_occupied (n,)) -> (energies, forces, matrices)``
        (``train.make_energy_and_forces``), for a model with the core-Hamiltonian head."""
        return jax.jit(make_energy_and_forces(self.model))

    def energy_and_forces(self, inputs: MoleculeInputs, n_occupied: int):
        """(energy hartree, forces (N, 3) hartree/bohr, output matrices) of one molecule
        (unbatched inputs in the model's dtype), through ``batched_energy_and_forces``."""
        import jax.numpy as jnp

        one = jax.tree.map(lambda x: jnp.asarray(x)[None], inputs)
        energy, forces, matrices = self.batched_energy_and_forces(self.params, one, jnp.asarray([n_occupied]))
        return float(energy[0]), np.asarray(forces[0], np.float64), jax.tree.map(lambda x: x[0], matrices)

    @functools.cached_property
    def exact_overlap(self):
        """Jitted ``inputs -> (M, M)`` exact overlap matrix of one molecule (``model.make_exact_overlap``)."""
        return jax.jit(make_exact_overlap(self.config))


def load_trained_model(run_dir: str, step: int | None = None) -> TrainedModel:
    """The EMA parameters of the latest checkpoint of a training run (or of the checkpoint of
    ``step``), with the distances it was trained on; or, where no directory ``run_dir`` exists,
    the shipped model of that name (``phisnet_jax.shipped``)."""
    from phisnet_jax import shipped

    if shipped.MODELS.is_shipped(run_dir):
        if step is not None:
            raise InputError(f"{run_dir} is a shipped model, with one set of parameters: no --checkpoint")
        return shipped.load_shipped(run_dir)
    model_cfg, train_cfg, params, step = load_ema_parameters(run_dir, step)
    return TrainedModel(model_cfg, train_cfg, make_phisnet(model_cfg), params, step, read_distance_ranges(run_dir))


def model_split(run_or_name: str, model_cfg: PhiSNetConfig, split: str | None = None, dataset: str | None = None,
                molecules: list[str] | None = None) -> tuple[HamiltonianData, str, str]:
    """(data, the dataset's path, the split) to evaluate a model on: for a training run, a split
    of its molecules as the run divided them (default "test"; ``dataset`` / ``molecules`` as in
    :func:`run_split`); for a shipped model, which comes without its data, every sample of
    ``dataset`` (required; split "all")."""
    from phisnet_jax import shipped
    from phisnet_jax.train import load_run_config

    if shipped.MODELS.is_shipped(run_or_name):
        if dataset is None:
            raise InputError(f"{run_or_name} is a shipped model, without its training data: give a dataset to "
                             "evaluate it on (--dataset)")
        if split not in (None, "all"):
            raise InputError(f"{run_or_name} is a shipped model: the split of its training data does not apply "
                             f"to {dataset}; evaluate on all its samples (--split all, the default for it)")
        split, data_cfg = "all", DataConfig(dataset)
    else:
        split, data_cfg = split or "test", load_run_config(run_or_name)[2]
    return run_split(model_cfg, data_cfg, split, dataset, molecules), dataset or data_cfg.dataset, split


def run_split(model_cfg: PhiSNetConfig, data_cfg: DataConfig, split: str, dataset: str | None = None,
              molecules: list[str] | None = None) -> HamiltonianData:
    """A split ("train", "valid", "test" or "all") of a run's molecules divided as the run divided
    them; ``dataset`` / ``molecules`` replace the run's dataset / molecules (None: every
    molecule of ``dataset``)."""
    if dataset is None:
        dataset, molecules = data_cfg.dataset, molecules or list(data_cfg.molecules)
    spec = SplitSpec(0, 0, data_cfg.split_seed) if split == "all" else SplitSpec(
        data_cfg.n_train, data_cfg.n_valid, data_cfg.split_seed)
    parts = load_splits(dataset, molecules, model_cfg, spec)
    return parts["test"] if split == "all" else parts[split]


def predict_matrices(trained: TrainedModel, inputs: MoleculeInputs, batch_size: int = 16):
    """(fock, overlap), each (n, M, M) float64 numpy, for stacked inputs (n, ...)."""
    with runs.precision(trained.train_config.float64):
        apply = trained.batched_apply
        inputs = cast_inputs(inputs, trained.dtype)
        n = inputs.positions.shape[0]
        focks, overlaps = [], []
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            pad = np.concatenate([rows, np.full(batch_size - rows.size, rows[-1])])
            part = jax.tree.map(lambda a: np.asarray(a)[pad], inputs)
            out = apply(trained.params, part)
            focks.append(np.asarray(out["fock"], np.float64)[: rows.size])
            overlaps.append(np.asarray(out["overlap"], np.float64)[: rows.size])
    return np.concatenate(focks), np.concatenate(overlaps)


def predict_energies_and_forces(trained: TrainedModel, data: HamiltonianData, batch_size: int = 16):
    """(energies (n,) hartree, forces (n, N, 3) hartree/bohr) of a model with the core-Hamiltonian
    head for every sample of ``data`` (forces zero on padding atoms), float64 numpy."""
    if not trained.config.core_hamiltonian:
        raise InputError("the model has no core-Hamiltonian head, so it predicts no energies")
    with runs.precision(trained.train_config.float64):
        fn = trained.batched_energy_and_forces
        inputs = cast_inputs(data.inputs, trained.dtype)
        n = len(data)
        energies, forces = [], []
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            pad = np.concatenate([rows, np.full(batch_size - rows.size, rows[-1])])
            part = jax.tree.map(lambda a: np.asarray(a)[pad], inputs)
            e, f, _ = fn(trained.params, part, data.n_occupied[pad])
            energies.append(np.asarray(e, np.float64)[: rows.size])
            forces.append(np.asarray(f, np.float64)[: rows.size])
    return np.concatenate(energies), np.concatenate(forces)


def orbital_metrics(fock_pred, fock_ref, overlap_ref, n_occupied: int) -> tuple[np.ndarray, float]:
    """(absolute errors of the occupied orbital energies (n_occ,), mean |cosine| of orbitals)."""
    eps_p, c_p = scipy.linalg.eigh(fock_pred, overlap_ref)
    eps_r, c_r = scipy.linalg.eigh(fock_ref, overlap_ref)
    occ = slice(0, n_occupied)
    cos = np.abs(np.sum(c_p[:, occ] * c_r[:, occ], axis=0)) / (
        np.linalg.norm(c_p[:, occ], axis=0) * np.linalg.norm(c_r[:, occ], axis=0)
    )
    return np.abs(eps_p[occ] - eps_r[occ]), float(cos.mean())


def matrix_accuracy(fock, overlap, fock_ref, overlap_ref, n_ao, n_occupied) -> dict:
    """MAE of F (uHa), S, occupied eps (uHa) and mean psi similarity of predicted matrices.

    fock, overlap, fock_ref, overlap_ref: (n, M, M) in hartree, padded; n_ao: (n,) AOs of each
    sample (its top-left block is compared); n_occupied: (n,) doubly occupied orbitals.
    """
    f_err, s_err, eps_err, psi = [], [], [], []
    for i in range(len(fock_ref)):
        k = int(n_ao[i])
        f_p, f_r = np.asarray(fock[i, :k, :k]), np.asarray(fock_ref[i, :k, :k])
        s_p, s_r = np.asarray(overlap[i, :k, :k]), np.asarray(overlap_ref[i, :k, :k])
        f_err.append(np.abs(f_p - f_r).ravel())
        s_err.append(np.abs(s_p - s_r).ravel())
        e, c = orbital_metrics(f_p, f_r, s_r, int(n_occupied[i]))
        eps_err.append(e)
        psi.append(c)
    return {
        "samples": len(fock_ref),
        "fock_mae_uha": float(np.concatenate(f_err).mean() * HARTREE_TO_MICRO),
        "overlap_mae": float(np.concatenate(s_err).mean()),
        "orbital_energy_mae_uha": float(np.concatenate(eps_err).mean() * HARTREE_TO_MICRO),
        "orbital_cosine_similarity": float(np.mean(psi)),
    }


def accuracy(trained: TrainedModel, data: HamiltonianData, batch_size: int = 16) -> dict:
    """MAE of F (uHa), S, occupied eps (uHa) and mean psi similarity over a data split."""
    if len(data) == 0:
        raise InputError("the selected split has no samples (all went to training/validation)")
    fock, overlap = predict_matrices(trained, data.inputs, batch_size)
    return matrix_accuracy(fock, overlap, data.fock, data.overlap,
                           np.asarray(data.inputs.ao_mask).sum(axis=-1), data.n_occupied)
