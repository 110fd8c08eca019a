"""``orpo export``: a trained model (or LoRA adapter) as one GGUF file for llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

import argparse

from orpo.cli.options import add_trust_remote_code
from orpo.errors import UsageError
from orpo.export import DEFAULT_TYPE, TYPES


def add_parser(commands) -> argparse.ArgumentParser:
    export = commands.add_parser(
        "export",
        help="write a trained model as a GGUF file (llama.cpp, Ollama, LM Studio)",
        description="Write a model folder saved by orpo train (a LoRA adapter folder is merged into its base "
        "first) as one GGUF file: weights in the chosen type, the tokenizer, its chat template and special "
        "tokens. Supported: Llama-family models (SmolLM, SmolLM2, Llama 3, Mistral) and Qwen2, with "
        "byte-level BPE tokenizers.",
        epilog="example: orpo export out/ --gguf model.gguf --type q8_0   then: llama-cli -m model.gguf, or "
        "an Ollama Modelfile with FROM ./model.gguf",
    )
    export.add_argument("model", metavar="MODEL_DIR", help="a folder saved by orpo train or save_pretrained")
    export.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the file to write")
    export.add_argument(
        "--type",
        default=DEFAULT_TYPE,
        choices=TYPES,
        help="how the weights are stored (default q8_0: a quarter of the fp32 size at next to no loss; "
        "q4_*/q5_* are smaller and lose more, f16/bf16/f32 are exact or near it)",
    )
    export.add_argument(
        "--tokenizer-pre",
        metavar="NAME",
        help="llama.cpp's pre-tokenizer name, for a tokenizer orpo does not recognise (e.g. llama-bpe)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT.gguf")
    add_trust_remote_code(export)
    return export


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orpo.export import export_gguf

    out = Path(args.gguf)
    if out.suffix != ".gguf":
        raise UsageError(f"--gguf {out}: the file name should end in .gguf")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--gguf {out} exists; choose another name, or pass --overwrite")
    summary = export_gguf(
        args.model,
        out,
        args.type,
        tokenizer_pre=args.tokenizer_pre,
        trust_remote_code=args.trust_remote_code,
        progress=not args.quiet,
    )
    print(summary.describe())
    return 0
