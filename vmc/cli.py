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

from molfoundation.cli import checkpoint_option, print_error, process_group_options, run_cli, settings_option
from molfoundation.errors import InputError, TrainingDiverged
from molfoundation.settings import apply_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def vmc():
    """Transferable neural wavefunctions trained by variational Monte Carlo."""


def _with_options(*options):
    """A decorator applying click ``options`` in the order listed."""
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


# The options of a new training run (vmc train and vmc pretrain).
NEW_RUN_OPTIONS = _with_options(
    click.option("--run-dir", required=True, help="Run directory (created, or resumed if it exists)."),
    click.option("--preset", type=click.Choice(["paper", "small", "tiny"]), default="small", show_default=True,
                 help="Network and sampling size: the reference recipe or smaller ones for CPU runs "
                      "(see vmc.config.preset_config)."),
    click.option("--basis", default="sto-6g", show_default=True, help="Minimal basis of the HF orbitals."),
    click.option("--optimizer", type=click.Choice(["kfac", "adam"]), default="kfac", show_default=True),
    click.option("--walkers", type=int, help="Walkers per geometry [default: the preset's]."),
    click.option("--hf-fit-steps", type=int, help="Supervised steps towards the HF orbitals [default: the preset's]."),
    click.option("--float64", is_flag=True, help="Run in double precision."),
)
# The options of every training command, after its own.
RUN_OPTIONS = _with_options(
    click.option("--steps", type=int, required=True, help="Stop at this total number of VMC optimisation steps."),
    click.option("--time-budget", type=float, help="Stop after this many seconds (HF fit included)."),
    settings_option("Override any setting, e.g. --set kfac.learning_rate=0.05 --set n_determinants=8."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout."),
)


@vmc.command()
@click.argument("system", required=False)
@NEW_RUN_OPTIONS
@click.option("--charge", default=0, show_default=True)
@click.option("--spin", type=int, help="2S = N_up - N_down [default: the system's usual spin].")
@RUN_OPTIONS
@process_group_options
def train(system, run_dir, preset, charge, spin, basis, optimizer, walkers, hf_fit_steps, steps,
          time_budget, float64, settings, as_json):
    """Fit the orbitals to Hartree-Fock, then optimise the energy by VMC (or resume --run-dir).

    SYSTEM is a name (H, H2, LiH, Li, Be, N2, H2O, CH4, H<n> chains) or an XYZ file in
    angstrom. Without SYSTEM, the run in --run-dir continues with its stored configuration.
    """
    from vmc import config as configs

    if system is None:
        config = _stored_config(run_dir, settings)
    else:
        config = configs.preset_config(
            preset, configs.SystemsConfig(system, charge=charge, spin=spin, basis=basis),
            **_sampling(walkers, hf_fit_steps, optimizer=optimizer, float64=float64))
        config = apply_settings(config, settings)
    _run(run_dir, config, steps, time_budget, as_json)


def _stored_config(run_dir: str, settings):
    from vmc import config as configs

    if settings:
        raise InputError("--set needs the systems (a resumed run keeps its configuration)")
    return configs.load_config(run_dir)


def _run(run_dir, config, steps, time_budget, as_json):
    """Train ``config`` in ``run_dir`` and report the result."""
    from vmc import train as training

    try:
        result = training.train(run_dir, config, max_steps=steps, time_budget=time_budget)
    except TrainingDiverged as exc:
        print_error(str(exc))
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result)))
        return
    click.echo(f"HF fit: {result.hf_fit_steps} steps; VMC at step {result.steps} ({result.stopped_because})")
    for name, energy in result.energies.items():
        click.echo(f"  {name}: {energy:.5f} Ha (mean of the last 10 % of its {result.visits[name]} visits)")
    if result.energies:
        # The logged energies run below the network's own (docs/vmc.md, "vmc evaluate").
        click.echo(f"training energies; the network's energy: vmc evaluate {run_dir}")


def _sampling(walkers, hf_fit_steps, **fixed) -> dict:
    settings = dict(fixed)
    if walkers is not None:
        settings["n_walkers"] = walkers
    if hf_fit_steps is not None:
        settings["hf_fit_steps"] = hf_fit_steps
    return settings


@vmc.command()
@click.argument("systems", required=False)
@NEW_RUN_OPTIONS
@click.option("--seed", "set_seed", default=0, show_default=True,
              help="Seed of the rotations and distortions of generated geometries.")
@click.option("--orbitals", "orbitals_from", metavar="PHISNET_RUN",
              help="Take the orbitals from this trained PhiSNet model instead of Hartree-Fock.")
@click.option("--geometries-per-step", type=int, default=1, show_default=True,
              help="Geometries of one composition batched into one optimisation step.")
@click.option("--schedule", type=click.Choice(["spread", "round_robin"]), default="spread", show_default=True,
              help="Which geometries a step takes (spread: round-robin first, then the largest energy spread).")
@RUN_OPTIONS
@process_group_options
def pretrain(systems, run_dir, preset, set_seed, basis, orbitals_from, optimizer, walkers, geometries_per_step,
             schedule, hf_fit_steps, steps, time_budget, float64, settings, as_json):
    """Train a base model: one wavefunction over a set of molecules and geometries (HF fit,
    then shared VMC), or resume --run-dir.

    SYSTEMS is an XYZ system-set file, 'hchains:6@1.4,1.6,1.8' (hydrogen chains: lengths @
    spacings in bohr) or 'molecules:CH4,H2Ox5' (compounds, randomly rotated and distorted
    geometries); see docs/system_sets.md.
    """
    from vmc import config as configs

    if systems is None:
        config = _stored_config(run_dir, settings)
    else:
        config = configs.preset_config(
            preset, configs.SystemsConfig(systems, seed=set_seed, basis=basis,
                                          orbitals=orbitals_from and os.path.abspath(orbitals_from)),
            configs.ScheduleConfig(geometries_per_step, schedule),
            **_sampling(walkers, hf_fit_steps, optimizer=optimizer, float64=float64))
        config = apply_settings(config, settings)
    _run(run_dir, config, steps, time_budget, as_json)


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
@click.option("--hf-fit-steps", type=int, default=0, show_default=True,
              help="Supervised steps towards the HF orbitals before VMC (fine-tuning usually needs none).")
@RUN_OPTIONS
@process_group_options
def finetune(base_run, systems, run_dir, set_seed, orbitals_from, walkers, geometries_per_step, schedule,
             hf_fit_steps, steps, time_budget, settings, as_json):
    """Fine-tune the model of BASE_RUN (any vmc train / pretrain / finetune run directory, or the
    name of a shipped model such as hchains-base; every weight is reused) on SYSTEMS, or resume
    --run-dir (then SYSTEMS is left out).

    The network, sampling and optimiser settings are the base run's unless overridden.
    """
    from vmc import config as configs

    if systems is None:
        if not configs.run_directory(run_dir).has_config():
            raise InputError(f"SYSTEMS is needed to start fine-tuning in {run_dir}")
        config = _stored_config(run_dir, settings)
    else:
        config = configs.finetuning_config(
            base_run, systems, set_seed=set_seed, orbitals_from=orbitals_from,
            schedule=configs.ScheduleConfig(geometries_per_step, schedule), **_sampling(walkers, hf_fit_steps))
        config = apply_settings(config, settings)
    _run(run_dir, config, steps, time_budget, as_json)


@vmc.command()
@click.argument("run_dir")
@click.option("--systems", "systems_spec",
              help="Evaluate on these systems instead of the run's own (zero-shot); same forms as SYSTEMS of pretrain.")
@click.option("--seed-systems", default=0, show_default=True, help="Seed of generated geometries of --systems.")
@click.option("--steps", default=200, show_default=True, help="MCMC calls with a local-energy evaluation.")
@click.option("--walkers", type=int, help="Number of walkers [default: the run's].")
@click.option("--burn-in", "burn_in", type=int, help="MCMC calls before sampling [default: the run's, at least 200].")
@click.option("--seed", default=1, show_default=True, help="Seed of the fresh walkers.")
@checkpoint_option()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def evaluate(run_dir, systems_spec, seed_systems, steps, walkers, burn_in, seed, checkpoint_step, as_json):
    """Energies of the latest checkpoint in RUN_DIR (or of a shipped model) from fresh MCMC, with
    blocking error bars: of its systems, or of --systems (zero-shot)."""
    from vmc import evaluate as evaluation

    try:
        result = evaluation.evaluate_run(run_dir, systems_spec, seed_systems, n_steps=steps, n_walkers=walkers,
                                         burn_in_sweeps=burn_in, seed=seed, step=checkpoint_step)
    except TrainingDiverged as exc:
        print_error(str(exc))
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result)))
        return
    click.echo(f"parameters of {result.parameters}; {steps} steps x {result.n_walkers} walkers per system "
               f"after {result.burn_in_sweeps} calls of burn-in")
    for r in result.systems:
        line = f"  {r.name}: E = {r.energy:.6f} +- {r.error:.6f} Ha (variance {r.variance:.4f} Ha^2)"
        if r.reference is not None:
            line += (f"; exact {r.reference:.6f} Ha, error {1000 * (r.energy - r.reference):.2f} "
                     f"+- {1000 * r.error:.2f} mHa")
        click.echo(line)


@vmc.command()
@click.argument("run_dir")
@click.argument("name")
@click.option("--made-by", required=True, help="The command that made the run, for the card.")
@click.option("--eval-steps", default=200, show_default=True,
              help="MCMC calls of the evaluation whose energies the card records.")
@click.option("--burn-in", "burn_in", type=int, help="MCMC calls before that evaluation [default: the run's, at "
              "least 200].")
@click.option("--directory", help="Where to write the model [default: the package's models directory].")
def export(run_dir, name, made_by, eval_steps, burn_in, directory):
    """Ship the latest VMC parameters of RUN_DIR as the model NAME (loadable by name, e.g.
    vmc finetune NAME H10 ...), with a card of its systems and energies."""
    from vmc import shipped

    shelf = shipped.MODELS if directory is None else dataclasses.replace(shipped.MODELS, directory=directory)
    record = shipped.export(run_dir, name, made_by, eval_steps, burn_in, shelf=shelf)
    click.echo(f"wrote {name}: vmc step {record['step']}")
    for r in record["card"]["evaluation"]["systems"]:
        click.echo(f"  {r['name']}: E = {r['energy']:.5f} +- {r['error']:.5f} Ha")


def main(argv: list[str] | None = None) -> None:
    run_cli(vmc, argv)
