"""The exception types for user errors: the CLI prints them without a traceback."""


class OrpoError(ValueError):
    """Bad input or an unsupported setting, with a message that says what and where.

    The CLI exits with status 1 for these: something failed while doing the work (invalid data, a model
    that does not load, no checkpoint to resume)."""


class UsageError(OrpoError):
    """The command line or config file itself is wrong (unknown key or flag, wrong type, missing
    argument, config file not found): the CLI exits with status 2, like argparse."""
