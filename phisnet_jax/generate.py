"""Resumable, parallel generation of reference data.

How interruption safety works (even against ``kill -9``):
- Labels of geometry ``i`` are written to ``<output>.partial/<name>/sample_<i>.npz`` through a
  temporary file and an atomic rename, so a staged sample is either complete or absent.
- The ensemble (equilibrium geometry and normal modes, or a trajectory) is staged the same way
  before any sample is computed, so a re-run reproduces exactly the same geometries.
- When every requested sample exists, the samples (plus any already in the output file) are
  written into a copy of the output, which then atomically replaces it (``dataset``).
Re-running the same command therefore continues where it stopped, with no sample lost or
duplicated; asking for more samples later extends an existing molecule group.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from typing import Callable

import numpy as np

from molfoundation.basis import AOLayout
from molfoundation.errors import InputError
from molfoundation.molecules import Molecule, to_pyscf, validate
from phisnet_jax import dataset
from phisnet_jax.reference import LevelOfTheory, compute_labels
from phisnet_jax.sampling import ensemble_from_arrays

SAMPLE_FILE = re.compile(r"sample_(\d+)\.npz$")
GROUP_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """What to generate.

    Attributes:
      output: HDF5 file to create or extend.
      name: molecule group name inside the file.
      source: human-readable origin of the geometries (e.g. 'name:water', 'xyz:traj.xyz').
      n_samples: number of geometries wanted in the group (total, including existing ones).
      level: method and basis.
      with_ccsd_t: also compute CCSD(T) energies and forces.
      workers: parallel worker processes.
    """

    output: str
    name: str
    source: str
    n_samples: int
    level: LevelOfTheory
    with_ccsd_t: bool = False
    workers: int = 1

    @property
    def staging_dir(self) -> str:
        return os.path.join(self.output + ".partial", self.name)

    def settings(self) -> dict:
        """Everything that must agree between an interrupted run and its continuation."""
        return {
            "name": self.name,
            "source": self.source,
            "method": self.level.method,
            "basis": self.level.basis,
            "with_ccsd_t": self.with_ccsd_t,
        }


@dataclasses.dataclass(frozen=True)
class GenerationReport:
    output: str
    name: str
    n_samples: int
    n_new: int
    n_converged: int
    ensemble_seconds: float
    labelling_seconds: float
    workers: int

    @property
    def seconds_per_sample(self) -> float | None:
        return self.labelling_seconds / self.n_new if self.n_new else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["seconds_per_sample"] = self.seconds_per_sample
        return d


def check_request(request: GenerationRequest) -> None:
    """Checks that need no quantum chemistry; raise ``InputError`` on any problem."""
    if not GROUP_NAME.match(request.name):
        raise InputError(f"invalid molecule group name {request.name!r} (letters, digits, _.+- only)")
    if request.n_samples < 1:
        raise InputError(f"number of samples must be at least 1, got {request.n_samples}")
    if request.workers < 1:
        raise InputError(f"number of workers must be at least 1, got {request.workers}")
    request.level.check()
    out_dir = os.path.dirname(os.path.abspath(request.output))
    if not os.path.isdir(out_dir):
        raise InputError(f"output directory does not exist: {out_dir}")
    if os.path.exists(request.output):
        info = dataset.read_file_info(request.output)
        if (info.level.method, info.level.basis) != (request.level.method, request.level.basis):
            raise InputError(
                f"{request.output} holds {info.level.method}/{info.level.basis} data, not "
                f"{request.level.method}/{request.level.basis}; choose another output file"
            )
        if request.name in info.molecules:
            existing = dataset.read_molecule(request.output, request.name, include_unconverged=True)
            if existing.attrs.get("source") != request.source:
                raise InputError(
                    f"group {request.name!r} in {request.output} came from "
                    f"{existing.attrs.get('source')!r}, not {request.source!r}; use another --name"
                )
            if bool(existing.attrs.get("with_ccsd_t")) != request.with_ccsd_t:
                raise InputError(
                    f"group {request.name!r} in {request.output} was generated "
                    f"{'with' if existing.attrs.get('with_ccsd_t') else 'without'} CCSD(T); "
                    "use the same setting or another --name"
                )
    staged = _read_staged_settings(request)
    if staged is not None and staged != request.settings():
        raise InputError(
            f"an unfinished generation in {request.staging_dir} used other settings "
            f"({json.dumps(staged)}); finish it with those or delete that directory"
        )


def _read_staged_settings(request: GenerationRequest) -> dict | None:
    path = os.path.join(request.staging_dir, "settings.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    tmp = path + ".tmp.npz"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _stage_ensemble(request: GenerationRequest, make_ensemble: Callable[[], object]):
    """Load the staged or stored ensemble, or build and stage a new one."""
    os.makedirs(request.staging_dir, exist_ok=True)
    path = os.path.join(request.staging_dir, "ensemble.npz")
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if not k.startswith("attr.")}
            attrs = json.loads(str(z["attr.json"]))
        return ensemble_from_arrays(arrays, attrs)
    if os.path.exists(request.output) and request.name in dataset.read_file_info(request.output).molecules:
        existing = dataset.read_molecule(request.output, request.name, include_unconverged=True)
        ensemble = ensemble_from_arrays(existing.ensemble_arrays, existing.ensemble_attrs)
    else:
        ensemble = make_ensemble()
    arrays, attrs = ensemble.to_arrays()
    _atomic_savez(path, {**arrays, "attr.json": np.asarray(json.dumps(attrs))})
    _atomic_write_text(
        os.path.join(request.staging_dir, "settings.json"), json.dumps(request.settings())
    )
    return ensemble


def _staged_indices(request: GenerationRequest) -> set[int]:
    found = set()
    for p in glob.glob(os.path.join(request.staging_dir, "sample_*.npz")):
        m = SAMPLE_FILE.search(os.path.basename(p))
        if m:
            found.add(int(m.group(1)))
    return found


def _init_worker(threads: int) -> None:
    from pyscf import lib

    lib.num_threads(threads)


def _label_geometry(job: tuple[int, Molecule, LevelOfTheory, bool]) -> tuple[int, dict]:
    index, molecule, level, with_ccsd_t = job
    labels = compute_labels(molecule, level, with_ccsd_t)
    labels["positions"] = molecule.positions
    labels["sample_index"] = np.asarray(index, dtype=np.int64)
    return index, labels


def _progress_bar(total: int, initial: int, description: str):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=description, unit="sample", file=sys.stderr,
        disable=None, dynamic_ncols=True,
    )


def generate(
    request: GenerationRequest,
    make_ensemble: Callable[[], object],
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> GenerationReport:
    """Generate (or continue generating) reference data for one molecule group.

    ``make_ensemble`` builds the geometry ensemble (optimisation, Hessian, ...) and is only
    called when neither the output file nor the staging directory already holds one.
    """
    check_request(request)
    t0 = time.perf_counter()
    ensemble = _stage_ensemble(request, make_ensemble)
    ensemble_seconds = time.perf_counter() - t0
    if ensemble.capacity is not None and request.n_samples > ensemble.capacity:
        raise InputError(
            f"the trajectory has {ensemble.capacity} frames, fewer than the {request.n_samples} requested"
        )
    reference_geometry = ensemble.geometry(0)
    validate(reference_geometry, request.level.basis)

    existing = None
    if os.path.exists(request.output) and request.name in dataset.read_file_info(request.output).molecules:
        existing = dataset.read_molecule(request.output, request.name, include_unconverged=True)
    have = set(existing.arrays["sample_index"].tolist()) if existing else set()
    staged = _staged_indices(request)
    pending = [i for i in range(request.n_samples) if i not in have and i not in staged]

    t1 = time.perf_counter()
    if pending:
        geometries = []
        for i in pending:
            geometry = ensemble.geometry(i)
            validate(geometry)  # thermal sampling at absurd temperatures can overlap atoms
            geometries.append((i, geometry, request.level, request.with_ccsd_t))
        _run_jobs(request, geometries, total=request.n_samples, done=request.n_samples - len(pending))
    labelling_seconds = time.perf_counter() - t1

    if pending or staged or existing is None:
        layout = AOLayout.from_mole(to_pyscf(reference_geometry, request.level.basis))
        n_total, n_converged = _consolidate(request, existing, reference_geometry, layout, ensemble)
    else:  # every requested sample is already in the file: leave it untouched
        n_total = existing.n_samples
        n_converged = int(existing.arrays["converged"].sum())
    shutil.rmtree(request.staging_dir, ignore_errors=True)
    parent = os.path.dirname(request.staging_dir)
    if os.path.isdir(parent) and not os.listdir(parent):
        os.rmdir(parent)
    report = GenerationReport(
        output=request.output,
        name=request.name,
        n_samples=n_total,
        n_new=len(pending),
        n_converged=n_converged,
        ensemble_seconds=ensemble_seconds,
        labelling_seconds=labelling_seconds,
        workers=request.workers,
    )
    log(
        f"{request.name}: {n_total} samples in {request.output} "
        f"({len(pending)} new, {n_converged} converged)"
    )
    return report


def _run_jobs(request: GenerationRequest, jobs: list, total: int, done: int) -> None:
    cores = os.cpu_count() or 1
    threads = max(1, cores // request.workers)
    bar = _progress_bar(total, done, request.name)
    try:
        if request.workers == 1:
            _init_worker(cores)
            results = map(_label_geometry, jobs)
            for index, labels in results:
                _stage_sample(request, index, labels)
                bar.update(1)
        else:
            # spawn: forking a process whose OpenMP runtime is already running can deadlock.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(
                max_workers=request.workers, mp_context=context,
                initializer=_init_worker, initargs=(threads,),
            ) as pool:
                futures = [pool.submit(_label_geometry, job) for job in jobs]
                for future in concurrent.futures.as_completed(futures):
                    index, labels = future.result()
                    _stage_sample(request, index, labels)
                    bar.update(1)
    finally:
        bar.close()


def _stage_sample(request: GenerationRequest, index: int, labels: dict) -> None:
    _atomic_savez(os.path.join(request.staging_dir, f"sample_{index:06d}.npz"), labels)


def _consolidate(request, existing, reference_geometry, layout, ensemble) -> tuple[int, int]:
    """Write existing + staged samples (sorted by geometry index) atomically into the output.

    Returns the number of samples in the group and how many of them converged.
    """
    fields = dataset.sample_fields(request.with_ccsd_t)
    rows: dict[int, dict[str, np.ndarray]] = {}
    if existing is not None:
        for row in range(existing.n_samples):
            index = int(existing.arrays["sample_index"][row])
            rows[index] = {k: existing.arrays[k][row] for k in fields}
    for index in _staged_indices(request):
        with np.load(os.path.join(request.staging_dir, f"sample_{index:06d}.npz")) as z:
            rows[index] = {k: z[k] for k in fields}
    order = sorted(rows)
    samples = {k: np.stack([rows[i][k] for i in order]) for k in fields}
    ensemble_arrays, ensemble_attrs = ensemble.to_arrays()
    attrs = {
        "formula": reference_geometry.formula,
        "source": request.source,
        "charge": reference_geometry.charge,
        "spin": reference_geometry.spin,
        "with_ccsd_t": request.with_ccsd_t,
    }
    dataset.write_molecule_atomically(
        request.output, request.level, request.name, reference_geometry.atomic_numbers,
        layout, samples, attrs, ensemble_arrays, ensemble_attrs,
    )
    return len(order), int(samples["converged"].sum())

