"""The ``orpo`` command line: ``train``, ``eval``, ``generate``, ``plot``, ``merge``, ``check-data``, ``quickstart``."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys

from orpo import __version__
from orpo.errors import OrpoError, UsageError


def _quickstart(args: argparse.Namespace) -> int:
    from orpo.quickstart import run_quickstart

    run_quickstart(output_dir=args.output_dir, max_steps=args.max_steps, seed=args.seed, alpha=args.alpha)
    return 0


def _parse_columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    mapping = {}
    for item in text.split(","):
        target, sep, source = item.partition("=")
        if not sep or target.strip() not in ("prompt", "chosen", "rejected") or not source.strip():
            raise UsageError(f"--columns takes prompt=COL,chosen=COL,rejected=COL; got '{item}'")
        mapping[target.strip()] = source.strip()
    return mapping


def _check_data(args: argparse.Namespace) -> int:
    import logging

    import datasets

    from orpo.check_data import check_data
    from orpo.data import TruncationLimits

    datasets.disable_progress_bars()
    logging.getLogger("orpo").setLevel(logging.ERROR)  # the report carries the counts
    tokenizer = _load_tokenizer(args.tokenizer, args.trust_remote_code) if args.tokenizer else None
    limits = TruncationLimits(args.max_length, args.max_prompt_length, args.max_completion_length)
    report = check_data(
        args.path,
        tokenizer,
        fmt=args.format,
        columns=_parse_columns(args.columns),
        limits=limits,
        skip_invalid=args.skip_invalid,
        split=args.split,
        subset=args.subset,
    )
    print(report)
    return 0


def _overrides(extra: list[str]) -> dict:
    """``--key value`` / ``--key=value`` pairs after the config file; dashes in keys become underscores."""
    from orpo.run_config import coerce_cli_value

    overrides, k = {}, 0
    while k < len(extra):
        item = extra[k]
        if not item.startswith("--") or item == "--":
            raise UsageError(f"expected --key value after the config file, got '{item}'")
        key, sep, value = item[2:].partition("=")
        if not sep:
            if k + 1 >= len(extra) or extra[k + 1].startswith("--"):
                value = "true"  # a bare flag
            else:
                k += 1
                value = extra[k]
        key = key.replace("-", "_")
        overrides[key] = coerce_cli_value(key, value)
        k += 1
    return overrides


def _train(args: argparse.Namespace) -> int:
    from orpo.guards import finish_processes

    code = _run_training(args)  # its frame, which held the trainer and the model, is gone now
    finish_processes()
    return code


def _run_training(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orpo.run_config import chat_template_text, read_config_file, relative_to, resolve, to_yaml

    # The config file is the first extra word that is not a flag (argparse would otherwise take a
    # value of an override such as `--max_steps 3` for it).
    extra = list(args.extra)
    args.config = extra.pop(0) if extra and not extra[0].startswith("--") else None
    if args.config_file:
        if args.config and args.config != args.config_file:
            raise UsageError(f"two config files: {args.config} and --config {args.config_file}; give one")
        args.config = args.config_file
    raw = read_config_file(args.config) if args.config else {}
    overrides, override_words = _overrides(extra), extra
    for flag, key in ((args.model, "model"), (args.dataset, "datasets"), (args.output_dir, "output_dir")):
        if flag is not None:
            overrides[key] = flag
    run = resolve(raw, overrides)
    if args.config:  # dataset paths in a config file are relative to it
        base = Path(args.config).resolve().parent
        run.datasets = [relative_to(base, spec) for spec in run.datasets]
        run.eval_datasets = [relative_to(base, spec) for spec in run.eval_datasets]
    for note in run.notes:
        print(f"note: {note}")
    for variable, value in run.env.items():  # W&B's settings from an Axolotl config
        os.environ.setdefault(variable, value)
    resolved = to_yaml(run)
    print("resolved config:\n" + "\n".join(f"  {line}" for line in resolved.splitlines()), flush=True)
    out = Path(run.args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "orpo_config.yaml").write_text(resolved)

    from orpo.guards import StopOnSignal
    from orpo.trainer import ORPOTrainer

    model, tokenizer = _load_trained(
        run.model["name"], run.tokenizer, run.args.model_init_kwargs, run.args.seed
    )
    template = chat_template_text(run.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    if run.special_tokens:
        _add_special_tokens(model, tokenizer, run.special_tokens)
    peft_config = None
    if run.peft:
        try:
            from peft import LoraConfig
        except ImportError as err:
            raise OrpoError(
                "the config has a 'peft' block but peft is not installed: pip install 'orpo[peft]'"
            ) from err
        peft_config = LoraConfig(task_type="CAUSAL_LM", **run.peft)
    trainer = ORPOTrainer(
        model=model,
        args=run.args,
        train_dataset=run.datasets,
        eval_dataset=run.eval_datasets or None,
        tokenizer=tokenizer,
        peft_config=peft_config,
    )
    print(f"batch layout: {trainer.layout.description}", flush=True)
    again = _train_command(args, override_words)
    stop = StopOnSignal()
    trainer.add_callback(stop)
    try:
        with stop:
            result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM: stopped mid-step, no new checkpoint
        print(
            f"\nstopped at once during step {trainer.state.global_step + 1}; no checkpoint was written for it\n"
            f"resume from the last checkpoint in {out} with: {again} --resume",
            file=sys.stderr,
        )
        return stop.exit_code
    except ValueError as err:
        if args.resume and "checkpoint" in str(err):
            raise OrpoError(f"--resume: no checkpoint to resume from in {out} ({err})") from err
        raise
    if stop.received is not None:
        # Stopped at a step boundary with a checkpoint; no final model, so the output directory
        # does not look like a finished run.
        step = trainer.state.global_step
        print(
            f"\n{signal.Signals(stop.received).name}: stopped after step {step}; checkpoint saved in "
            f"{out}/checkpoint-{step}\nresume with: {again} --resume",
            file=sys.stderr,
        )
        return stop.exit_code
    trainer.save_model(str(out))
    trainer.save_state()
    final = {k: round(result.metrics[k], 4) for k in ("train_loss", "train_runtime") if k in result.metrics}
    if run.eval_datasets:
        final.update(
            {
                k: round(v, 4)
                for k, v in trainer.evaluate().items()
                if k.startswith("eval_") and "runtime" not in k and "per_second" not in k
            }
        )
    print(f"model saved to {out}/ (safetensors + tokenizer); resolved config in {out}/orpo_config.yaml")
    print("final metrics: " + ", ".join(f"{k}={v}" for k, v in final.items()))
    return 0


def _train_command(args: argparse.Namespace, override_words: list[str]) -> str:
    """This run's ``orpo train`` command line (for the resume hint): config, flags and overrides."""
    words = ["orpo", "train", *([args.config] if args.config else [])]
    for flag, value in (
        ("--model", args.model),
        ("--dataset", args.dataset),
        ("--output-dir", args.output_dir),
    ):
        if value is not None:
            words += [flag, value]
    return shlex.join([*words, *override_words])


def _add_special_tokens(model, tokenizer, tokens: dict[str, str]) -> None:
    """The config's ``special_tokens`` (as Axolotl's): set on the tokenizer; tokens new to its vocabulary
    get embedding rows (the model's embeddings are resized)."""
    try:
        added = tokenizer.add_special_tokens(tokens)
    except (ValueError, AttributeError) as err:
        raise UsageError(f"special_tokens: {err}") from err
    if added:
        model.resize_token_embeddings(len(tokenizer))
        print(
            f"note: special_tokens added {added} new token(s); the embeddings now have {len(tokenizer)} rows"
        )


def _remote_code(args: argparse.Namespace) -> dict | None:
    """``--trust-remote-code`` as loader kwargs (off unless given)."""
    return {"trust_remote_code": True} if args.trust_remote_code else None


def _load_trained(model_dir: str, tokenizer_name: str | None, init_kwargs: dict | None = None, seed: int = 0):
    """A model by name or directory (or ``demo``, the embedded one, freshly initialised with ``seed``)
    and its tokenizer (``tokenizer_name``, else the model's)."""
    from orpo.models import load_causal_lm

    if model_dir == "demo":
        from orpo.demo import tiny_model

        return tiny_model(seed=seed), _load_tokenizer(tokenizer_name or "demo")
    trust = bool((init_kwargs or {}).get("trust_remote_code", False))
    return load_causal_lm(model_dir, init_kwargs), _load_tokenizer(tokenizer_name or model_dir, trust)


def _eval(args: argparse.Namespace) -> int:
    import json
    import logging
    import tempfile

    import datasets
    from transformers.trainer_callback import PrinterCallback

    from orpo.config import ORPOConfig
    from orpo.formats import load_preference_data
    from orpo.trainer import ORPOTrainer

    datasets.disable_progress_bars()
    logging.getLogger("orpo").setLevel(logging.ERROR)
    model, tokenizer = _load_trained(args.model, args.tokenizer, _remote_code(args))
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
        pairs, _, _ = load_preference_data(args.data, split=args.split, subset=args.subset)
        trainer = ORPOTrainer(model=model, args=config, eval_dataset=pairs, tokenizer=tokenizer)
        trainer.remove_callback(PrinterCallback)
        metrics = trainer.evaluate()
    hidden = ("runtime", "per_second", "preparation_time")
    metrics = {k: v for k, v in metrics.items() if k.startswith("eval_") and not any(h in k for h in hidden)}
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        width = max(len(k) for k in metrics)
        print(f"{args.model} on {args.data} ({len(trainer.eval_dataset)} pairs, alpha={args.alpha:g}):")
        for key, value in metrics.items():
            print(f"  {key:<{width}}  {value:.4f}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from transformers import TextStreamer

    if bool(args.prompt) == bool(args.prompts):
        raise UsageError("give one of --prompt TEXT or --prompts FILE (one prompt per line)")
    prompts = (
        [args.prompt]
        if args.prompt
        else [
            line.rstrip("\n")
            for line in Path(args.prompts).read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    )
    model, tokenizer = _load_trained(args.model, args.tokenizer, _remote_code(args))
    model.eval()
    use_template = getattr(tokenizer, "chat_template", None) is not None and not args.no_chat_template
    for prompt in prompts:
        if use_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not use_template)
        sampling = args.temperature > 0
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
                pad_token_id=tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id,
                streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            )
    return 0


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orpo.plot import plot_runs, read_log_history

    runs = [(Path(run).name or str(run), read_log_history(run)) for run in args.runs]
    plot_runs(runs, args.output)
    print(f"wrote {args.output} ({len(runs)} run(s))")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from peft import AutoPeftModelForCausalLM
    except ImportError as err:
        raise OrpoError("orpo merge needs peft: pip install 'orpo[peft]'") from err
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise OrpoError(f"{adapter}: no adapter_config.json (is this a LoRA adapter directory?)")
    from orpo.models import check_adapter_base

    check_adapter_base(adapter)
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(
            str(adapter), trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise OrpoError(f"could not load the adapter in {adapter} with its base model: {err}") from err
    merged = model.merge_and_unload()
    merged.save_pretrained(args.output)
    if (adapter / "tokenizer_config.json").is_file():
        _load_tokenizer(str(adapter), args.trust_remote_code).save_pretrained(args.output)
    print(
        f"merged {adapter} into its base model ({model.peft_config['default'].base_model_name_or_path}); "
        f"saved to {args.output}/"
    )
    return 0


def _load_tokenizer(name: str, trust_remote_code: bool = False):
    if name == "demo":
        from orpo.demo import demo_tokenizer

        return demo_tokenizer()
    from orpo.models import load_tokenizer

    return load_tokenizer(name, trust_remote_code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orpo",
        description="ORPO (Odds Ratio Preference Optimization) on the Hugging Face stack.",
    )
    parser.add_argument("--version", action="version", version=f"orpo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true", help="only errors (no warnings, no progress bars)")
    loudness.add_argument("--verbose", action="store_true", help="also informational log messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train",
        usage="orpo train [CONFIG.yaml] [--model M] [--dataset D] [--output-dir O] [--resume] [--KEY VALUE ...]",
        help="train with ORPO from a YAML/JSON config, any key overridable with --key value",
        description="Train with ORPO. Keys of the config file are ORPOConfig fields (every TrainingArguments "
        "option) plus model, tokenizer, chat_template, datasets, eval_datasets and peft; Axolotl, LLaMA-Factory "
        "and TRL names are accepted and mapped. Any key can be overridden on the command line.",
        epilog="examples:\n  orpo train examples/tiny.yaml\n  orpo train examples/tiny.yaml --learning_rate 5e-6 "
        "--orpo_alpha 0.2\n  orpo train --model Qwen/Qwen2-0.5B-Instruct --dataset prefs.jsonl --output-dir out",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--config", dest="config_file", metavar="CONFIG.yaml", help="the config file (as TRL's CLI takes it)"
    )
    train.add_argument("--model", help="model name or directory ('demo' for the embedded tiny model)")
    train.add_argument("--dataset", help="training data: file, directory or hub name")
    train.add_argument("--output-dir", help="where checkpoints and the final model go")
    train.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in the output dir"
    )
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "eval",
        help="held-out preference metrics of a model (reward accuracy, margins, log-probs, NLL)",
        description="Score a trained model on preference pairs with TRL's metric names.",
        epilog="example: orpo eval --model orpo-quickstart/orpo --data demo:test --json",
    )
    evaluate.add_argument("--model", required=True, help="model directory or hub name")
    evaluate.add_argument(
        "--data", required=True, help="preference data: file, directory, hub name or demo:test"
    )
    evaluate.add_argument("--tokenizer", help="default: the model's")
    evaluate.add_argument("--split", default="test", help="split of a hub dataset or DatasetDict directory")
    evaluate.add_argument("--subset", help="subset (configuration) of a hub dataset")
    evaluate.add_argument("--alpha", type=float, default=0.1, help="orpo_alpha that scales the rewards")
    evaluate.add_argument("--beta", type=float, default=1.0, help="orpo_beta of the loss")
    evaluate.add_argument("--nll-include-prompt", action="store_true")
    evaluate.add_argument("--max-length", type=int, default=1024)
    evaluate.add_argument("--max-prompt-length", type=int, default=512)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.add_argument(
        "--trust-remote-code", action="store_true", help="let the model run code from its repository"
    )
    evaluate.set_defaults(handler=_eval)

    generate = commands.add_parser(
        "generate",
        help="generate from a model with its chat template, streaming",
        description="Generate a response for a prompt (or each line of a file), streamed as it is produced. "
        "The tokenizer's chat template is applied when it has one.",
        epilog="example: orpo generate --model orpo-quickstart/orpo --prompt 'rev abcd=' --no-chat-template",
    )
    generate.add_argument("--model", required=True)
    generate.add_argument("--tokenizer", help="default: the model's")
    generate.add_argument("--prompt", help="one prompt")
    generate.add_argument("--prompts", help="file with one prompt per line")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--no-chat-template", action="store_true", help="feed the prompt text as it is")
    generate.add_argument(
        "--trust-remote-code", action="store_true", help="let the model run code from its repository"
    )
    generate.set_defaults(handler=_generate)

    plot = commands.add_parser(
        "plot",
        help="PNG of loss, reward accuracy/margins and chosen/rejected log-probs of one or more runs",
        description="Read trainer_state.json (or log_history.json) of each run directory and draw the curves "
        "of all runs overlaid.",
        epilog="example: orpo plot orpo-quickstart/orpo orpo-quickstart/sft --output curves.png",
    )
    plot.add_argument("runs", nargs="+", help="run directories")
    plot.add_argument("--output", default="orpo_curves.png")
    plot.set_defaults(handler=_plot)

    merge = commands.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model and save the full model",
        description="Load a LoRA adapter directory (as written by a peft run of orpo train) with its base model, "
        "fold the adapter into the weights and save a plain model (safetensors) plus the tokenizer.",
        epilog="example: orpo merge --adapter out/ --output out-merged/",
    )
    merge.add_argument("--adapter", required=True, help="directory with adapter_config.json")
    merge.add_argument("--output", required=True, help="where the merged model goes")
    merge.add_argument(
        "--trust-remote-code", action="store_true", help="let the model run code from its repository"
    )
    merge.set_defaults(handler=_merge)

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
    quick.set_defaults(handler=_quickstart)

    check = commands.add_parser(
        "check-data",
        help="validate a preference dataset and summarise its format, lengths and truncation",
        description="Load a preference dataset (.jsonl, .json, .csv, .parquet, a save_to_disk or plain "
        "directory, or a hub name), detect its format, list invalid rows as file:line: field: problem, and with "
        "a tokenizer show token-length percentiles, what max lengths would truncate or drop, and the first row "
        "as the model will see it. Exit status 0 when the data is valid, 1 when not.",
        epilog="examples:\n  orpo check-data prefs.jsonl --tokenizer Qwen/Qwen2-0.5B-Instruct --max-length 2048\n"
        "  orpo check-data pairs.csv --columns prompt=question,chosen=response_j,rejected=response_k",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("path", help="file, directory or hub dataset name")
    check.add_argument("--tokenizer", help="tokenizer name or directory ('demo' for the embedded one)")
    check.add_argument("--format", default="auto", choices=["auto", "standard", "conversational", "implicit"])
    check.add_argument("--columns", help="map your columns: prompt=COL,chosen=COL,rejected=COL")
    check.add_argument("--split", default="train", help="split of a hub dataset or DatasetDict directory")
    check.add_argument("--subset", help="subset (configuration) of a hub dataset")
    check.add_argument("--max-length", type=int, default=1024)
    check.add_argument("--max-prompt-length", type=int, default=512)
    check.add_argument("--max-completion-length", type=int, default=None)
    check.add_argument(
        "--skip-invalid", action="store_true", help="drop invalid rows (counted) instead of failing"
    )
    check.add_argument(
        "--trust-remote-code", action="store_true", help="let the tokenizer run code from its repository"
    )
    check.set_defaults(handler=_check_data)
    return parser


_BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"


def _set_loudness(quiet: bool, verbose: bool) -> None:
    """Python logging for orpo, transformers and datasets: warnings by default."""
    import logging

    import datasets
    from transformers.utils import logging as hf_logging

    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("orpo").setLevel(level)
    hf_logging.set_verbosity(level)
    # transformers imports peft, and peft bitsandbytes where installed, whose import on CPUs with bf16
    # instructions warns that an optional kernel from the hub is missing: noise on every command.
    logging.getLogger(_BNB_CPU_KERNEL_LOGGER).setLevel(logging.INFO if verbose else logging.ERROR)
    if quiet:
        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    _set_loudness(quiet=args.quiet, verbose=args.verbose)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except OrpoError as err:
        if args.debug:
            raise
        print(f"orpo: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt:
        print("orpo: interrupted", file=sys.stderr)
        return 130
