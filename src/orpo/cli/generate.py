"""``orpo generate``: streamed completions of a prompt (or of each line of a file)."""

from __future__ import annotations

import argparse
import sys

from orpo.cli.options import add_trust_remote_code, non_negative, positive_int, probability, remote_code
from orpo.errors import UsageError


def add_parser(commands) -> argparse.ArgumentParser:
    generate = commands.add_parser(
        "generate",
        help="generate from a model with its chat template, streaming",
        description="Generate a response for a prompt (or each line of a file), streamed as it is produced. "
        "The tokenizer's chat template is applied when it has one.",
        epilog="example: orpo generate --model orpo-quickstart/orpo --prompt 'rev abcd=' --no-chat-template",
    )
    generate.add_argument("--model", required=True, help="model directory or hub name")
    generate.add_argument("--tokenizer", help="default: the model's")
    generate.add_argument("--prompt", help="one prompt")
    generate.add_argument("--prompts", help="file with one prompt per line")
    generate.add_argument(
        "--max-new-tokens", type=positive_int, default=128, help="at most this many new tokens"
    )
    generate.add_argument("--temperature", type=non_negative, default=0.0, help="0 = greedy")
    generate.add_argument(
        "--top-p", type=probability, default=1.0, help="nucleus sampling (with a temperature above 0)"
    )
    generate.add_argument("--no-chat-template", action="store_true", help="feed the prompt text as it is")
    add_trust_remote_code(generate)
    return generate


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from transformers import TextStreamer

    from orpo.models import load_model_and_tokenizer

    if bool(args.prompt) == bool(args.prompts):
        raise UsageError("give one of --prompt TEXT or --prompts FILE (one prompt per line)")
    if args.prompt:
        prompts = [args.prompt]
    else:
        if not Path(args.prompts).is_file():
            raise UsageError(f"--prompts {args.prompts}: no such file")
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        prompts = [line.rstrip("\n") for line in lines if line.strip()]
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, remote_code(args))
    model.eval()
    use_template = getattr(tokenizer, "chat_template", None) is not None and not args.no_chat_template
    print(
        "(prompts go through the tokenizer's chat template; --no-chat-template feeds them as they are)"
        if use_template
        else "(prompts are fed as they are, without a chat template)",
        file=sys.stderr,
    )
    sampling = args.temperature > 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for prompt in prompts:
        text = prompt
        if use_template:
            messages = [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not use_template)
        if len(prompts) > 1:
            print(f"> {prompt}")
        with torch.no_grad():
            model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                do_sample=sampling,
                temperature=args.temperature if sampling else None,
                top_p=args.top_p if sampling else None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
                streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            )
    return 0
