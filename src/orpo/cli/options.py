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


def _number(kind: type, accepts, requirement: str):
    """An argparse type: ``kind`` (int or float) for which ``accepts(value)`` holds, else ``requirement``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got '{text}'"
            ) from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {value}")
        return value

    return parse


positive_int = _number(int, lambda value: value >= 1, "must be at least 1")
probability = _number(float, lambda value: 0 < value <= 1, "must be above 0 and at most 1")
non_negative = _number(float, lambda value: 0 <= value < float("inf"), "must be a finite number from 0")
