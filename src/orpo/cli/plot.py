"""``orpo plot``: the curves of one or more runs, overlaid, as a PNG."""

from __future__ import annotations

import argparse


def add_parser(commands) -> argparse.ArgumentParser:
    plot = commands.add_parser(
        "plot",
        help="PNG of loss, reward accuracy/margins and chosen/rejected log-probs of one or more runs",
        description="Read trainer_state.json (or log_history.json) of each run directory and draw the curves "
        "of all runs overlaid.",
        epilog="example: orpo plot orpo-quickstart/orpo orpo-quickstart/sft --output curves.png",
    )
    plot.add_argument("runs", nargs="+", help="run directories")
    plot.add_argument("--output", default="orpo_curves.png")
    return plot


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orpo.plot import plot_runs, read_log_history

    runs = [(Path(run).name or str(run), read_log_history(run)) for run in args.runs]
    plot_runs(runs, args.output)
    print(f"wrote {args.output} ({len(runs)} run(s))")
    return 0
