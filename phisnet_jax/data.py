"""Training data for PhiSNet: dataset groups as padded, stacked arrays, splits and batch order.

Molecules of different sizes share one set of static shapes (the largest atom and AO counts
of the selection), so one compiled step serves them all.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from molfoundation.errors import InputError
from phisnet_jax import dataset
from phisnet_jax.model import MoleculeInputs, PhiSNetConfig, make_inputs


@dataclasses.dataclass(frozen=True, eq=False)
class HamiltonianData:
    """Stacked samples, leading axis n_samples.

    Attributes:
      inputs: ``MoleculeInputs`` with arrays (n, N, ...) and (n, M).
      fock, overlap: (n, M, M) reference matrices (hartree), zero-padded.
      n_occupied: (n,) doubly occupied orbitals (closed shells).
      molecule: (n,) index into ``names``; sample_index: (n,) geometry index in its group.
      names: molecule group names.
      labels: optional further labels by dataset field name (only those asked for), padded like
        the inputs: ``core_hamiltonian`` (n, M, M) hartree; ``energy``, ``ccsd_t_energy`` (n,)
        hartree; ``forces``, ``ccsd_t_forces`` (n, N, 3) hartree/bohr, zero on padding atoms.
    """

    inputs: MoleculeInputs
    fock: np.ndarray
    overlap: np.ndarray
    n_occupied: np.ndarray
    molecule: np.ndarray
    sample_index: np.ndarray
    names: tuple[str, ...]
    labels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.fock.shape[0])

    def take(self, rows: np.ndarray) -> "HamiltonianData":
        rows = np.asarray(rows)
        return HamiltonianData(
            inputs=MoleculeInputs(**{k: np.asarray(v)[rows] for k, v in vars(self.inputs).items()}),
            fock=self.fock[rows],
            overlap=self.overlap[rows],
            n_occupied=self.n_occupied[rows],
            molecule=self.molecule[rows],
            sample_index=self.sample_index[rows],
            names=self.names,
            labels={k: v[rows] for k, v in self.labels.items()},
        )


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """Per-molecule split sizes (the rest is test) and the split seed (42 as in the paper)."""

    n_train: int
    n_valid: int
    seed: int = 42


def check_compatible(path: str, config: PhiSNetConfig) -> dataset.FileInfo:
    info = dataset.read_file_info(path)
    if info.level.basis != config.basis:
        raise InputError(
            f"{path} holds {info.level.basis} matrices but the model predicts {config.basis}"
        )
    return info


# Optional labels ``load_splits`` can add, by dataset field: how each is padded.
LABEL_KINDS = {
    "core_hamiltonian": "matrix",
    "energy": "scalar",
    "forces": "atoms",
    "ccsd_t_energy": "scalar",
    "ccsd_t_forces": "atoms",
}


def load_splits(
    path: str, names: list[str] | None, config: PhiSNetConfig, split: SplitSpec,
    labels: tuple[str, ...] = (),
) -> dict[str, HamiltonianData]:
    """Train / valid / test data of the chosen molecule groups (all groups if ``names`` is None).

    ``labels``: further dataset fields to load into ``HamiltonianData.labels`` (keys of
    ``LABEL_KINDS``); a group without one of them is an ``InputError``.
    """
    unknown = [k for k in labels if k not in LABEL_KINDS]
    if unknown:
        raise InputError(f"unknown label field(s) {', '.join(unknown)}; known: {', '.join(LABEL_KINDS)}")
    info = check_compatible(path, config)
    names = list(info.molecules) if not names else names
    groups = [dataset.read_molecule(path, n, fields=("positions", "fock", "overlap") + tuple(labels)) for n in names]
    if any(g.n_samples == 0 for g in groups):
        empty = [g.name for g in groups if g.n_samples == 0]
        raise InputError(f"no converged samples for {', '.join(empty)} in {path}")
    for g in groups:
        missing = [k for k in labels if k not in g.arrays]
        if missing:
            hint = " (generate the data with --ccsd-t)" if any(k.startswith("ccsd_t") for k in missing) else ""
            raise InputError(f"molecule {g.name!r} in {path} has no {', '.join(missing)} labels{hint}")
    n_atoms = max(len(g.atomic_numbers) for g in groups)
    n_ao = max(g.layout.n_ao for g in groups)
    parts: dict[str, list[HamiltonianData]] = {"train": [], "valid": [], "test": []}
    for m, g in enumerate(groups):
        stacked = _stack_group(g, m, config, n_atoms, n_ao, tuple(names), labels)
        for key, rows in dataset.split_indices(g.n_samples, split.n_train, split.n_valid, split.seed).items():
            parts[key].append(stacked.take(rows))
    return {key: _concatenate(v) for key, v in parts.items()}


def _stack_group(g: dataset.MoleculeData, m: int, config, n_atoms: int, n_ao: int, names,
                 labels: tuple[str, ...]) -> HamiltonianData:
    n = g.n_samples
    per_sample = [make_inputs(config, g.atomic_numbers, pos, n_atoms, n_ao) for pos in g.arrays["positions"]]
    inputs = MoleculeInputs(**{
        k: np.stack([getattr(s, k) for s in per_sample]) for k in vars(per_sample[0])
    })
    k = g.layout.n_ao
    fock = np.zeros((n, n_ao, n_ao))
    overlap = np.zeros((n, n_ao, n_ao))
    fock[:, :k, :k] = g.arrays["fock"]
    overlap[:, :k, :k] = g.arrays["overlap"]
    n_electrons = int(g.atomic_numbers.sum()) - int(g.attrs.get("charge", 0))
    padded = {}
    for key in labels:
        value = np.asarray(g.arrays[key], np.float64)
        kind = LABEL_KINDS[key]
        if kind == "matrix":
            padded[key] = np.zeros((n, n_ao, n_ao))
            padded[key][:, :k, :k] = value
        elif kind == "atoms":
            padded[key] = np.zeros((n, n_atoms, 3))
            padded[key][:, : value.shape[1]] = value
        else:
            padded[key] = value.reshape(n)
    return HamiltonianData(
        inputs=inputs, fock=fock, overlap=overlap,
        n_occupied=np.full(n, n_electrons // 2, dtype=np.int32),
        molecule=np.full(n, m, dtype=np.int32),
        sample_index=np.asarray(g.arrays["sample_index"]),
        names=names,
        labels=padded,
    )


def _concatenate(parts: list[HamiltonianData]) -> HamiltonianData:
    cat = lambda xs: np.concatenate(xs, axis=0)  # noqa: E731
    return HamiltonianData(
        inputs=MoleculeInputs(**{
            k: cat([np.asarray(getattr(p.inputs, k)) for p in parts]) for k in vars(parts[0].inputs)
        }),
        fock=cat([p.fock for p in parts]),
        overlap=cat([p.overlap for p in parts]),
        n_occupied=cat([p.n_occupied for p in parts]),
        molecule=cat([p.molecule for p in parts]),
        sample_index=cat([p.sample_index for p in parts]),
        names=parts[0].names,
        labels={k: cat([p.labels[k] for p in parts]) for k in parts[0].labels},
    )


def batch_rows(step: int, n_samples: int, batch_size: int, seed: int) -> np.ndarray:
    """Rows of the training batch at ``step``: epochs are permutations drawn from (seed, epoch).

    A function of the step alone, so a resumed run sees exactly the batches of an uninterrupted
    one. Each epoch drops its last incomplete batch.
    """
    if batch_size > n_samples:
        raise InputError(f"batch size {batch_size} exceeds the {n_samples} training samples")
    per_epoch = n_samples // batch_size
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_samples)
    return order[position * batch_size : (position + 1) * batch_size]


def distance_ranges(data: HamiltonianData, elements: tuple[int, ...]) -> dict[str, list[float]]:
    """Per element pair ('1-8'), the [min, max] interatomic distance (bohr) in a data split."""
    ranges: dict[str, list[float]] = {}
    inputs = data.inputs
    for n in range(len(data)):
        real = np.flatnonzero(np.asarray(inputs.atom_mask[n]))
        pos = np.asarray(inputs.positions[n])[real]
        z = [elements[int(e)] for e in np.asarray(inputs.element_index[n])[real]]
        dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        for i in range(len(real)):
            for j in range(i + 1, len(real)):
                key = f"{min(z[i], z[j])}-{max(z[i], z[j])}"
                lo, hi = ranges.get(key, [np.inf, -np.inf])
                ranges[key] = [min(lo, float(dist[i, j])), max(hi, float(dist[i, j]))]
    return ranges


def outside_distance_ranges(atomic_numbers, positions, ranges: dict[str, list[float]],
                            margin: float = 0.2) -> list[str]:
    """Descriptions of the atom pairs whose distance lies outside the training range (+- margin bohr)."""
    problems = []
    z = [int(a) for a in atomic_numbers]
    pos = np.asarray(positions)
    for i in range(len(z)):
        for j in range(i + 1, len(z)):
            key = f"{min(z[i], z[j])}-{max(z[i], z[j])}"
            d = float(np.linalg.norm(pos[i] - pos[j]))
            if key not in ranges:
                problems.append(f"atoms {i}-{j} ({key}): element pair never seen in training")
            elif not ranges[key][0] - margin <= d <= ranges[key][1] + margin:
                lo, hi = ranges[key]
                problems.append(f"atoms {i}-{j} ({key}): {d:.2f} bohr outside training range {lo:.2f}-{hi:.2f}")
    return problems
