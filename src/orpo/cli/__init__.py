"""The ``orpo`` command line: one module per command (``train``, ``eval``, ``generate``, ``plot``, ``merge``,
``export``, ``check-data``, ``quickstart``), each with its own arguments (``add_parser``) and handler (``run``);
:mod:`.run_config` reads config files and :mod:`.axolotl` translates Axolotl's. Parsing imports nothing
heavy: ``orpo --help`` and usage errors answer without loading torch or transformers."""

from __future__ import annotations

import argparse
import contextlib
import sys

from orpo import __version__
from orpo.cli import check_data, evaluate, export, generate, merge, plot, quickstart, train
from orpo.errors import OrpoError, UsageError

COMMANDS = (train, evaluate, generate, plot, merge, export, quickstart, check_data)
_BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orpo",
        description="ORPO (Odds Ratio Preference Optimization) on the Hugging Face stack.",
    )
    parser.add_argument("--version", action="version", version=f"orpo {__version__}")
    _add_global_options(parser, False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = command.add_parser(commands)
        if sub.formatter_class is argparse.HelpFormatter:
            sub.formatter_class = WholeWordsHelpFormatter
        # Also after the command (`orpo train c.yaml --verbose`): train would otherwise take an unknown
        # --verbose for a config key. Unset there, so they do not undo the same option given before it.
        _add_global_options(sub, argparse.SUPPRESS)
        sub.set_defaults(handler=command.run)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show full tracebacks for errors"
    )
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "--quiet", action="store_true", default=default, help="only errors (no warnings, no progress bars)"
    )
    loudness.add_argument(
        "--verbose", action="store_true", default=default, help="also informational log messages"
    )


class WholeWordsHelpFormatter(argparse.HelpFormatter):
    """argparse's help, wrapped between words only: its default breaks at hyphens, which split flags such as
    --no-chat-template across lines in a narrow terminal."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text, width, indent):
        import textwrap

        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
            break_long_words=False,
        )


def _set_loudness(quiet: bool, verbose: bool) -> None:
    """Python logging for orpo, transformers and datasets: warnings by default."""
    import logging

    import datasets
    from transformers.utils import logging as hf_logging

    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("orpo").setLevel(level)
    hf_logging.set_verbosity(level)
    # transformers imports peft, and peft bitsandbytes where installed, whose import on CPUs with bf16
    # instructions warns that an optional kernel from the hub is missing: noise on every command.
    logging.getLogger(_BNB_CPU_KERNEL_LOGGER).setLevel(logging.INFO if verbose else logging.ERROR)
    if quiet:
        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    _set_loudness(quiet=args.quiet, verbose=args.verbose)
    # Machine-readable output (--json) is the only thing on stdout: anything else a library prints there while
    # the command works (DeepSpeed announces its accelerator on stdout when accelerate imports it) goes to
    # stderr; the command writes its JSON to args.stdout.
    args.stdout = sys.stdout
    quiet_stdout = (
        contextlib.redirect_stdout(sys.stderr) if getattr(args, "json", False) else contextlib.nullcontext()
    )
    try:
        with quiet_stdout:
            return args.handler(args)
    except OrpoError as err:
        if args.debug:
            raise
        print(f"orpo: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt:
        print("orpo: interrupted", file=sys.stderr)
        return 130
