"""The exception types for user errors: the CLI prints them without a traceback."""


class OrpoError(ValueError):
    """Bad input or an unsupported setting, with a message that says what and where.

    The CLI exits with status 1 for these: something failed while doing the work (invalid data, a model
    that does not load, no checkpoint to resume)."""


class UsageError(OrpoError):
    """The command line or config file itself is wrong (unknown key or flag, wrong type, missing
    argument, config file not found): the CLI exits with status 2, like argparse."""


def describe_problems(problems: list[str]) -> str:
    """The one problem, or all of them, one per line."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems with the settings:\n" + "\n".join(f"  - {p}" for p in problems)


class ConfigError(OrpoError):
    """Every problem found in a set of settings at once (so one edit fixes them all), in ``problems``; the
    message is :func:`describe_problems`'s."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(describe_problems(self.problems))
