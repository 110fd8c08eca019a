"""The run folder (``output_dir``) and its one owner: what orpo keeps there, who may write there, and what a
new or a resumed run may find there. ``ORPOTrainer.train`` (the Python API) and ``orpo train`` both go
through here, so a notebook gets the command line's guarantees:

- one run at a time: an exclusive lock (:data:`LOCK_FILE`, released by the operating system however the
  process ends), taken by the first process of a run for all of them; a second run into the same folder is
  refused while the first one lives;
- a new run into a folder that holds an earlier one (its model, or checkpoints): ``orpo train`` refuses
  unless ``--overwrite_output_dir true`` (a mistyped command costs no run); ``trainer.train()`` starts over
  there, as re-running a notebook cell means, and removes the earlier run's checkpoints with a warning, so
  that a later resume cannot continue the wrong run; ``.incomplete/`` leftovers are removed by whoever holds
  the lock;
- the settings file (:data:`SETTINGS_FILE`): what the run was set up with, written once per run (the
  command line's resolved config, else the trainer's own settings); ``orpo eval`` scores with it;
- a resume: the newest complete checkpoint (damaged or partial ones named and passed over), and a refusal
  of any change to a setting in :data:`FIXED_ON_RESUME` against the settings file;
- :data:`PROMPT_FORMAT_FILE` beside every saved model: whether its prompts went through the chat template.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from orpo import defaults
from orpo.checkpoints import STAGING_DIR, newest_complete_checkpoint, remove_incomplete_checkpoints
from orpo.errors import OrpoError, UsageError

logger = logging.getLogger("orpo")

SETTINGS_FILE = "orpo_config.yaml"
LOCK_FILE = ".orpo-train.lock"
# Saved beside a trained model: whether its training prompts went through the chat template, so that
# `orpo generate` prompts it the way it learned (a chat template on a model trained on plain text, or the
# reverse, asks it something it never saw).
PROMPT_FORMAT_FILE = "orpo_prompt_format.json"
RESUME_ASKED = "resume_from_checkpoint=True"  # how the Python API asks for a resume (the CLI: --resume)
MODEL_FILES = ("model.safetensors", "adapter_model.safetensors")  # a finished run's model


def gguf_file(out: str | Path, gguf_type: str) -> Path:
    """Where a run's ``gguf:`` export goes: beside the final model."""
    return Path(out) / f"model-{gguf_type}.gguf"


# The content hash of the tokenized training rows (the trainer records it): a resume onto data edited in
# place, under the same path, is refused like a changed setting.
DATA_FINGERPRINT = "train_data_fingerprint"

# Settings a resumed run must share with the run it continues: the model and data it trains on, how batches
# are made (the data order replays from the checkpoint), the objective, and the optimizer and schedule (their
# state comes from the checkpoint, so a new value would be silently ignored).
FIXED_ON_RESUME = (
    "model",
    "tokenizer",
    "chat_template",
    "datasets",
    "peft",
    "seed",
    "data_seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_tokens_per_batch",
    "max_length",
    "max_prompt_length",
    "max_completion_length",
    "dataset_format",
    "dataset_columns",
    "padding_free",
    "prefix_sharing",
    "nll_include_prompt",
    "orpo_alpha",
    "orpo_beta",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "optim",
    DATA_FINGERPRINT,
)
# Recorded by the trainer besides those (the command line records its whole resolved config).
ALSO_RECORDED = ("max_steps", "num_train_epochs", "bf16", "fp16")

_locks: dict[Path, object] = {}  # folders this process holds the lock of -> the open lock file
_settings_written: set[Path] = set()  # folders this process wrote this run's settings file in


def _key(out: str | Path) -> Path:
    return Path(out).resolve()


def lock(out: str | Path, rank: int = 0) -> bool:
    """Take the folder's exclusive lock for this process; True if taken now, False if this process already
    holds it or is not the first process (``rank``) of its run. Another process holding it is a UsageError
    naming it."""
    import fcntl

    key = _key(out)
    if rank != 0 or key in _locks:
        return False
    try:
        handle = open(key / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole run
    except OSError as err:
        raise OrpoError(
            f"output_dir {out} is not writable ({err.strerror}); choose another output_dir"
        ) from err
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(
            f"output_dir {out} is in use by another orpo train ({holder}); wait for it, or choose another "
            "output_dir (--output-dir)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _locks[key] = handle
    remove_incomplete_checkpoints(key)  # the only run here: what a killed or failed save left is garbage
    return True


def release(out: str | Path) -> None:
    """Give the folder's lock back (a later run, of this process or another, may use the folder)."""
    key = _key(out)
    handle = _locks.pop(key, None)
    _settings_written.discard(key)
    if handle is not None:
        handle.close()


# What runs write in their output_dir (Trainer, the tokenizer, orpo, the demos): the only entries a new run
# there may replace or remove. Anything else is the user's.
RUN_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "tokenizer.model",
        "training_args.bin",
        "trainer_state.json",
        "all_results.json",
        "train_results.json",
        "eval_results.json",
        "README.md",  # the model card
        "runs",  # TensorBoard's default logging_dir
        "log_history.json",  # the demos'
        SETTINGS_FILE,
        PROMPT_FORMAT_FILE,
        LOCK_FILE,
        STAGING_DIR,
    }
)
RUN_FILE_PATTERNS = (
    "model-*-of-*.safetensors",
    "model-*.gguf",
    "model-*.gguf.partial",
    f".{SETTINGS_FILE}.*",  # a settings file being replaced
)
# Files that show a run was here (else a config.json or README.md in the folder is the user's own).
RUN_MARKERS = (SETTINGS_FILE, "trainer_state.json", *MODEL_FILES)


def is_checkpoint(path: Path) -> bool:
    """A checkpoint folder as Trainer names them (``checkpoint-<step>``); ``checkpoint-best/`` is not one."""
    return path.is_dir() and path.name.startswith("checkpoint-") and path.name.split("-", 1)[1].isdigit()


def _written_by_a_run(path: Path) -> bool:
    return path.name in RUN_FILES or is_checkpoint(path) or any(path.match(p) for p in RUN_FILE_PATTERNS)


def foreign_entries(out: Path) -> list[str]:
    """The entries of ``out`` no run wrote: names no run writes, and, in a folder no run has been in, the
    ones it would write (a user's own config.json or README.md)."""
    if not out.is_dir():
        return []
    entries = sorted(out.iterdir())
    been_here = any((out / name).exists() for name in RUN_MARKERS) or any(map(is_checkpoint, entries))
    return [
        p.name + ("/" if p.is_dir() else "")
        for p in entries
        if not _written_by_a_run(p) or (not been_here and p.name not in (LOCK_FILE, STAGING_DIR))
    ]


def check_foreign_entries(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding what a run would replace but did not write (it would be overwritten), and,
    unless ``overwrite`` says the folder is meant, any other entry a run did not write (it is kept)."""
    foreign = foreign_entries(out)
    if not foreign:
        return
    clashing = [name for name in foreign if _written_by_a_run(out / name.rstrip("/"))]
    listed = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
    if clashing:
        raise UsageError(
            f"output_dir {out} holds {', '.join(clashing)} that no run of orpo wrote, which a run would "
            "overwrite; move them or choose another output_dir (--output-dir)"
        )
    if not overwrite:
        raise UsageError(
            f"output_dir {out} holds entries that no run of orpo wrote ({listed}); orpo only writes and "
            "removes its own files: choose another output_dir (--output-dir), or pass overwrite_output_dir "
            "(--overwrite_output_dir true) to train there anyway, leaving them as they are"
        )
    logger.warning(f"output_dir {out}: keeping {listed}, which no run of orpo wrote")


def check_outside_data(out: Path, sources) -> None:
    """A run writes .json files and checkpoints into ``out``: inside a data folder they would become part of
    the data the next time it is read. ``sources``: dataset specs (a path, or a mapping with ``path``)."""
    target = out.resolve()
    for spec in sources:
        path = Path(spec["path"] if isinstance(spec, dict) else spec)
        if path.is_dir() and (target == path.resolve() or path.resolve() in target.parents):
            raise UsageError(
                f"output_dir {out} is inside the data folder {path}: the run's files would be read as data "
                "next time; choose an output_dir outside it (--output-dir)"
            )


def earlier_run(out: Path) -> str | None:
    """What of an earlier run the folder holds (its model, its checkpoints), or None."""
    checkpoints = checkpoints_in(out)
    if any((out / name).exists() for name in MODEL_FILES):
        return "a finished run (its model)"
    return f"{len(checkpoints)} checkpoint(s) of an earlier run" if checkpoints else None


def checkpoints_in(out: Path) -> list[Path]:
    return sorted(filter(is_checkpoint, out.glob("checkpoint-*"))) if out.is_dir() else []


def check_folder(
    out: str | Path,
    resume: bool,
    overwrite: bool,
    refuse_earlier_run: bool,
    first: bool = True,
    asked: str = RESUME_ASKED,
) -> None:
    """Before anything is written or loaded: a file is no output directory; a resume needs a checkpoint; a new
    run into a folder holding an earlier one is refused (``refuse_earlier_run`` and not ``overwrite``: the
    command line) or starts over there, the earlier run's checkpoints removed first (with a warning where
    nobody asked to overwrite: the Python API) by the ``first`` process of the run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"output_dir {out} is a file, not a directory; choose another output_dir (--output-dir)"
        )
    if resume:
        if not checkpoints_in(out):
            raise OrpoError(f"{asked}: no checkpoint to resume from in {out}")
        return
    check_foreign_entries(out, overwrite)
    what = earlier_run(out)
    if what is None:
        return
    if refuse_earlier_run and not overwrite:
        raise UsageError(
            f"output_dir {out} already holds {what}: pass --resume to continue it, --overwrite_output_dir true to "
            "start over there, or choose another --output-dir"
        )
    if not first:
        return
    checkpoints = checkpoints_in(out)
    if not overwrite:
        removed = f"; its {len(checkpoints)} checkpoint(s) are removed" if checkpoints else ""
        logger.warning(
            f"output_dir {out} holds {what}: this run starts over there{removed} (resume_from_checkpoint=True "
            "continues a run instead; overwrite_output_dir=True says this on purpose)"
        )
    for checkpoint in checkpoints:
        shutil.rmtree(checkpoint)


def checkpoint_to_resume(out: str | Path, asked: str = RESUME_ASKED, warn=logger.warning) -> Path:
    """The newest complete checkpoint in ``out``; newer incomplete or damaged ones are named (``warn``) and
    passed over. ``asked``: how the resume was asked for, for messages."""
    checkpoint, skipped = newest_complete_checkpoint(out)
    for problem in skipped:
        warn(f"{asked} skips {problem}")
    if checkpoint is None:
        raise OrpoError(f"{asked}: no complete checkpoint in {out} ({'; '.join(skipped)})")
    if skipped:
        warn(f"resuming from {checkpoint.name}, the newest complete checkpoint")
    return checkpoint


def enter(
    out: Path, args, resume, first: bool, data_fingerprint: str | None = None
) -> tuple[bool, str | None]:
    """A trainer's start in ``out`` (``ORPOTrainer.train``): lock it (the ``first`` process), check what it holds
    and the resume, record the settings. Returns whether the lock was taken here (to release when training
    ends) and the checkpoint to resume from (``resume``: None / False, True, or a checkpoint's path). Nothing
    stays locked when a check refuses."""
    took_lock = out.is_dir() and lock(out, args.process_index)  # before looking: a live run is the refusal
    try:
        resume = _enter(out, args, resume, first, data_fingerprint)
        if first:
            took_lock = lock(out, args.process_index) or took_lock  # a folder made just now
    except BaseException:
        if took_lock:
            release(out)
        raise
    return took_lock, resume


def _enter(out: Path, args, resume, first: bool, data_fingerprint: str | None) -> str | None:
    overwrite, resuming = args.overwrite_output_dir, resume not in (None, False)
    if resume is True:  # the newest complete checkpoint here (a path names one itself)
        check_folder(out, True, overwrite, refuse_earlier_run=False, first=first)
        resume = str(checkpoint_to_resume(out))
    run_dir = Path(resume).parent if resuming else out  # the run continued: its settings file
    if not resuming or run_dir.resolve() != out.resolve():  # a new run here (resumed from elsewhere or not)
        check_folder(out, False, overwrite, refuse_earlier_run=False, first=first)
    settings = settings_of(args)
    if data_fingerprint is not None:
        settings[DATA_FINGERPRINT] = data_fingerprint
    if resuming and (changed := check_resumed_settings(run_dir, settings, only_new_keys=True)):
        logger.info(f"resuming with {', '.join(changed)} from these arguments")
    if first:
        out.mkdir(parents=True, exist_ok=True)
        if not settings_written(out):
            saved = (read_settings(run_dir) or {}) if resuming else {}
            write_settings(out, {**saved, **settings})
        elif data_fingerprint is not None:  # orpo train wrote its resolved config already: add the data's
            write_settings(out, {**(read_settings(out) or {}), DATA_FINGERPRINT: data_fingerprint})
    return resume


# ---- the settings file -------------------------------------------------------------------------------------


def settings_of(args) -> dict:
    """What a trainer records of its ``ORPOConfig`` (:data:`FIXED_ON_RESUME` and :data:`ALSO_RECORDED` fields), as
    plain YAML values."""
    names = {f.name for f in dataclasses.fields(args)}
    recorded = {}
    for name in (*FIXED_ON_RESUME, *ALSO_RECORDED):
        if name in names:
            value = getattr(args, name)
            recorded[name] = value.value if hasattr(value, "value") else value
    return json.loads(json.dumps(recorded, default=str))


def write_settings(out: str | Path, settings: dict | str) -> None:
    """The run's settings file: ``settings`` as YAML (a dict) or the YAML text itself. The training data's
    fingerprint, once the trainer recorded it, stays (the command line rewrites its resolved config, which
    knows nothing of it, before a resume is checked against it)."""
    text = settings if isinstance(settings, str) else yaml.safe_dump(settings, sort_keys=False)
    path = Path(out, SETTINGS_FILE)
    recorded = (read_settings(out) or {}).get(DATA_FINGERPRINT) if path.is_file() else None
    if recorded is not None and DATA_FINGERPRINT not in (yaml.safe_load(text) or {}):
        text = text.rstrip("\n") + "\n" + yaml.safe_dump({DATA_FINGERPRINT: recorded})
    partial = path.with_name(f".{SETTINGS_FILE}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)  # whole or not there: the other processes of a run read it meanwhile
    _settings_written.add(_key(out))


def settings_written(out: str | Path) -> bool:
    """Whether this process wrote this run's settings file already (``orpo train`` writes its resolved config
    before the trainer starts)."""
    return _key(out) in _settings_written


def read_settings(folder: str | Path) -> dict | None:
    """The settings file in ``folder``, or None when there is none."""
    path = Path(folder, SETTINGS_FILE)
    if not path.is_file():
        return None
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise OrpoError(
            f"{path} is damaged{line}: {getattr(err, 'problem', None) or err}; restore it, or delete it to "
            "use no recorded settings"
        ) from None
    if not isinstance(settings, dict):
        raise OrpoError(
            f"{path} is damaged: it holds a {type(settings).__name__}, not the settings mapping; restore it, "
            "or delete it to use no recorded settings"
        )
    return settings


def _field_defaults() -> dict:
    """Each ORPOConfig field's dataclass default: a key one settings file leaves out is at its default there."""
    from orpo.config import ORPOConfig

    return {
        f.name: f.default
        for f in dataclasses.fields(ORPOConfig)
        if f.init and f.default is not dataclasses.MISSING
    }


def _effective(settings: dict, keys: set[str]) -> dict:
    """``settings`` as the run resolves them: a key left out at its default, ``max_prompt_length`` unset at
    what ORPOConfig makes of it (a trainer records the resolved value, a config file what was written)."""
    default = _field_defaults()
    values = {k: settings.get(k, default.get(k)) for k in {*keys, "max_length", "max_prompt_length"}}
    values["max_prompt_length"] = defaults.prompt_limit(values["max_length"], values["max_prompt_length"])
    return values


def check_resumed_settings(
    folder: str | Path, new: dict | str, only_new_keys: bool = False, asked: str = "resuming"
) -> list[str]:
    """A resume against the settings file in ``folder`` (none: nothing to check): a change to a setting in
    :data:`FIXED_ON_RESUME` is refused, naming the keys. Returns the other settings that changed (max_steps,
    logging, saving, ...: taken from the new run). Every key either side records is compared (one side leaving
    it out: its default there), or with ``only_new_keys`` those ``new`` records: the trainer's settings (its
    ORPOConfig's) know nothing of the model or data names a command line's settings file holds."""
    saved = read_settings(folder)
    if saved is None:
        return []
    new = (yaml.safe_load(new) or {}) if isinstance(new, str) else new
    # a run saved before nll_include_prompt's default changed (issue 27) trained without the prompt's NLL
    saved.setdefault("nll_include_prompt", defaults.NLL_INCLUDE_PROMPT_UNRECORDED)
    # bf16's default follows the hardware and the model (settled once the model is loaded, after this check):
    # a resume on another machine may train in another precision, as a new run there would
    keys = ({*new} if only_new_keys else {*saved, *new}) - {"output_dir", "bf16"}
    if (
        DATA_FINGERPRINT not in new or DATA_FINGERPRINT not in saved
    ):  # the command line's own check, an older run
        keys.discard(DATA_FINGERPRINT)
    before, after = _effective(saved, keys), _effective(new, keys)
    changed = sorted(k for k in keys if before.get(k) != after.get(k))
    fixed = [k for k in changed if k in FIXED_ON_RESUME]
    if fixed:
        differences = "; ".join(
            "the training data's rows changed (their content hash differs: edited in place?)"
            if k == DATA_FINGERPRINT
            else f"{k}: {saved.get(k)!r} -> {new.get(k)!r}"
            for k in fixed
        )
        raise UsageError(
            f"{asked} continues the run in {folder} as it was set up, but these settings differ from its "
            f"{SETTINGS_FILE}: {differences}. Resume with the same settings, or start a new run"
        )
    return changed


# ---- the prompt format beside a saved model ----------------------------------------------------------------


def record_prompt_format(folder: str | Path, chat_template: bool) -> None:
    Path(folder, PROMPT_FORMAT_FILE).write_text(json.dumps({"chat_template": chat_template}) + "\n")


def trained_with_chat_template(folder: str | Path) -> bool | None:
    """What :func:`record_prompt_format` saved in ``folder``; None when nothing was (not an orpo run, a hub
    name) or the record cannot be read."""
    path = Path(folder, PROMPT_FORMAT_FILE)
    try:
        value = json.loads(path.read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None
