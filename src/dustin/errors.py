"""The one exception type dustin raises for bad input; the CLI prints its message without a traceback."""


class DustinError(ValueError):
    """Bad input or environment, with a message that names the cause and the fix."""
