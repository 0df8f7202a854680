"""The errors wmloc raises for input or data it cannot use: every message names the file or setting and the fix."""


class InputError(ValueError):
    """Input data that cannot be used as given (the message names the file and the problem)."""


class DataError(RuntimeError):
    """A reference data file (atlas, published maps) is missing, corrupt or cannot be fetched."""
