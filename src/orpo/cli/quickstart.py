"""``orpo quickstart``: ORPO against SFT-only on the embedded tiny model and the shipped data."""

from __future__ import annotations

import argparse


def add_parser(commands) -> argparse.ArgumentParser:
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
    return quick


def run(args: argparse.Namespace) -> int:
    from orpo.quickstart import run_quickstart

    run_quickstart(output_dir=args.output_dir, max_steps=args.max_steps, seed=args.seed, alpha=args.alpha)
    return 0
