"""The ``vmc`` command line (neural-wavefunction VMC).

Every sub-command has ``--help``; ``--json`` prints one JSON object on stdout. Bad input ends
with a one-line ``error: ...`` on stderr and exit code 2; a diverged run ends with exit code 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from phisnet_jax.cli import _apply_overrides, _parse_settings, run_cli
from phisnet_jax.errors import InputError


def apply_settings(config, settings: tuple[str, ...]):
    """``config`` (a :class:`vmc.train.RunConfig` or :class:`vmc.shared.SharedRunConfig`) with
    ``--set`` overrides applied. Keys are ``section.field`` (sections: the config's parts, e.g.
    vmc, ansatz, kfac, adam, system / systems, schedule) or a bare field name that only one
    section has."""
    sections = tuple(f.name for f in dataclasses.fields(config)
                     if dataclasses.is_dataclass(getattr(config, f.name)))
    overrides: dict[str, dict[str, str]] = {}
    for key, value in _parse_settings(settings).items():
        if "." in key:
            section, field = key.split(".", 1)
            if section not in sections:
                raise InputError(f"unknown settings section {section!r} in {key!r}; expected one of {sections}")
            candidates = [section]
        else:
            field = key
            candidates = sections
        owners = [s for s in candidates
                  if field in {f.name for f in dataclasses.fields(getattr(config, s))} and field != "slots"]
        if not owners:
            raise InputError(f"unknown setting {key!r}")
        if len(owners) > 1:
            raise InputError(f"setting {key!r} is ambiguous; write one of {', '.join(f'{s}.{field}' for s in owners)}")
        overrides.setdefault(owners[0], {})[field] = value
    changes = {}
    for section, values in overrides.items():
        try:
            changes[section] = _apply_overrides(getattr(config, section), values)
        except ValueError as exc:  # a dataclass's own validation
            raise InputError(str(exc)) from None
    return dataclasses.replace(config, **changes)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def vmc():
    """Transferable neural wavefunctions trained by variational Monte Carlo."""


@vmc.command()
@click.argument("system", required=False)
@click.option("--run-dir", required=True, help="Run directory (created, or resumed if it exists).")
@click.option("--preset", type=click.Choice(["paper", "small", "tiny"]), default="small", show_default=True,
              help="Network and sampling size: the reference recipe or smaller ones for CPU runs "
                   "(see vmc.train.preset_config).")
@click.option("--charge", default=0, show_default=True)
@click.option("--spin", type=int, help="2S = N_up - N_down [default: the system's usual spin].")
@click.option("--basis", default="sto-6g", show_default=True, help="Minimal basis of the HF orbitals.")
@click.option("--optimizer", type=click.Choice(["kfac", "adam"]), default="kfac", show_default=True)
@click.option("--walkers", type=int, help="Number of walkers [default: the preset's].")
@click.option("--pretrain-steps", type=int, help="Supervised steps towards the HF orbitals [default: the preset's].")
@click.option("--steps", type=int, required=True, help="Stop at this total number of VMC steps.")
@click.option("--time-budget", type=float, help="Stop after this many seconds (pretraining included).")
@click.option("--float64", is_flag=True, help="Run in double precision.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override any setting, e.g. --set kfac.learning_rate=0.05 --set n_determinants=8.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def train(system, run_dir, preset, charge, spin, basis, optimizer, walkers, pretrain_steps, steps,
          time_budget, float64, settings, as_json):
    """Pretrain to Hartree-Fock, then optimise the energy by VMC (or resume --run-dir).

    SYSTEM is a name (H, H2, LiH, Li, Be, N2, H2O, CH4, H<n> chains) or an XYZ file in
    angstrom. Without SYSTEM, the run in --run-dir continues with its stored configuration.
    """
    from vmc import train as training

    if system is None:
        if settings:
            raise InputError("--set needs SYSTEM (a resumed run keeps its configuration)")
        config = training.load_run_config(run_dir)
    else:
        sampling = dict(optimizer=optimizer, float64=float64)
        if walkers is not None:
            sampling["n_walkers"] = walkers
        if pretrain_steps is not None:
            sampling["pretrain_steps"] = pretrain_steps
        config = training.preset_config(
            preset, training.SystemConfig(system, charge=charge, spin=spin, basis=basis), **sampling)
        config = apply_settings(config, settings)
    try:
        result = training.train(run_dir, config, max_steps=steps, time_budget=time_budget)
    except training.TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result)))
    else:
        energy = "n/a" if result.energy is None else f"{result.energy:.5f} Ha"
        click.echo(f"pretrained {result.pretrain_steps} steps; VMC at step {result.steps} "
                   f"({result.stopped_because}); energy of the last 10 % of steps {energy}")


def _report_shared(result, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result)))
        return
    click.echo(f"pretrained {result.pretrain_steps} steps; VMC at step {result.steps} ({result.stopped_because})")
    for name, energy in result.energies.items():
        click.echo(f"  {name}: {energy:.5f} Ha (mean of the last visits; {result.visits[name]} visits)")


def _run_shared(run_dir, config, steps, time_budget, as_json):
    from vmc import shared
    from vmc import train as training

    try:
        result = shared.train_shared(run_dir, config, max_steps=steps, time_budget=time_budget)
    except training.TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    _report_shared(result, as_json)


def _sampling(walkers, pretrain_steps, **fixed) -> dict:
    settings = dict(fixed)
    if walkers is not None:
        settings["n_walkers"] = walkers
    if pretrain_steps is not None:
        settings["pretrain_steps"] = pretrain_steps
    return settings


@vmc.command()
@click.argument("systems", required=False)
@click.option("--run-dir", required=True, help="Run directory (created, or resumed if it exists).")
@click.option("--preset", type=click.Choice(["paper", "small", "tiny"]), default="small", show_default=True,
              help="Network and sampling size (see vmc.train.preset_settings).")
@click.option("--seed", "set_seed", default=0, show_default=True,
              help="Seed of the rotations and distortions of generated geometries.")
@click.option("--basis", default="sto-6g", show_default=True, help="Minimal basis of the HF orbitals.")
@click.option("--orbitals", "orbitals_from", metavar="PHISNET_RUN",
              help="Take the orbitals from this trained PhiSNet model instead of Hartree-Fock.")
@click.option("--optimizer", type=click.Choice(["kfac", "adam"]), default="kfac", show_default=True)
@click.option("--walkers", type=int, help="Walkers per geometry [default: the preset's].")
@click.option("--geometries-per-step", type=int, default=1, show_default=True,
              help="Geometries of one composition batched into one optimisation step.")
@click.option("--schedule", type=click.Choice(["spread", "round_robin"]), default="spread", show_default=True,
              help="Which geometries a step takes (spread: round-robin first, then the largest energy spread).")
@click.option("--pretrain-steps", type=int, help="Supervised steps towards the HF orbitals [default: the preset's].")
@click.option("--steps", type=int, required=True, help="Stop at this total number of VMC optimisation steps.")
@click.option("--time-budget", type=float, help="Stop after this many seconds (pretraining included).")
@click.option("--float64", is_flag=True, help="Run in double precision.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override any setting, e.g. --set kfac.learning_rate=0.05.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def pretrain(systems, run_dir, preset, set_seed, basis, orbitals_from, optimizer, walkers, geometries_per_step,
             schedule, pretrain_steps, steps, time_budget, float64, settings, as_json):
    """Train a base model: one wavefunction over a set of molecules and geometries (HF
    pretraining, then shared VMC), or resume --run-dir.

    SYSTEMS is an XYZ system-set file, 'hchains:6@1.4,1.6,1.8' (hydrogen chains: lengths @
    spacings in bohr) or 'molecules:CH4,H2Ox5' (compounds, randomly rotated and distorted
    geometries); see docs/system_sets.md.
    """
    from vmc import shared

    if systems is None:
        if settings:
            raise InputError("--set needs SYSTEMS (a resumed run keeps its configuration)")
        config = shared.load_config(run_dir)
    else:
        config = shared.preset_config(
            preset, shared.SystemSetConfig(systems, seed=set_seed, basis=basis,
                                           orbitals=orbitals_from and os.path.abspath(orbitals_from)),
            shared.ScheduleConfig(geometries_per_step, schedule),
            **_sampling(walkers, pretrain_steps, optimizer=optimizer, float64=float64))
        config = apply_settings(config, settings)
    _run_shared(run_dir, config, steps, time_budget, as_json)


@vmc.command()
@click.argument("base_run")
@click.argument("systems", required=False)
@click.option("--run-dir", required=True, help="Run directory of the fine-tuned model (created, or resumed).")
@click.option("--seed", "set_seed", default=0, show_default=True,
              help="Seed of the rotations and distortions of generated geometries.")
@click.option("--orbitals", "orbitals_from", metavar="PHISNET_RUN",
              help="Take the orbitals from this trained PhiSNet model instead of Hartree-Fock.")
@click.option("--walkers", type=int, help="Walkers per geometry [default: the base run's].")
@click.option("--geometries-per-step", type=int, default=1, show_default=True,
              help="Geometries of one composition batched into one optimisation step.")
@click.option("--schedule", type=click.Choice(["spread", "round_robin"]), default="spread", show_default=True)
@click.option("--pretrain-steps", type=int, default=0, show_default=True,
              help="Supervised steps towards the HF orbitals before VMC (fine-tuning usually needs none).")
@click.option("--steps", type=int, required=True, help="Stop at this total number of VMC optimisation steps.")
@click.option("--time-budget", type=float, help="Stop after this many seconds.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a setting of the fine-tuning run, e.g. --set kfac.damping=1e-3.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def finetune(base_run, systems, run_dir, set_seed, orbitals_from, walkers, geometries_per_step, schedule,
             pretrain_steps, steps, time_budget, settings, as_json):
    """Fine-tune the model of BASE_RUN (any vmc train / pretrain / finetune run directory;
    every weight is reused) on SYSTEMS, or resume --run-dir (then SYSTEMS is left out).

    The network, sampling and optimiser settings are the base run's unless overridden.
    """
    from vmc import shared

    config_exists = os.path.exists(os.path.join(run_dir, "config.json"))
    if systems is None:
        if not config_exists:
            raise InputError(f"SYSTEMS is needed to start fine-tuning in {run_dir}")
        if settings:
            raise InputError("--set needs SYSTEMS (a resumed run keeps its configuration)")
        config = shared.load_config(run_dir)
    else:
        config = shared.finetuning_config(
            base_run, systems, set_seed=set_seed, orbitals_from=orbitals_from,
            schedule=shared.ScheduleConfig(geometries_per_step, schedule), **_sampling(walkers, pretrain_steps))
        config = apply_settings(config, settings)
    _run_shared(run_dir, config, steps, time_budget, as_json)


@vmc.command()
@click.argument("run_dir")
@click.option("--systems", "systems_spec",
              help="Evaluate on these systems instead of the run's own (zero-shot); same forms as SYSTEMS of pretrain.")
@click.option("--seed-systems", default=0, show_default=True, help="Seed of generated geometries of --systems.")
@click.option("--steps", default=200, show_default=True, help="MCMC calls with a local-energy evaluation.")
@click.option("--walkers", type=int, help="Number of walkers [default: the run's].")
@click.option("--burn-in", "burn_in", type=int, help="MCMC calls before sampling [default: the run's, at least 200].")
@click.option("--seed", default=1, show_default=True, help="Seed of the fresh walkers.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def evaluate(run_dir, systems_spec, seed_systems, steps, walkers, burn_in, seed, as_json):
    """Energy of the latest checkpoint in RUN_DIR from fresh MCMC, with a blocking error bar:
    of its system, of every system of a shared run, or of --systems (zero-shot)."""
    from vmc import evaluate as evaluation
    from vmc import shared
    from vmc import train as training

    if systems_spec is not None or shared.is_shared_run(run_dir):
        try:
            origin, results = shared.evaluate_run(run_dir, systems_spec, seed_systems, n_steps=steps,
                                                  n_walkers=walkers, burn_in_sweeps=burn_in, seed=seed)
        except training.TrainingDiverged as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        if as_json:
            click.echo(json.dumps({"parameters": origin, "systems": [dataclasses.asdict(r) for r in results]}))
            return
        click.echo(f"parameters of {origin}; {steps} steps per system")
        for r in results:
            line = f"  {r.name}: E = {r.energy:.6f} +- {r.error:.6f} Ha (variance {r.variance:.4f} Ha^2)"
            if r.reference is not None:
                line += f"; exact {r.reference:.6f} Ha, error {1000 * (r.energy - r.reference):.2f} mHa"
            click.echo(line)
        return
    try:
        result = evaluation.evaluate(run_dir, n_steps=steps, n_walkers=walkers, burn_in_sweeps=burn_in, seed=seed)
    except training.TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result)))
        return
    line = (f"E = {result.energy:.6f} +- {result.error:.6f} Ha (variance {result.variance:.4f} Ha^2; "
            f"{result.n_steps} steps x {result.n_walkers} walkers; checkpoint step {result.checkpoint_step})")
    if result.reference is not None:
        line += (f"; exact {result.reference:.6f} Ha, error "
                 f"{1000 * (result.energy - result.reference):.2f} +- {1000 * result.error:.2f} mHa")
    click.echo(line)


def main(argv: list[str] | None = None) -> None:
    run_cli(vmc, argv)
