"""Energy of a trained wavefunction from fresh MCMC samples, with a blocking error bar.

The walkers start from scratch (not from the training walkers), are equilibrated for
``burn_in_sweeps`` MCMC calls (:func:`evaluation_burn_in`) and then sampled for ``n_steps``
calls of the run's ``mcmc_steps`` Metropolis steps each; the local energy of every walker is evaluated after
every call. Successive calls are correlated, so the error bar of the mean comes from a
blocking analysis (Flyvbjerg and Petersen 1989) of the series of per-call mean energies.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from phisnet_jax.errors import InputError
from vmc import mcmc, train
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
class Evaluation:
    """Energies in hartree; ``reference`` is the exact energy of a named system if known."""

    energy: float
    error: float
    variance: float
    n_steps: int
    n_walkers: int
    burn_in_sweeps: int
    n_nonfinite: int
    acceptance: float
    checkpoint_step: int
    reference: float | None
    seconds: float


def evaluate(run_dir: str, n_steps: int = 200, n_walkers: int | None = None,
             burn_in_sweeps: int | None = None, seed: int = 1, progress: bool = True) -> Evaluation:
    """Evaluate the latest VMC checkpoint of ``run_dir`` (or the pretrained parameters if VMC
    has not started) with fresh walkers; ``n_walkers`` defaults to the run's own and the
    burn-in is :func:`evaluation_burn_in`."""
    from tqdm import tqdm

    config = train.load_run_config(run_dir)
    cfg = config.vmc
    n_walkers = n_walkers or cfg.n_walkers
    burn_in_sweeps = evaluation_burn_in(burn_in_sweeps, cfg.burn_in_sweeps)
    if n_steps < 2:
        raise InputError("evaluation needs at least 2 steps")
    started = time.perf_counter()
    with train.precision(cfg):
        problem = train.problem_for(config)
        params, step = _load_params(run_dir, problem)
        devices = train.WalkerParallel()
        if n_walkers % devices.n_devices:
            raise InputError(f"{n_walkers} walkers do not divide over {devices.n_devices} devices")
        key_walkers, key = jax.random.split(jax.random.PRNGKey(seed))
        sampler = mcmc.init_state(problem.log_psi, params, problem.init_walkers(key_walkers, n_walkers),
                                  cfg.initial_step_size)
        state = devices.place(train.TrainState(jnp.asarray(step), params, None, sampler, key))
        sample = problem.sample
        local_energy = jax.jit(problem.local_energy)
        state = train.burn_in(sample, state.params, state, burn_in_sweeps)
        means, variances, acceptances, n_nonfinite = [], [], [], 0
        key = state.key
        sampler = state.sampler
        for _ in tqdm(range(n_steps), desc="evaluate", unit="step", file=sys.stderr,
                      disable=None if progress else True, dynamic_ncols=True):
            key, key_sample = jax.random.split(key)
            sampler, acceptance, _ = sample(state.params, sampler, key_sample)
            energies = np.asarray(local_energy(state.params, sampler.walkers), np.float64)
            finite = np.isfinite(energies)
            n_nonfinite += int((~finite).sum())
            if finite.any():
                means.append(energies[finite].mean())
                variances.append(energies[finite].var())
            acceptances.append(float(acceptance))
    if len(means) < 2:
        raise train.TrainingDiverged("fewer than two evaluation steps had a finite local energy")
    means = np.asarray(means)
    return Evaluation(
        energy=float(means.mean()), error=blocking_error(means), variance=float(np.mean(variances)),
        n_steps=n_steps, n_walkers=n_walkers, burn_in_sweeps=burn_in_sweeps, n_nonfinite=n_nonfinite,
        acceptance=float(np.mean(acceptances)), checkpoint_step=step,
        reference=exact_energy(problem.system), seconds=time.perf_counter() - started,
    )


def _load_params(run_dir: str, problem: train.Problem):
    """(parameters, VMC step) of the latest VMC checkpoint, or of the latest pretraining one
    (step 0) when there is no VMC checkpoint."""
    for phase in ("vmc", "pretrain"):
        step = train.restore_step(run_dir, phase)
        if step is None:
            continue
        template = jax.eval_shape(lambda: problem.init_params(jax.random.PRNGKey(0)))
        params = train.restore_params(run_dir, phase, template)
        return params, (step if phase == "vmc" else 0)
    raise InputError(f"{run_dir} has no checkpoint to evaluate")
