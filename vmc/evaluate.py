"""Energies of a trained wavefunction from fresh MCMC samples, with blocking error bars, on
the systems it was trained on or on others (zero-shot).

The walkers start from scratch (not from the training walkers), are equilibrated for
``burn_in_sweeps`` MCMC calls (:func:`evaluation_burn_in`) on the Hartree-Fock density and as
many under the network (:meth:`vmc.train.Problem.hartree_fock_sampler` says why both), and then
sampled for ``n_steps`` calls of the run's ``mcmc_steps`` Metropolis steps each; the local
energy of every walker is evaluated after every call. Successive calls are correlated, so the
error bar of the mean comes from a blocking analysis (Flyvbjerg and Petersen 1989) of the
series of per-call mean energies.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from molfoundation import checkpoints, runs
from molfoundation.errors import InputError, TrainingDiverged
from vmc import ansatz
from vmc.config import RunConfig, SystemsConfig, VMCConfig, load_config, model_config, run_directory
from vmc.geometries import GeometryBatch
from vmc.references import exact_energy

# Blocking stops while at least this many blocks are left (fewer give a noisy error of the
# error); the error bar is the largest standard error over the blocking levels kept.
MIN_BLOCKS = 16

# Fresh walkers are Gaussians around the nuclei, far from |psi|^2 for the core electrons of
# heavier atoms, and the small step size those electrons need (0.056 bohr on H2O) makes the rest
# move slowly. On H2O (small preset) the energy drifts over the first 100 calls, and the training
# runs' 20-call burn-in left it 17 mHa high; evaluation therefore equilibrates for at least this
# many calls unless told otherwise.
MIN_BURN_IN_SWEEPS = 200


def evaluation_burn_in(requested: int | None, run_burn_in_sweeps: int) -> int:
    """MCMC calls of burn-in before an evaluation: ``requested`` if given, else the run's own,
    at least MIN_BURN_IN_SWEEPS."""
    return max(run_burn_in_sweeps, MIN_BURN_IN_SWEEPS) if requested is None else requested


def blocking_error(series: np.ndarray) -> float:
    """Standard error of the mean of a correlated series (Flyvbjerg-Petersen blocking).

    Neighbouring values are averaged pairwise again and again; the naive standard error grows
    with the block length until blocks are longer than the correlation time and then stays
    flat. The largest value over the levels with at least ``MIN_BLOCKS`` blocks is returned
    (a conservative reading of the plateau). Series shorter than ``MIN_BLOCKS`` give the naive
    standard error."""
    x = np.asarray(series, dtype=np.float64)
    if x.size < 2:
        return float("nan")
    errors = [x.std(ddof=1) / np.sqrt(x.size)]
    while x.size // 2 >= MIN_BLOCKS:
        n = x.size // 2 * 2
        x = 0.5 * (x[0:n:2] + x[1:n:2])
        errors.append(x.std(ddof=1) / np.sqrt(x.size))
    return float(max(errors))


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


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The evaluation of one set of parameters (``parameters``: where they come from, e.g.
    "vmc step 600") on every system of a set."""

    parameters: str
    n_steps: int
    n_walkers: int
    burn_in_sweeps: int
    seed: int
    seconds: float
    systems: list[SystemEvaluation]


def load_model(run_dir: str, step: int | None = None) -> tuple[ansatz.AnsatzConfig, Any, str]:
    """(network config, parameters, phase and step they come from) of a VMC run directory:
    the latest VMC checkpoint, else the latest HF-fit one; with ``step``, the checkpoint of that
    step (VMC's if both phases have one). A name that is no path loads the shipped model of
    that name (:mod:`vmc.shipped`)."""
    from vmc import shipped
    from vmc.train import param_shapes

    if shipped.MODELS.is_shipped(run_dir):
        if step is not None:
            raise InputError(f"{run_dir} is a shipped model, with one set of parameters: no --checkpoint")
        return shipped.load_params(run_dir)

    cfg = load_config(run_dir)
    run = run_directory(run_dir)
    for phase in ("vmc", "hf_fit"):
        steps = checkpoints.all_steps(run.checkpoint_dir(phase))
        if not steps or (step is not None and step not in steps):
            continue
        chosen = steps[-1] if step is None else step
        with runs.precision(cfg.vmc.float64):
            template = param_shapes(cfg.ansatz, cfg.vmc.float64)
            saved = checkpoints.restore_raw(run.checkpoint_dir(phase), chosen)["params"]
            try:
                params = jax.tree.map(lambda t, x: jnp.asarray(x, t.dtype).reshape(t.shape), template, saved)
            except (ValueError, TypeError) as exc:
                raise InputError(f"the {phase} checkpoint of {run_dir} does not fit its network: "
                                 f"{str(exc).splitlines()[0]}") from None
        return cfg.ansatz, params, f"{phase} step {chosen}"
    raise InputError(f"{run_dir} has no checkpoint " + ("to start from" if step is None else str(step)))


def evaluate_model(network: ansatz.AnsatzConfig, params, vmc_config: VMCConfig, system_set,
                   systems_config: SystemsConfig | None = None, n_steps: int = 200, n_walkers: int | None = None,
                   burn_in_sweeps: int | None = None, seed: int = 1, progress: bool = True,
                   problem=None) -> list[SystemEvaluation]:
    """Energies of the wavefunction ``params`` on every system of ``system_set``: fresh walkers per
    system, ``burn_in_sweeps`` MCMC calls on its HF density and as many under the network, then
    ``n_steps`` calls each followed by a local-energy evaluation (all geometries of a
    composition at once). Sampling settings default to ``vmc_config``'s, the burn-in to
    :func:`evaluation_burn_in`; orbitals come from ``systems_config`` (its basis, localisation
    and orbital source; default Hartree-Fock in the default basis). ``problem``: a
    :class:`vmc.train.Problem` of these settings built before (its compiled functions are
    reused)."""
    from vmc.train import Problem, WalkerParallel, _rows

    if n_steps < 2:
        raise InputError("evaluation needs at least 2 steps")
    cfg = dataclasses.replace(vmc_config, n_walkers=n_walkers or vmc_config.n_walkers,
                              burn_in_sweeps=evaluation_burn_in(burn_in_sweeps, vmc_config.burn_in_sweeps))
    config = RunConfig(systems_config or SystemsConfig("evaluation"), ansatz=network, vmc=cfg)
    results: dict[int, SystemEvaluation] = {}
    with runs.precision(cfg.float64):
        devices = WalkerParallel()
        devices.check_walkers(cfg.n_walkers)
        if problem is None or problem.config != config:
            problem = Problem.build(config, system_set, progress)
        params = devices.replicate(params)
        key = jax.random.PRNGKey(seed)
        bar = tqdm(total=len(problem.groups) * (cfg.burn_in_sweeps + n_steps), desc="evaluate",
                   unit="call", file=sys.stderr, disable=None if progress else True, dynamic_ncols=True)
        for group in problem.groups:
            key, key_walkers = jax.random.split(key)
            sampler = problem.fresh_sampler(group, params, key_walkers, cfg.burn_in_sweeps, devices.place_sampler)
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
                means.append(np.where(finite.any(1), np.where(finite, energies, 0).sum(1)
                                      / np.maximum(finite.sum(1), 1), np.nan))
                variances.append([e[f].var() if f.any() else np.nan for e, f in zip(energies, finite)])
                acceptances.append(np.asarray(acceptance))
            means, variances = np.asarray(means), np.asarray(variances)
            for row, member in enumerate(group.members):
                system = group.systems[row]
                series = means[:, row][np.isfinite(means[:, row])]
                if series.size < 2:
                    raise TrainingDiverged(f"fewer than two evaluation steps of {system.name} had a finite "
                                           "local energy")
                results[member] = SystemEvaluation(
                    name=system.name, energy=float(series.mean()), error=blocking_error(series),
                    variance=float(np.nanmean(variances[:, row])), n_nonfinite=int(n_nonfinite[row]),
                    acceptance=float(np.mean(np.asarray(acceptances)[:, row])), reference=exact_energy(system))
        bar.close()
    return [results[i] for i in range(len(system_set))]


def evaluate_run(run_dir: str, systems_spec: str | None = None, seed_systems: int = 0, n_steps: int = 200,
                 n_walkers: int | None = None, burn_in_sweeps: int | None = None, seed: int = 1,
                 progress: bool = True, problem=None, step: int | None = None) -> Evaluation:
    """Evaluate the latest parameters of a VMC run directory (those of checkpoint ``step`` if
    given), or a shipped model, on its own systems, or on the systems of ``systems_spec``
    (zero-shot, geometries generated with ``seed_systems``)."""
    from vmc import shipped
    from vmc.train import run_systems

    started = time.perf_counter()
    network, params, origin = load_model(run_dir, step)
    cfg = model_config(run_dir)
    if systems_spec is None:
        system_set = shipped.load_systems(run_dir) if shipped.MODELS.is_shipped(run_dir) else run_systems(run_dir, cfg)
    else:
        system_set = dataclasses.replace(cfg.systems, spec=systems_spec, seed=seed_systems, charge=0,
                                         spin=None).load()
    n_walkers = n_walkers or cfg.vmc.n_walkers
    burn_in = evaluation_burn_in(burn_in_sweeps, cfg.vmc.burn_in_sweeps)
    results = evaluate_model(network, params, cfg.vmc, system_set, cfg.systems, n_steps=n_steps,
                             n_walkers=n_walkers, burn_in_sweeps=burn_in, seed=seed, progress=progress,
                             problem=problem)
    return Evaluation(parameters=origin, n_steps=n_steps, n_walkers=n_walkers, burn_in_sweeps=burn_in,
                      seed=seed, seconds=time.perf_counter() - started, systems=results)
