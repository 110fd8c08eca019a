"""``orpo merge``: fold a LoRA adapter into its base model and save a plain model."""

from __future__ import annotations

import argparse

from orpo.cli.options import add_trust_remote_code
from orpo.errors import UsageError


def add_parser(commands) -> argparse.ArgumentParser:
    merge = commands.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model and save the full model",
        description="Load a LoRA adapter directory (as written by a peft run of orpo train) with its base model, "
        "fold the adapter into the weights and save a plain model (safetensors) plus the tokenizer.",
        epilog="example: orpo merge --adapter out/ --output out-merged/",
    )
    merge.add_argument("--adapter", required=True, help="directory with adapter_config.json")
    merge.add_argument(
        "--output", required=True, help="where the merged model goes (a new or empty directory)"
    )
    merge.add_argument("--overwrite", action="store_true", help="write into a non-empty --output directory")
    add_trust_remote_code(merge)
    return merge


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orpo.models import merge_adapter
    from orpo.run_folder import record_prompt_format, trained_with_chat_template

    adapter = Path(args.adapter)
    output = Path(args.output)
    if output.resolve() == adapter.resolve():
        raise UsageError(
            f"--output {output} is the adapter's own directory; the merged model needs another one"
        )
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise UsageError(f"--output {output} is not empty; choose a new directory, or pass --overwrite")
    merged, tokenizer = merge_adapter(adapter, args.trust_remote_code)
    merged.save_pretrained(args.output)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output)
    trained = trained_with_chat_template(adapter)
    if trained is not None:  # generate prompts the merged model as the adapter was trained
        record_prompt_format(args.output, trained)
    print(f"merged {adapter} into its base model; saved to {args.output}/")
    return 0
