"""The errors both pillars raise for what a user can act on.

Anything a user can get wrong (a molecule name, a file, a charge) raises ``InputError`` with a
one-line message; the command-line interface prints it and exits with code 2. A training run
whose loss or parameters stop being finite raises ``TrainingDiverged`` (exit code 1).
"""


class InputError(ValueError):
    """Invalid user input; the message is one line that names the problem."""


class TrainingDiverged(RuntimeError):
    """Energies, losses or parameters became non-finite; the last good checkpoint is kept."""
