"""``orpo check-data``: validate and summarise a preference dataset before training on it."""

from __future__ import annotations

import argparse

from orpo import defaults
from orpo.cli.options import add_length_limits, add_trust_remote_code, parse_columns


def add_parser(commands) -> argparse.ArgumentParser:
    check = commands.add_parser(
        "check-data",
        help="validate a preference dataset and summarise its format, lengths and truncation",
        description="Load a preference dataset (.jsonl, .json, .csv, .parquet, a save_to_disk or plain "
        "directory, or a hub name), detect its format, list invalid rows as file:line: field: problem, and with "
        "a tokenizer show token-length percentiles, what max lengths would truncate or drop, and the first row "
        "as the model will see it. Exit status 0 when the data is valid, 1 when not.",
        epilog="examples:\n  orpo check-data prefs.jsonl --tokenizer Qwen/Qwen2-0.5B-Instruct --max-length 2048\n"
        "  orpo check-data pairs.csv --columns prompt=question,chosen=response_j,rejected=response_k",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("path", help="file, directory or hub dataset name")
    check.add_argument(
        "--tokenizer", help=f"tokenizer name or directory ('{defaults.DEMO}' for the embedded one)"
    )
    check.add_argument("--format", default="auto", choices=["auto", *defaults.FORMATS])
    check.add_argument("--columns", help="map your columns: prompt=COL,chosen=COL,rejected=COL")
    check.add_argument("--split", default="train", help="split of a hub dataset or DatasetDict directory")
    check.add_argument("--subset", help="subset (configuration) of a hub dataset")
    add_length_limits(check)
    check.add_argument(
        "--max-completion-length", type=int, default=None, help="max response tokens (keeps the start)"
    )
    check.add_argument(
        "--skip-invalid", action="store_true", help="drop invalid rows (counted) instead of failing"
    )
    add_trust_remote_code(check, "the tokenizer")
    return check


def run(args: argparse.Namespace) -> int:
    import logging

    import datasets

    from orpo.data import TruncationLimits
    from orpo.data.check import check_data
    from orpo.models import load_tokenizer

    datasets.disable_progress_bars()
    logging.getLogger("orpo").setLevel(logging.ERROR)  # the report carries the counts
    tokenizer = load_tokenizer(args.tokenizer, args.trust_remote_code) if args.tokenizer else None
    report = check_data(
        args.path,
        tokenizer,
        fmt=args.format,
        columns=parse_columns(args.columns),
        limits=TruncationLimits(
            args.max_length,
            defaults.prompt_limit(args.max_length, args.max_prompt_length),
            args.max_completion_length,
        ),
        skip_invalid=args.skip_invalid,
        split=args.split,
        subset=args.subset,
    )
    print(report)
    return 0
