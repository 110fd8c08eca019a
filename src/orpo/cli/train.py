"""``orpo train``: train from a YAML/JSON config (:mod:`.run_config`), any key overridable as ``--key value``."""

from __future__ import annotations

import argparse
import os
import pickle
import shlex
import signal
import sys
from pathlib import Path

from orpo import defaults
from orpo.errors import OrpoError, UsageError


def add_parser(commands) -> argparse.ArgumentParser:
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
    train.add_argument(
        "--model", help=f"model name or directory ('{defaults.DEMO}' for the embedded tiny model)"
    )
    train.add_argument("--dataset", help="training data: file, directory or hub name")
    train.add_argument("--output-dir", help="where checkpoints and the final model go")
    train.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in the output dir"
    )
    return train


def run(args: argparse.Namespace) -> int:
    try:
        code = _run_training(args)  # its frame, which held the trainer and the model, is gone now
    finally:
        if (
            out := getattr(args, "locked_dir", None)
        ) is not None:  # main() may be called again in this process
            from orpo.run_folder import release

            release(out)
    from orpo.guards import finish_processes  # here: a config error is reported before torch is loaded

    finish_processes()
    return code


def _overrides(extra: list[str]) -> dict:
    """``--key value`` / ``--key=value`` pairs after the config file; dashes in keys become underscores."""
    from orpo.cli.run_config import coerce_cli_value

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


def _resolve_run(args: argparse.Namespace):
    """The run: the config file (first extra word that is not a flag, or ``--config``), the overrides and
    the flags, resolved; its notes printed and its resolved config printed and saved."""
    from orpo.cli.run_config import read_config_file, relative_to, resolve, to_yaml

    # argparse would take a value of an override such as `--max_steps 3` for the config file.
    extra = list(args.extra)
    args.config = extra.pop(0) if extra and not extra[0].startswith("--") else None
    if args.config_file:
        if args.config and args.config != args.config_file:
            raise UsageError(f"two config files: {args.config} and --config {args.config_file}; give one")
        args.config = args.config_file
    raw = read_config_file(args.config) if args.config else {}
    overrides = _overrides(extra)
    args.override_words = extra
    for flag, key in ((args.model, "model"), (args.dataset, "datasets"), (args.output_dir, "output_dir")):
        if flag is not None:
            overrides[key] = flag
    run = resolve(raw, overrides)
    if args.config:  # paths in a config file (data, model, tokenizer, template) are relative to it
        base = Path(args.config).resolve().parent
        run.datasets = [relative_to(base, spec) for spec in run.datasets]
        run.eval_datasets = [relative_to(base, spec) for spec in run.eval_datasets]
        if "model" not in overrides:  # --model on the command line is relative to where it is typed
            run.model["name"] = relative_to(base, run.model["name"])
        run.tokenizer = relative_to(base, run.tokenizer)
        run.chat_template = relative_to(base, run.chat_template)
    for note in run.notes:
        print(f"note: {note}")
    resolved = to_yaml(run)
    print("resolved config:\n" + "\n".join(f"  {line}" for line in resolved.splitlines()), flush=True)
    out = Path(run.args.output_dir)
    from orpo import run_folder

    rank = int(os.environ.get("RANK", "0"))
    run_folder.check_outside_data(out, [*run.datasets, *run.eval_datasets])  # before the lock file goes in
    # An existing directory is locked first: a run in progress there is the reason to refuse, whatever it holds.
    lock_first = out.is_dir() and os.access(out, os.W_OK)
    args.locked_dir = out  # released when the command ends (run)
    if lock_first:
        run_folder.lock(out, rank)
    run_folder.check_folder(
        out,
        args.resume,
        run.args.overwrite_output_dir,
        refuse_earlier_run=True,
        first=rank == 0,
        asked="--resume",
    )
    if args.resume and (changed := run_folder.check_resumed_settings(out, resolved, asked="--resume")):
        print(
            f"note: resuming with {', '.join(changed)} from this command (the rest from {out / run_folder.SETTINGS_FILE})"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OrpoError(
            f"output_dir {out} cannot be created ({err.strerror}); choose another --output-dir"
        ) from err
    if not os.access(out, os.W_OK):
        raise OrpoError(f"output_dir {out} is not writable; choose another --output-dir")
    if not lock_first:
        run_folder.lock(out, rank)
    run_folder.write_settings(out, resolved)
    return run


def _checkpoint_to_resume(out: Path) -> str:
    from orpo.run_folder import checkpoint_to_resume

    def warn(message: str) -> None:
        print(message if message.startswith("resuming") else f"warning: {message}", file=sys.stderr)

    return str(checkpoint_to_resume(out, asked="--resume", warn=warn))


def _trainer_for(run):
    """The model and tokenizer as the config says (orpo.models: the same path as the Python API), and the
    trainer."""
    from orpo.cli.run_config import chat_template_text
    from orpo.models import add_special_tokens, load_model_and_tokenizer
    from orpo.trainer import ORPOTrainer

    model, tokenizer = load_model_and_tokenizer(
        run.model["name"], run.tokenizer, run.args.model_init_kwargs, run.args.seed
    )
    template = chat_template_text(run.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    if run.special_tokens and (added := add_special_tokens(model, tokenizer, run.special_tokens)):
        print(
            f"note: special_tokens added {added} new token(s); the embeddings now have {len(tokenizer)} rows"
        )
    return ORPOTrainer(
        model=model,
        args=run.args,
        train_dataset=run.datasets,
        eval_dataset=run.eval_datasets or None,
        tokenizer=tokenizer,
        peft_config=run.lora,
    )


def _run_training(args: argparse.Namespace) -> int:
    run = _resolve_run(args)  # first: a config error is reported before torch is loaded
    from orpo.guards import StopOnSignal

    out = Path(run.args.output_dir)
    for variable, value in run.env.items():  # W&B's settings from an Axolotl config, for this run's trackers
        os.environ.setdefault(variable, value)
    trainer = _trainer_for(run)
    print(f"batch layout: {trainer.layout.description}", flush=True)
    from orpo import run_folder
    from orpo.cli.run_config import to_yaml
    from orpo.config import precision_description

    print(f"precision: {precision_description(trainer.args)}", flush=True)
    if (settled := to_yaml(run)) != (out / run_folder.SETTINGS_FILE).read_text():
        run_folder.write_settings(out, settled)  # the CPU's bf16 default, settled on the model
    again = _train_command(args)
    stop = StopOnSignal()
    trainer.add_callback(stop)
    try:
        with stop:
            result = trainer.train(resume_from_checkpoint=_checkpoint_to_resume(out) if args.resume else None)
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM: stopped mid-step, no new checkpoint
        print(
            f"\nstopped at once during step {trainer.state.global_step + 1}; no checkpoint was written for it\n"
            f"resume from the last checkpoint in {out} with: {again} --resume",
            file=sys.stderr,
        )
        return stop.exit_code
    except pickle.UnpicklingError as err:  # a state file weights_only loading refuses: never run it
        raise OrpoError(
            f"--resume: a state file in the checkpoint holds objects that safe loading (weights_only) refuses; "
            f"nothing was loaded from it. Remove that checkpoint from {out} to resume from the one before ({err})"
        ) from err
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
    _finish(trainer, run, result)
    return 0


def _finish(trainer, run, result) -> None:
    """Save the final model and state, evaluate if there is eval data, and say where things are."""
    out = Path(run.args.output_dir)
    trainer.save_model(str(out))
    trainer.save_state()
    final = {k: round(result.metrics[k], 4) for k in ("train_loss", "train_runtime") if k in result.metrics}
    if run.eval_datasets:
        hidden = ("runtime", "per_second")
        evaluated = trainer.evaluate().items()
        final.update(
            {
                k: round(v, 4)
                for k, v in evaluated
                if k.startswith("eval_") and not any(h in k for h in hidden)
            }
        )
    from orpo.run_folder import SETTINGS_FILE

    print(f"model saved to {out}/ (safetensors + tokenizer); resolved config in {out}/{SETTINGS_FILE}")
    if run.gguf and trainer.is_world_process_zero():
        from orpo.export import export_gguf
        from orpo.run_folder import gguf_file

        print(
            export_gguf(
                out, gguf_file(out, run.gguf), run.gguf, progress=not run.args.disable_tqdm
            ).describe()
        )
    print("final metrics: " + ", ".join(f"{k}={v}" for k, v in final.items()))


def _train_command(args: argparse.Namespace) -> str:
    """This run's ``orpo train`` command line (for the resume hint): config, flags and overrides."""
    words = ["orpo", "train", *([args.config] if args.config else [])]
    for flag, value in (
        ("--model", args.model),
        ("--dataset", args.dataset),
        ("--output-dir", args.output_dir),
    ):
        if value is not None:
            words += [flag, value]
    return shlex.join([*words, *args.override_words])
