"""``orpo merge``: fold a LoRA adapter into its base model and save a plain model."""

from __future__ import annotations

import argparse

from orpo.cli.options import add_trust_remote_code
from orpo.errors import OrpoError, UsageError


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
    from pathlib import Path

    try:
        from peft import PeftModel
    except ImportError as err:
        raise OrpoError("orpo merge needs peft: pip install 'orpo[peft]'") from err
    from orpo.models import check_adapter_base, load_causal_lm, load_tokenizer

    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise OrpoError(f"{adapter}: no adapter_config.json (is this a LoRA adapter directory?)")
    check_adapter_base(adapter)
    output = Path(args.output)
    if output.resolve() == adapter.resolve():
        raise UsageError(
            f"--output {output} is the adapter's own directory; the merged model needs another one"
        )
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise UsageError(f"--output {output} is not empty; choose a new directory, or pass --overwrite")
    base_name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    # The base through orpo's loader (a hub name, a folder or a GGUF file), then the adapter on it.
    from orpo.run_folder import record_prompt_format, trained_with_chat_template

    base = load_causal_lm(base_name, {"trust_remote_code": args.trust_remote_code})
    try:
        model = PeftModel.from_pretrained(base, str(adapter))
    except (OSError, ValueError) as err:
        raise OrpoError(
            f"could not load the adapter in {adapter} onto its base model {base_name}: {err}"
        ) from err
    merged = model.merge_and_unload()
    merged.save_pretrained(args.output)
    if (adapter / "tokenizer_config.json").is_file():
        load_tokenizer(str(adapter), args.trust_remote_code).save_pretrained(args.output)
    trained = trained_with_chat_template(adapter)
    if trained is not None:  # generate prompts the merged model as the adapter was trained
        record_prompt_format(args.output, trained)
    print(f"merged {adapter} into its base model ({base_name}); saved to {args.output}/")
    return 0
