"""The ``orpo`` command line: ``orpo quickstart``, ``orpo check-data`` (more commands grow here)."""

from __future__ import annotations

import argparse
import sys

from orpo import __version__
from orpo.errors import OrpoError


def _quickstart(args: argparse.Namespace) -> int:
    from orpo.quickstart import run_quickstart

    run_quickstart(output_dir=args.output_dir, max_steps=args.max_steps, seed=args.seed, alpha=args.alpha)
    return 0


def _parse_columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    mapping = {}
    for item in text.split(","):
        target, sep, source = item.partition("=")
        if not sep or target.strip() not in ("prompt", "chosen", "rejected") or not source.strip():
            raise OrpoError(f"--columns takes prompt=COL,chosen=COL,rejected=COL; got '{item}'")
        mapping[target.strip()] = source.strip()
    return mapping


def _check_data(args: argparse.Namespace) -> int:
    import logging

    import datasets

    from orpo.check_data import check_data
    from orpo.data import TruncationLimits

    datasets.disable_progress_bars()
    logging.getLogger("orpo").setLevel(logging.ERROR)  # the report carries the counts
    tokenizer = None
    if args.tokenizer == "demo":
        from orpo.demo import demo_tokenizer

        tokenizer = demo_tokenizer()
    elif args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as err:
            raise OrpoError(f"could not load a tokenizer from '{args.tokenizer}': {err}") from err
    limits = TruncationLimits(args.max_length, args.max_prompt_length, args.max_completion_length)
    report = check_data(
        args.path,
        tokenizer,
        fmt=args.format,
        columns=_parse_columns(args.columns),
        limits=limits,
        skip_invalid=args.skip_invalid,
        split=args.split,
        subset=args.subset,
    )
    print(report)
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

    check = commands.add_parser(
        "check-data",
        help="validate a preference dataset and summarise its format, lengths and truncation",
        description="Load a preference dataset (.jsonl, .json, .csv, .parquet, a save_to_disk or plain "
        "directory, or a hub name), detect its format, list invalid rows as file:line: field: problem, and with "
        "a tokenizer show token-length percentiles, what max lengths would truncate or drop, and the first row "
        "as the model will see it. Exit status 0 when the data is valid, 2 when not.",
        epilog="examples:\n  orpo check-data prefs.jsonl --tokenizer Qwen/Qwen2-0.5B-Instruct --max-length 2048\n"
        "  orpo check-data pairs.csv --columns prompt=question,chosen=response_j,rejected=response_k",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("path", help="file, directory or hub dataset name")
    check.add_argument("--tokenizer", help="tokenizer name or directory ('demo' for the embedded one)")
    check.add_argument("--format", default="auto", choices=["auto", "standard", "conversational", "implicit"])
    check.add_argument("--columns", help="map your columns: prompt=COL,chosen=COL,rejected=COL")
    check.add_argument("--split", default="train", help="split of a hub dataset or DatasetDict directory")
    check.add_argument("--subset", help="subset (configuration) of a hub dataset")
    check.add_argument("--max-length", type=int, default=1024)
    check.add_argument("--max-prompt-length", type=int, default=512)
    check.add_argument("--max-completion-length", type=int, default=None)
    check.add_argument(
        "--skip-invalid", action="store_true", help="drop invalid rows (counted) instead of failing"
    )
    check.set_defaults(handler=_check_data)
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
