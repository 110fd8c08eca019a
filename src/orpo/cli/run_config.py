"""Config files for ``orpo train``: YAML/JSON onto ``ORPOConfig`` plus model, tokenizer and data.

Keys are ``ORPOConfig`` fields, plus ``model`` (a name/path, or a mapping with ``name``, ``dtype``,
``attn_implementation``, ``trust_remote_code``), ``tokenizer``, ``chat_template``, ``datasets`` and
``eval_datasets`` (sources as in :mod:`orpo.data.formats`, optionally with ``weight``), and the names users bring
from Axolotl, LLaMA-Factory and TRL, each mapped with a one-line note. Unknown keys are errors with a
"did you mean" suggestion; values of the wrong type name the key and the expected type.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orpo.cli.axolotl import translate
from orpo.errors import ConfigError, OrpoError, UsageError, describe_problems
from orpo.legacy_args import translate as translate_legacy_args

if TYPE_CHECKING:
    from orpo.config import ORPOConfig

# Foreign name -> (our name, where it comes from).
ALIASES = {
    "sequence_len": ("max_length", "Axolotl"),
    "cutoff_len": ("max_length", "LLaMA-Factory"),
    "micro_batch_size": ("per_device_train_batch_size", "Axolotl"),
    "num_epochs": ("num_train_epochs", "Axolotl"),
    "pref_beta": ("orpo_alpha", "LLaMA-Factory (pref_beta is ORPO's lambda there)"),
    "beta": ("orpo_alpha", "TRL (its ORPO `beta` is the paper's lambda)"),
    "model_name_or_path": ("model", "LLaMA-Factory / TRL scripts"),
    "base_model": ("model", "Axolotl"),
    "dataset": ("datasets", "shorthand"),
    "eval_dataset": ("eval_datasets", "shorthand"),
    "optimizer": ("optim", "Axolotl"),
    "lr_scheduler": ("lr_scheduler_type", "Axolotl"),
    "eval_batch_size": ("per_device_eval_batch_size", "Axolotl"),
    "train_on_inputs": ("nll_include_prompt", "Axolotl (true: the prompt tokens are trained on too)"),
    "dataset_processes": ("dataset_num_proc", "Axolotl"),
    "test_datasets": ("eval_datasets", "Axolotl"),
    "gradient_checkpointing": ("activation_checkpointing", "transformers < 5.2x, Axolotl"),
}
# Keys of the config's `model:` block passed on to from_pretrained (load_in_4bit/8bit: bitsandbytes).
MODEL_INIT_KEYS = (
    "gguf_file",
    "dtype",
    "attn_implementation",
    "trust_remote_code",
    "revision",
    "load_in_4bit",
    "load_in_8bit",
)
RUN_KEYS = (
    "model",
    "tokenizer",
    "chat_template",
    "special_tokens",
    "datasets",
    "eval_datasets",
    "peft",
    "gguf",
)
# Other tools' switches of the training method: ignored with a note when they ask for ORPO (the values
# here), an error when they ask for something else (a DPO config must not quietly train ORPO).
METHOD_SWITCHES = {
    "rl": ("Axolotl's trainer switch", ("orpo",)),
    "stage": ("LLaMA-Factory's stage; its ORPO runs in stage dpo", ("dpo", "orpo")),
    "pref_loss": ("LLaMA-Factory's loss switch", ("orpo",)),
}
BUILTIN_CHAT_TEMPLATES = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
}


@dataclass
class RunConfig:
    """Everything ``orpo train`` needs: the trainer's args and what to train on."""

    args: ORPOConfig
    model: dict[str, Any]
    tokenizer: str | None = None
    chat_template: str | None = None
    special_tokens: dict[str, str] | None = None  # e.g. {pad_token: ...}, added to the tokenizer
    datasets: list = field(default_factory=list)
    eval_datasets: list = field(default_factory=list)
    peft: dict | None = None
    gguf: str | None = None  # a GGUF type: the final model is also written as <output_dir>/model-<type>.gguf
    lora: Any = None  # the peft block as a peft.LoraConfig, built once while checking the config
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    given: tuple[str, ...] = ()  # the ORPOConfig fields the config set (after renames)
    env: dict[str, str] = field(default_factory=dict)  # for trackers: WANDB_PROJECT, ...


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key '{key}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# Values a config may expand to: nested YAML aliases grow exponentially ("billion laughs"), and the resolved
# config is written out in full.
MAX_CONFIG_VALUES = 100_000


def _expands_within(data, budget: int) -> bool:
    """Whether ``data``, with every alias expanded, holds at most ``budget`` values; stops counting there."""
    stack, count = [data], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > budget:
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=_StrictLoader)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise UsageError(f"config file {path}: cannot parse it: {err}") from err
    if data is None:
        return {}
    if not _expands_within(data, MAX_CONFIG_VALUES):
        raise UsageError(
            f"config file {path}: its aliases (*name) expand to more than {MAX_CONFIG_VALUES:,} values; refused"
        )
    if not isinstance(data, dict):
        raise UsageError(
            f"config file {path}: expected a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def _as_number(value):
    """``"1e-5"`` as 1e-05: PyYAML reads exponents without a dot as strings (YAML 1.1)."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def coerce_cli_value(key: str, text: str):
    """A ``--key value`` string from the command line, as the type the key takes (via YAML scalars)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if key not in known_field_names():
        return value  # an unknown key: resolve() reports it, without loading the config's types
    from orpo.config import accepts, field_types

    hint = field_types().get(key)
    if hint is not None and not accepts(hint, value) and accepts(hint, text):
        return text  # e.g. a run_name that looks like a number
    return value


def relative_to(base: Path, spec):
    """A path written in a config file (a dataset, the model, ...), relative to the file's folder if it
    exists there; anything else (a hub name, a path from elsewhere, Jinja) as it is."""
    path = spec["path"] if isinstance(spec, dict) else spec
    try:
        here = isinstance(path, str) and not Path(path).is_absolute() and (base / path).exists()
    except OSError:  # not a path at all (e.g. a long Jinja template)
        here = False
    if here:
        path = str(base / path)
    return {**spec, "path": path} if isinstance(spec, dict) else path


# Keys whose values are paths (or hold them): $VARS and ${VARS} in them are expanded from the environment.
PATH_KEYS = (
    "output_dir",
    "model",
    "base_model",
    "tokenizer",
    "chat_template",
    "datasets",
    "eval_datasets",
    "test_datasets",
)
_VARIABLE = re.compile(r"\$(\w+|\{\w+\})")


def _expand_variables(key: str, value):
    """``value`` with environment variables expanded in its strings (also inside lists and mappings); one that
    is not set is an error naming it, rather than a directory literally named ``$ORPO_T``."""
    if isinstance(value, list):
        return [_expand_variables(key, item) for item in value]
    if isinstance(value, dict):
        return {k: _expand_variables(key, v) for k, v in value.items()}
    if not isinstance(value, str) or "$" not in value:
        return value
    expanded = os.path.expandvars(value)
    missing = _VARIABLE.search(expanded)
    if missing:
        raise UsageError(f"config key '{key}': {missing.group(0)} in {value!r} is not set in the environment")
    return expanded


def resolve(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """A config file's keys and the command line's overrides (which win) as the run, in named steps: other
    tools' names mapped (:func:`_foreign_names`), our aliases and method switches read (:func:`_our_names`),
    the run keys taken out (:func:`_run_keys`), then every value checked and the config built
    (:func:`_build`), all problems of the last two steps reported together."""
    notes: list[str] = []
    merged, foreign = _foreign_names({**raw, **(overrides or {})}, notes)
    values = _our_names(merged, notes)
    problems: list[str] = []
    run = _run_keys(values, foreign.model_options, notes, problems)
    given = tuple(values)
    args = _build(values, run, problems)
    if problems:
        raise UsageError(describe_problems(problems))
    return RunConfig(args=args, notes=notes, raw=merged, given=given, env=foreign.env, **run)


def _foreign_names(merged: dict[str, Any], notes: list[str]):
    """Axolotl's structural keys (:mod:`orpo.cli.axolotl`), ``$VARIABLES`` in paths, and the names older
    transformers and TRL releases had (:mod:`orpo.legacy_args`, the table ORPOConfig reads too)."""
    foreign = translate(merged, notes)
    merged = {
        key: _expand_variables(key, value) if key in PATH_KEYS else value
        for key, value in foreign.values.items()
    }
    try:
        merged, legacy_notes = translate_legacy_args(merged)
    except OrpoError as err:
        raise UsageError(f"config key {err}") from None
    notes.extend(legacy_notes)
    if merged.get("stage") == "dpo" and merged.get("pref_loss") != "orpo":
        raise UsageError(
            "'stage: dpo' without 'pref_loss: orpo' is DPO in LLaMA-Factory; orpo trains ORPO only"
        )
    return merged, foreign


def _our_names(merged: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Keys as ORPOConfig fields and run keys: aliases renamed, method switches that ask for ORPO dropped,
    YAML's exponent strings read as numbers. Unknown keys are refused here, all at once, by name alone (a
    mistyped key needs no torch or transformers loaded)."""
    named = [ALIASES[key][0] if key in ALIASES else key for key in merged if key not in METHOD_SWITCHES]
    unknown = [key for key in named if key not in known_field_names() and key not in RUN_KEYS]
    if unknown:
        raise UsageError(_unknown_keys_message(unknown, known_field_names()))
    from orpo.config import accepts, field_types

    fields = field_types()
    values = {}
    for key, value in merged.items():
        if key in METHOD_SWITCHES:
            what, orpo_values = METHOD_SWITCHES[key]
            if value not in orpo_values:
                raise UsageError(f"'{key}: {value}' asks for another method ({what}); orpo trains ORPO only")
            notes.append(f"ignoring '{key}: {value}' ({what}): orpo always trains ORPO")
            continue
        if key in ALIASES:
            target, origin = ALIASES[key]
            notes.append(f"'{key}' ({origin}) read as '{target}'")
            if target in merged and merged[target] != value:
                raise UsageError(f"config gives both '{key}' and '{target}' with different values; keep one")
            key = target
        if key in fields and not accepts(fields[key], value) and accepts(fields[key], _as_number(value)):
            value = _as_number(value)
        values[key] = value
    return values


def _run_keys(values: dict[str, Any], model_options: dict, notes: list[str], problems: list[str]) -> dict:
    """The keys that are not ORPOConfig fields, taken out of ``values`` and checked (their problems added to
    ``problems``): the model (and its ``from_pretrained`` options), data, tokenizer, template, special tokens
    and the LoRA block (built once here)."""
    model = values.pop("model", None)
    if isinstance(model, str):
        model = {"name": model}
    if model is None:
        problems.append("the config needs 'model' (a hub name or a local directory)")
    elif not isinstance(model, dict) or "name" not in model:
        problems.append(
            "'model' must be a name/path or a mapping with 'name' (and dtype, attn_implementation, ...)"
        )
        model = None
    else:
        for key, value in model_options.items():
            if key in model and model[key] != value:
                problems.append(
                    f"'{key}' is given both in 'model' and at the top level, differently; keep one"
                )
            model[key] = value
        if unknown := set(model) - {"name", *MODEL_INIT_KEYS}:
            problems.append(f"unknown keys under 'model': {sorted(unknown)}")
    datasets = values.pop("datasets", None)
    if not datasets:
        problems.append("the config needs 'datasets' (a path, hub name, or a list of them)")
    run = {
        "model": model or {},
        "datasets": _dataset_specs(datasets, notes, problems) if datasets else [],
        "eval_datasets": _dataset_specs(values.pop("eval_datasets", None) or [], notes, problems),
        **{
            key: values.pop(key, None)
            for key in ("tokenizer", "chat_template", "special_tokens", "peft", "gguf")
        },
    }
    for key, what in (
        ("tokenizer", "a name or path"),
        ("chat_template", "a built-in name, a file or Jinja text"),
    ):
        if run[key] is not None and not isinstance(run[key], str):
            problems.append(f"'{key}' must be {what}, got {type(run[key]).__name__} {run[key]!r}")
    from orpo.export import TYPES as GGUF_TYPES

    if run["gguf"] is not None and run["gguf"] not in GGUF_TYPES:
        problems.append(f"'gguf' must be a GGUF type ({', '.join(GGUF_TYPES)}), got {run['gguf']!r}")
    tokens = run["special_tokens"]
    if tokens is not None and not (
        isinstance(tokens, dict) and all(isinstance(v, str) for v in tokens.values())
    ):
        problems.append("'special_tokens' must map token names to tokens, e.g. {pad_token: '<|pad|>'}")
    run["lora"] = None
    if run["peft"] is not None:
        try:
            run["lora"] = lora_config(run["peft"])
        except UsageError as err:
            problems.append(str(err))
    return run


def _build(values: dict[str, Any], run: dict, problems: list[str]):
    """The ORPOConfig of the run (None when a value is wrong), its problems added to ``problems``: the types of
    the keys as the config file names them, then every value rule (:func:`orpo.config.config_problems`) on the
    keys of the right type, so one error lists them all."""
    from orpo.config import ORPOConfig, type_problems

    mistyped = set()
    for key in list(values):
        if wrong := type_problems({key: values[key]}, named="config key '{}'", every_field=True):
            problems.extend(wrong)
            mistyped.add(key)
    values = {key: value for key, value in values.items() if key not in mistyped}  # the rest still checked
    values.setdefault("output_dir", "orpo-output")
    values.setdefault("report_to", "none")
    init_kwargs = dict(values.pop("model_init_kwargs", None) or {})
    for key in MODEL_INIT_KEYS:
        if key in run["model"]:
            init_kwargs[key] = run["model"][key]
    values["model_init_kwargs"] = init_kwargs or None
    try:
        args = ORPOConfig(**values)
    except ConfigError as err:
        problems.extend(err.problems)
    except OrpoError as err:
        problems.append(str(err))
    except (ValueError, TypeError) as err:
        problems.append(f"invalid training settings: {err}")
    else:
        return None if mistyped else args
    return None


@functools.cache
def known_field_names() -> frozenset[str]:
    """ORPOConfig's field names (TrainingArguments' included), read from the two modules' source without
    importing them: a mistyped key is then reported in a fraction of a second instead of after loading
    torch and transformers (seconds)."""
    transformers_dir = Path(importlib.util.find_spec("transformers").origin).parent
    config_file = Path(importlib.util.find_spec("orpo.config").origin)
    names = set()
    for path, cls in (
        (transformers_dir / "training_args.py", "TrainingArguments"),
        (config_file, "ORPOConfig"),
    ):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == cls:
                names.update(
                    item.target.id
                    for item in node.body
                    if isinstance(item, ast.AnnAssign)
                    and isinstance(item.target, ast.Name)
                    and not item.target.id.startswith("_")
                )
    return frozenset(names)


def _unknown_keys_message(unknown: list[str], fields) -> str:
    """All unknown keys at once, each with its likeliest meaning, so one edit fixes the file."""
    known = sorted([*fields, *RUN_KEYS, *ALIASES])
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}"


def _dataset_specs(value, notes: list[str], problems: list[str]) -> list:
    """Sources as :func:`orpo.data.read_pairs` takes them (each weight checked here, once); Axolotl's ``type``
    noted; what is wrong added to ``problems``."""
    items = value if isinstance(value, list) else [value]
    specs = []
    for item in items:
        if isinstance(item, str):
            specs.append(item)
            continue
        if not isinstance(item, dict) or "path" not in item:
            problems.append(f"each dataset needs a 'path' (file, directory or hub name), got {item!r}")
            continue
        unknown = set(item) - {"path", "weight", "type", "split", "ds_type", "data_files"}
        if unknown:
            problems.append(
                f"unknown keys {sorted(unknown)} in dataset {item['path']} (use path, weight, split)"
            )
            continue
        for key, why in (("type", "formats are detected"), ("ds_type", "file types are detected")):
            if key in item:
                notes.append(f"dataset {item['path']}: ignoring Axolotl '{key}: {item[key]}' ({why})")
        files = item.get("data_files") or [item["path"]]
        for path in [files] if isinstance(files, str) else files:
            from orpo.data import check_weight

            try:
                spec = {"path": path, "weight": check_weight(path, _as_number(item.get("weight", 1.0)))}
            except OrpoError as err:
                problems.append(str(err))
                continue
            if item.get("split"):
                spec["split"] = item["split"]
            specs.append(spec)
        if "data_files" in item:
            notes.append(f"dataset {item['path']}: its data_files (Axolotl) are the sources")
    return specs


def lora_config(peft: dict):
    """The config's ``peft`` block as a ``peft.LoraConfig`` (task CAUSAL_LM); a one-line error for a block
    that is not a mapping, an unknown key or a bad value."""
    if not isinstance(peft, dict):
        raise UsageError(
            f"'peft' must be a mapping of LoRA settings, e.g. {{r: 16, lora_alpha: 32}}; got {peft!r}"
        )
    try:
        from peft import LoraConfig
    except ImportError as err:
        raise UsageError(
            "the config has a 'peft' block but peft is not installed: pip install 'orpo[peft]'"
        ) from err
    from orpo.config import field_types, scalar_type_problem

    hints = field_types(LoraConfig)  # LoraConfig does not check its numbers: r="abc" failed deep in peft
    for key, value in peft.items():
        if key in hints and (problem := scalar_type_problem(hints[key], key, value)) is not None:
            raise UsageError(f"'peft': {problem}")
    try:
        return LoraConfig(task_type="CAUSAL_LM", **peft)
    except (TypeError, ValueError) as err:
        raise UsageError(f"'peft': {err}") from err


def chat_template_text(value: str | None) -> str | None:
    """A built-in template name, a Jinja string, or a file holding one."""
    if value is None:
        return None
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    path = Path(value)
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" not in value:
        raise UsageError(
            f"chat_template '{value}' is neither a built-in ({', '.join(BUILTIN_CHAT_TEMPLATES)}), a file, nor Jinja"
        )
    return value


# Shown in every resolved config, set or not: what a reader looks for first.
ALWAYS_SHOWN = ("output_dir", "orpo_alpha", "orpo_beta", "nll_include_prompt", "learning_rate", "bf16")


def to_yaml(run: RunConfig) -> str:
    """The resolved run as YAML (saved next to the outputs as ``orpo_config.yaml``): the fields the config
    set, as resolved, plus :data:`ALWAYS_SHOWN`. Every other field is at its default. No second
    ``ORPOConfig`` is built to find the defaults: building one re-initialises accelerate's process state,
    which would undo the run's own (a multi-process run would then train unsynchronised copies)."""
    shown = (
        set(run.given) | set(ALWAYS_SHOWN) | ({"model_init_kwargs"} if run.args.model_init_kwargs else set())
    )
    changed = {}
    from orpo.config import ORPOConfig

    for f in dataclasses.fields(ORPOConfig):
        if f.init and f.name in shown:
            value = getattr(run.args, f.name)
            changed[f.name] = value.value if hasattr(value, "value") else value
    document = {"model": run.model, "datasets": run.datasets, **changed}
    for key in ("eval_datasets", "tokenizer", "chat_template", "special_tokens", "peft", "gguf"):
        if getattr(run, key):
            document[key] = getattr(run, key)
    return yaml.safe_dump(json.loads(json.dumps(document, default=str)), sort_keys=False)
