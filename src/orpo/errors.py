"""The one exception type for user errors: the CLI prints it without a traceback."""


class OrpoError(ValueError):
    """Bad input or an unsupported setting, with a message that says what and where."""
