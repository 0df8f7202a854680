"""The error wmloc raises for input it cannot use: every message names the file or setting and the fix."""


class InputError(ValueError):
    """Input data that cannot be used as given (the message names the file and the problem)."""
