"""``orpo eval``: held-out preference metrics of a model under TRL's names."""

from __future__ import annotations

import argparse
import sys

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
        "--alpha",
        type=float,
        help="orpo_alpha that scales the rewards (default: the training run's, from the orpo_config.yaml beside "
        f"the model; else {defaults.ALPHA})",
    )
    evaluate.add_argument(
        "--beta", type=float, help=f"orpo_beta of the loss (default: the run's, else {defaults.BETA})"
    )
    evaluate.add_argument(
        "--nll-include-prompt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score the prompt tokens in the NLL too, or not (default: as the run did; else "
        f"{'on' if defaults.NLL_INCLUDE_PROMPT else 'off'})",
    )
    add_length_limits(evaluate, default_max_length=None)
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
    settings, source = _settings(args)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, remote_code(args))
    limits = TruncationLimits(settings["max_length"], settings["max_prompt_length"])
    pairs, _ = load_pairs(args.data, tokenizer, limits, split=args.split, subset=args.subset)
    with tempfile.TemporaryDirectory() as scratch:
        config = ORPOConfig(
            output_dir=scratch,
            report_to="none",
            per_device_eval_batch_size=args.batch_size,
            disable_tqdm=True,
            **settings,
        )
        trainer = ORPOTrainer(model=model, args=config, eval_dataset=pairs, tokenizer=tokenizer)
        trainer.remove_callback(PrinterCallback)
        metrics = trainer.evaluate()
    hidden = ("runtime", "per_second", "preparation_time")
    metrics = {k: v for k, v in metrics.items() if k.startswith("eval_") and not any(h in k for h in hidden)}
    alpha = f"alpha={settings['orpo_alpha']:g} from {source}"
    if args.json:
        print(json.dumps(metrics, indent=2), file=args.stdout)
        print(alpha, file=sys.stderr)
    else:
        width = max(len(k) for k in metrics)
        print(f"{args.model} on {args.data} ({len(pairs)} pairs, {alpha}):")
        for key, value in metrics.items():
            print(f"  {key:<{width}}  {value:.4f}")
    return 0


# ORPOConfig fields eval scores with, and its flags for them.
SCORING = {
    "orpo_alpha": "alpha",
    "orpo_beta": "beta",
    "nll_include_prompt": "nll_include_prompt",
    "max_length": "max_length",
    "max_prompt_length": "max_prompt_length",
}


def _settings(args: argparse.Namespace) -> tuple[dict, str]:
    """How to score: each flag given, else the model's training run's value (the orpo_config.yaml that
    orpo train and the quickstart save beside the model), else the default; and where alpha came from."""
    from pathlib import Path

    from orpo.errors import OrpoError
    from orpo.run_folder import SETTINGS_FILE, read_settings

    saved_file = Path(args.model) / SETTINGS_FILE
    try:
        saved = read_settings(args.model) or {}
    except OrpoError as err:  # score with the flags and defaults, saying why
        print(f"warning: {err}; scoring with the flags and defaults instead", file=sys.stderr)
        saved = {}
    settings = {
        "orpo_alpha": defaults.ALPHA,
        "orpo_beta": defaults.BETA,
        # a settings file from before the default changed (issue 27) does not record it
        "nll_include_prompt": defaults.NLL_INCLUDE_PROMPT_UNRECORDED
        if saved
        else defaults.NLL_INCLUDE_PROMPT,
        "max_length": defaults.MAX_LENGTH,
    }
    settings.update({key: saved[key] for key in SCORING if key in saved})
    settings.update(
        {key: getattr(args, flag) for key, flag in SCORING.items() if getattr(args, flag) is not None}
    )
    settings["max_prompt_length"] = defaults.prompt_limit(
        settings["max_length"], settings.get("max_prompt_length")
    )
    source = (
        "--alpha" if args.alpha is not None else (str(saved_file) if "orpo_alpha" in saved else "the default")
    )
    return settings, source
