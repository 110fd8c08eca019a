"""``orpo generate``: streamed completions of a prompt (or of each line of a file)."""

from __future__ import annotations

import argparse
import sys

from orpo.cli.options import add_trust_remote_code, non_negative, positive_int, probability, remote_code
from orpo.errors import OrpoError, UsageError


def add_parser(commands) -> argparse.ArgumentParser:
    generate = commands.add_parser(
        "generate",
        help="generate from a model, prompted as it was trained, streaming",
        description="Generate a response for a prompt (or each line of a file), streamed as it is produced. "
        "Prompts go through the tokenizer's chat template when the model was trained on chat-templated rows "
        "(orpo records this beside the models it saves) or, for other models, when the tokenizer has one.",
        epilog="example: orpo generate --model orpo-quickstart/orpo --prompt 'rev abcd='",
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
    template = generate.add_mutually_exclusive_group()
    template.add_argument(
        "--chat-template",
        dest="chat_template",
        action="store_true",
        default=None,
        help="put prompts through the tokenizer's chat template (default: as the model was trained, recorded "
        "beside it by orpo; else when the tokenizer has a template)",
    )
    template.add_argument(
        "--no-chat-template", dest="chat_template", action="store_false", help="feed the prompt text as it is"
    )
    add_trust_remote_code(generate)
    return generate


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from jinja2 import TemplateError
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
    use_template, why = _use_chat_template(args, tokenizer)
    print(
        f"(prompts go through the tokenizer's chat template: {why})"
        if use_template
        else f"(prompts are fed as they are, without a chat template: {why})",
        file=sys.stderr,
    )
    sampling = args.temperature > 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for prompt in prompts:
        text = prompt
        if use_template:
            messages = [{"role": "user", "content": prompt}]
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except TemplateError as err:
                raise OrpoError(
                    f"the chat template of {args.tokenizer or args.model} failed ({type(err).__name__}: {err}); "
                    "pass --no-chat-template, or fix the template"
                ) from None
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


def _use_chat_template(args, tokenizer) -> tuple[bool, str]:
    """Whether prompts go through the chat template, and why: a flag decides; else the way the model was
    trained (the record orpo saves beside it); else whether the tokenizer has a template."""
    from orpo.run_folder import trained_with_chat_template

    has_template = getattr(tokenizer, "chat_template", None) is not None
    if args.chat_template is False:
        return False, "--no-chat-template"
    if args.chat_template:
        if not has_template:
            raise UsageError(f"--chat-template: the tokenizer of {args.model} has no chat template")
        return True, "--chat-template"
    trained = trained_with_chat_template(args.model)
    if trained is not None:
        how = (
            "the model was trained on chat-templated prompts"
            if trained
            else "the model was trained on plain text"
        )
        if trained and not has_template:
            return False, how + ", but its tokenizer has no template now"
        return trained, f"{how}; --{'no-' if trained else ''}chat-template to change"
    if has_template:
        return True, "the tokenizer has one; --no-chat-template feeds prompts as they are"
    return False, "the tokenizer has none"
