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
    import json
    import os
    import shutil
    from pathlib import Path

    from orpo import run_folder
    from orpo.models import merge_adapter

    adapter = Path(args.adapter)
    output = Path(args.output)
    if output.resolve() == adapter.resolve():
        raise UsageError(
            f"--output {output} is the adapter's own directory; the merged model needs another one"
        )
    if (adapter / "adapter_config.json").is_file():
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if base and Path(base).exists() and Path(base).resolve() == output.resolve():
            raise UsageError(
                f"--output {output} is the adapter's base model, which the adapter loads onto; the merged "
                "model needs another directory"
            )
    if output.is_dir() and any(output.iterdir()):
        if not args.overwrite:
            raise UsageError(f"--output {output} is not empty; choose a new directory, or pass --overwrite")
        if foreign := run_folder.foreign_entries(output):
            raise UsageError(
                f"--output {output} holds entries orpo did not write ({', '.join(foreign[:6])}); --overwrite "
                "replaces only a model folder orpo wrote: choose another --output"
            )
    merged, tokenizer = merge_adapter(adapter, args.trust_remote_code)
    # Written beside the target and renamed into place when complete: a killed merge leaves no folder that
    # loads as if it were the merged model.
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        merged.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        # The run's settings go with its weights: orpo eval scores the merged model as the adapter's run.
        if (adapter / run_folder.SETTINGS_FILE).is_file():
            shutil.copy2(adapter / run_folder.SETTINGS_FILE, staging / run_folder.SETTINGS_FILE)
        trained = run_folder.trained_with_chat_template(adapter)
        if trained is not None:  # generate prompts the merged model as the adapter was trained
            run_folder.record_prompt_format(staging, trained)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"merged {adapter} into its base model; saved to {args.output}/")
    return 0
