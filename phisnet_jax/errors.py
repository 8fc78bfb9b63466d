"""The error type for bad user input.

Anything a user can get wrong (a molecule name, a file, a charge) raises ``InputError`` with a
one-line message; the command-line interface prints it and exits with code 2.
"""


class InputError(ValueError):
    """Invalid user input; the message is one line that names the problem."""
