"""Arguments several commands share, spelled once."""

from __future__ import annotations

import argparse

from orpo import defaults
from orpo.errors import UsageError


def add_trust_remote_code(parser: argparse.ArgumentParser, what: str = "the model") -> None:
    parser.add_argument(
        "--trust-remote-code", action="store_true", help=f"let {what} run code from its repository"
    )


def add_length_limits(
    parser: argparse.ArgumentParser, default_max_length: int | None = defaults.MAX_LENGTH
) -> None:
    parser.add_argument(
        "--max-length",
        type=positive_int,
        default=default_max_length,
        help=f"max prompt + response tokens (default {defaults.MAX_LENGTH})",
    )
    parser.add_argument(
        "--max-prompt-length",
        type=positive_int,
        default=None,
        help="max prompt tokens, keeping the end (default: half of --max-length)",
    )


def remote_code(args: argparse.Namespace) -> dict | None:
    """``--trust-remote-code`` as loader kwargs (off unless given)."""
    return {"trust_remote_code": True} if args.trust_remote_code else None


def parse_columns(text: str | None) -> dict[str, str] | None:
    """``--columns prompt=COL,chosen=COL,rejected=COL`` as a mapping."""
    if not text:
        return None
    mapping = {}
    for item in text.split(","):
        target, sep, source = item.partition("=")
        if not sep or target.strip() not in ("prompt", "chosen", "rejected") or not source.strip():
            raise UsageError(f"--columns takes prompt=COL,chosen=COL,rejected=COL; got '{item}'")
        mapping[target.strip()] = source.strip()
    return mapping


def positive_int(text: str) -> int:
    """An argparse type: a whole number from 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def probability(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {value}")
    return value


def non_negative(text: str) -> float:
    """An argparse type: a finite number from 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number from 0, got {value}")
    return value
