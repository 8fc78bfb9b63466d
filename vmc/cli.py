"""The ``vmc`` command line (neural-wavefunction VMC).

Every sub-command has ``--help``; ``--json`` prints one JSON object on stdout. Bad input ends
with a one-line ``error: ...`` on stderr and exit code 2; a diverged run ends with exit code 1.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from phisnet_jax.cli import _apply_overrides, _parse_settings, run_cli
from phisnet_jax.errors import InputError


SECTIONS = ("vmc", "ansatz", "kfac", "adam", "system")


def apply_settings(config, settings: tuple[str, ...]):
    """``config`` (a :class:`vmc.train.RunConfig`) with ``--set`` overrides applied. Keys are
    ``section.field`` (sections: vmc, ansatz, kfac, adam, system) or a bare field name that
    only one section has."""
    overrides: dict[str, dict[str, str]] = {}
    for key, value in _parse_settings(settings).items():
        if "." in key:
            section, field = key.split(".", 1)
            if section not in SECTIONS:
                raise InputError(f"unknown settings section {section!r} in {key!r}; expected one of {SECTIONS}")
            candidates = [section]
        else:
            field = key
            candidates = SECTIONS
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


@vmc.command()
@click.argument("run_dir")
@click.option("--steps", default=200, show_default=True, help="MCMC calls with a local-energy evaluation.")
@click.option("--walkers", type=int, help="Number of walkers [default: the run's].")
@click.option("--burn-in", "burn_in", type=int, help="MCMC calls before sampling [default: the run's].")
@click.option("--seed", default=1, show_default=True, help="Seed of the fresh walkers.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def evaluate(run_dir, steps, walkers, burn_in, seed, as_json):
    """Energy of the latest checkpoint in RUN_DIR from fresh MCMC, with a blocking error bar."""
    from vmc import evaluate as evaluation
    from vmc import train as training

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
