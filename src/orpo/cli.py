"""The ``orpo`` command line: ``orpo quickstart`` (more commands grow here)."""

from __future__ import annotations

import argparse
import sys

from orpo import __version__
from orpo.errors import OrpoError


def _quickstart(args: argparse.Namespace) -> int:
    from orpo.quickstart import run_quickstart

    run_quickstart(output_dir=args.output_dir, max_steps=args.max_steps, seed=args.seed, alpha=args.alpha)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orpo",
        description="ORPO (Odds Ratio Preference Optimization) on the Hugging Face stack.",
    )
    parser.add_argument("--version", action="version", version=f"orpo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    quick = commands.add_parser(
        "quickstart",
        help="train the embedded tiny model with ORPO and SFT-only on shipped data and compare them",
        description="Train the embedded tiny model twice on the shipped preference data — ORPO and an "
        "SFT-only baseline (alpha=0) — then compare them on held-out pairs. CPU is enough.",
        epilog="example: orpo quickstart --output-dir ./orpo-quickstart --max-steps 300 --seed 0",
    )
    quick.add_argument("--output-dir", default="./orpo-quickstart", help="where models and reports go")
    quick.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps per run (default: the demo's)"
    )
    quick.add_argument("--seed", type=int, default=0, help="seed for model init and data order")
    quick.add_argument(
        "--alpha", type=float, default=None, help="orpo_alpha of the ORPO run (default: the demo's)"
    )
    quick.set_defaults(handler=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except OrpoError as err:
        if args.debug:
            raise
        print(f"orpo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orpo: interrupted", file=sys.stderr)
        return 130
