"""The ``vmc`` command line (neural-wavefunction VMC)."""

from __future__ import annotations

import click

from phisnet_jax.cli import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def vmc():
    """Transferable neural wavefunctions trained by variational Monte Carlo."""


def main(argv: list[str] | None = None) -> None:
    run_cli(vmc, argv)
