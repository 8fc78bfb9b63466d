"""Command-line plumbing shared by the ``phisnet`` and ``vmc`` commands.

The error contract of both: bad input (an :class:`~molfoundation.errors.InputError` or a click
usage error) ends with one line ``error: ...`` on stderr and exit code 2, Ctrl-C with exit code
130; the commands themselves end a diverged training run with exit code 1.
"""

from __future__ import annotations

import functools
import logging
import sys

import click

from molfoundation import compiling, distributed
from molfoundation.errors import InputError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def run_cli(group: click.Group, argv: list[str] | None = None) -> None:
    """Run a click group (``sys.argv`` by default, ``--help`` when no arguments are given) with
    the error contract above, compiled programs kept between runs
    (:func:`~molfoundation.compiling.use_persistent_cache`); always ends with ``sys.exit``."""
    argv = sys.argv[1:] if argv is None else argv
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's informational messages
    compiling.use_persistent_cache()
    try:
        code = group.main(args=argv or ["--help"], standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        print_error(exc.format_message())
        code = EXIT_BAD_INPUT
    except InputError as exc:
        print_error(str(exc))
        code = EXIT_BAD_INPUT
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("interrupted; re-run the same command to continue", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)


def print_error(message: str) -> None:
    """``error: message`` on stderr, on one line whatever line breaks the message has."""
    print("error: " + " ".join(message.split()), file=sys.stderr)


def settings_option(help_text: str):
    """The repeatable ``--set KEY=VALUE`` option (values typed by
    :mod:`molfoundation.settings`), passed to the command as ``settings``."""
    return click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help=help_text)


def checkpoint_option():
    """The ``--checkpoint STEP`` option of the commands that load a trained model, passed as
    ``checkpoint_step`` (None: the newest checkpoint)."""
    return click.option("--checkpoint", "checkpoint_step", type=int, metavar="STEP",
                        help="Load the checkpoint of this step instead of the newest (e.g. when the newest "
                        "cannot be read).")


def process_group_options(command):
    """The options that make a training command one process of a multi-process run
    (:mod:`molfoundation.distributed`), each also read from the environment; the command joins
    the group before it runs."""
    options = [
        click.option("--coordinator", envvar="JAX_COORDINATOR_ADDRESS", metavar="HOST:PORT",
                     help="Multi-process run: address of process 0, where the processes meet "
                     "(env JAX_COORDINATOR_ADDRESS)."),
        click.option("--num-processes", type=click.IntRange(min=1), envvar="JAX_NUM_PROCESSES",
                     help="Multi-process run: the number of processes (env JAX_NUM_PROCESSES)."),
        click.option("--process-id", type=click.IntRange(min=0), envvar="JAX_PROCESS_ID",
                     help="Multi-process run: this process's index, 0 for the one that writes the run "
                     "directory (env JAX_PROCESS_ID)."),
        click.option("--cluster", is_flag=True,
                     help="Multi-process run on a cluster JAX knows (SLURM, Open MPI): what the three options "
                     "above leave out comes from its environment (e.g. one process per task of srun)."),
    ]

    @functools.wraps(command)
    def joined(*args, coordinator, num_processes, process_id, cluster, **kwargs):
        distributed.join(distributed.ProcessGroup(coordinator, num_processes, process_id, cluster))
        return command(*args, **kwargs)

    for option in reversed(options):
        joined = option(joined)
    return joined
