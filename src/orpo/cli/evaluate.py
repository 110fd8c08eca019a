"""``orpo eval``: held-out preference metrics of a model under TRL's names."""

from __future__ import annotations

import argparse

from orpo import defaults
from orpo.cli.options import add_length_limits, add_trust_remote_code, positive_int, remote_code


def add_parser(commands) -> argparse.ArgumentParser:
    evaluate = commands.add_parser(
        "eval",
        help="held-out preference metrics of a model (reward accuracy, margins, log-probs, NLL)",
        description="Score a trained model on preference pairs with TRL's metric names.",
        epilog="example: orpo eval --model orpo-quickstart/orpo --data demo:test --json",
    )
    evaluate.add_argument(
        "--model", required=True, help=f"model directory or hub name ('{defaults.DEMO}': the embedded one)"
    )
    evaluate.add_argument(
        "--data", required=True, help="preference data: file, directory, hub name or demo:test"
    )
    evaluate.add_argument("--tokenizer", help="default: the model's")
    evaluate.add_argument("--split", default="test", help="split of a hub dataset or DatasetDict directory")
    evaluate.add_argument("--subset", help="subset (configuration) of a hub dataset")
    evaluate.add_argument(
        "--alpha", type=float, default=defaults.ALPHA, help="orpo_alpha that scales the rewards"
    )
    evaluate.add_argument("--beta", type=float, default=defaults.BETA, help="orpo_beta of the loss")
    evaluate.add_argument(
        "--nll-include-prompt", action="store_true", help="score the prompt tokens in the NLL too"
    )
    add_length_limits(evaluate)
    evaluate.add_argument("--batch-size", type=positive_int, default=8, help="pairs per evaluation batch")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_trust_remote_code(evaluate)
    return evaluate


def run(args: argparse.Namespace) -> int:
    import json
    import logging
    import tempfile

    import datasets
    from transformers.trainer_callback import PrinterCallback

    from orpo.config import ORPOConfig
    from orpo.data import TruncationLimits, load_pairs
    from orpo.models import load_model_and_tokenizer
    from orpo.trainer import ORPOTrainer

    datasets.disable_progress_bars()
    logging.getLogger("orpo").setLevel(logging.ERROR)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, remote_code(args))
    limits = TruncationLimits(args.max_length, defaults.prompt_limit(args.max_length, args.max_prompt_length))
    pairs, _ = load_pairs(args.data, tokenizer, limits, split=args.split, subset=args.subset)
    with tempfile.TemporaryDirectory() as scratch:
        config = ORPOConfig(
            output_dir=scratch,
            orpo_alpha=args.alpha,
            orpo_beta=args.beta,
            report_to="none",
            per_device_eval_batch_size=args.batch_size,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            nll_include_prompt=args.nll_include_prompt,
            disable_tqdm=True,
        )
        trainer = ORPOTrainer(model=model, args=config, eval_dataset=pairs, tokenizer=tokenizer)
        trainer.remove_callback(PrinterCallback)
        metrics = trainer.evaluate()
    hidden = ("runtime", "per_second", "preparation_time")
    metrics = {k: v for k, v in metrics.items() if k.startswith("eval_") and not any(h in k for h in hidden)}
    if args.json:
        print(json.dumps(metrics, indent=2), file=args.stdout)
    else:
        width = max(len(k) for k in metrics)
        print(f"{args.model} on {args.data} ({len(pairs)} pairs, alpha={args.alpha:g}):")
        for key, value in metrics.items():
            print(f"  {key:<{width}}  {value:.4f}")
    return 0
