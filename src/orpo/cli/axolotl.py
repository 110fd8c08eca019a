"""Axolotl's config keys that are more than a new name: its adapter, attention, precision and tracker
keys become our ``peft`` block, ``model`` options, ``bf16`` / ``tf32`` and ``report_to``, so an Axolotl
ORPO config (``rl: orpo``) trains as it is. Plain renames (``sequence_len``, ``optimizer``, ...) are
aliases in :mod:`orpo.cli.run_config` (``val_set_size`` is an :class:`~orpo.ORPOConfig` field); keys that
mean nothing here are ignored with a note; anything whose effect we would lose is an error naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orpo.errors import UsageError

# Axolotl's LoRA keys -> peft.LoraConfig's.
LORA_KEYS = {
    "lora_r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "target_modules",
    "lora_modules_to_save": "modules_to_save",
    "lora_fan_in_fan_out": "fan_in_fan_out",
}
# Attention switches -> attn_implementation.
ATTENTION_KEYS = {
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "flex_attention": "flex_attention",
    "eager_attention": "eager",
}
# Weights & Biases keys -> the environment variables its Trainer callback reads.
WANDB_ENV = {
    "wandb_project": "WANDB_PROJECT",
    "wandb_entity": "WANDB_ENTITY",
    "wandb_watch": "WANDB_WATCH",
    "wandb_log_model": "WANDB_LOG_MODEL",
    "wandb_mode": "WANDB_MODE",
}
# Keys that change nothing here (what Axolotl uses them for).
IGNORED = {
    "strict": "Axolotl's config validation",
    "model_type": "Axolotl's model class; orpo loads causal LMs",
    "tokenizer_type": "Axolotl's tokenizer class; orpo uses AutoTokenizer",
    "is_llama_derived_model": "Axolotl's model family hint",
    "is_mistral_derived_model": "Axolotl's model family hint",
    "is_qwen_derived_model": "Axolotl's model family hint",
    "dataset_prepared_path": "Axolotl's tokenized-data cache; orpo caches under $ORPO_CACHE_DIR",
    "pad_to_sequence_len": "Axolotl's padding to sequence_len; orpo pads batches to their longest row",
    "sample_packing": "orpo packs pairs itself where exact (padding_free / prefix_sharing)",
    "eval_sample_packing": "orpo packs pairs itself where exact (padding_free / prefix_sharing)",
    "save_safetensors": "orpo always saves safetensors",
    "local_rank": "set by the launcher",
    "debug": "Axolotl's debug output",
}


@dataclass
class Translated:
    """The config with Axolotl's structural keys rewritten, plus what goes elsewhere."""

    values: dict[str, Any]
    model_options: dict[str, Any] = field(default_factory=dict)  # into the `model:` block
    env: dict[str, str] = field(default_factory=dict)  # environment for trackers (W&B)


def translate(merged: dict[str, Any], notes: list[str]) -> Translated:
    """Rewrite Axolotl's structural keys of ``merged`` (notes say what became what)."""
    values = dict(merged)
    out = Translated(values)
    for key in list(values):
        if key in IGNORED:
            notes.append(f"ignoring '{key}' ({IGNORED[key]})")
            del values[key]
    _adapter(values, notes)
    _attention(values, out, notes)
    for key in ("load_in_4bit", "load_in_8bit"):
        if key in values:
            out.model_options[key] = bool(values.pop(key))
    for key in ("bf16", "tf32"):
        if values.get(key) == "auto":
            values[key] = None  # orpo's bf16 default is the hardware's support; tf32 unset = torch's default
    _trackers(values, out, notes)
    _per_epoch(values, notes)
    if "group_by_length" in values:
        if values.pop("group_by_length"):
            values["train_sampling_strategy"] = "group_by_length"
            notes.append("'group_by_length: true' read as 'train_sampling_strategy: group_by_length'")
    if values.get("chat_template") == "tokenizer_default":
        notes.append("'chat_template: tokenizer_default' (Axolotl): the tokenizer's own template")
        del values["chat_template"]
    liger = [key for key in values if key.startswith("liger_")]
    if liger:
        if any(values[key] for key in liger):
            values["use_liger_kernel"] = True
            notes.append(f"{', '.join(liger)} (Axolotl's Liger plugin) read as 'use_liger_kernel: true'")
        for key in liger:
            del values[key]
    return out


def _adapter(values: dict, notes: list[str]) -> None:
    adapter = values.pop("adapter", None)
    lora = {LORA_KEYS[key]: values.pop(key) for key in list(values) if key in LORA_KEYS}
    target_linear = values.pop("lora_target_linear", None)
    if not adapter:
        if lora or target_linear:
            notes.append("ignoring the lora_* keys: no 'adapter' is set (full fine-tuning)")
        return
    if adapter not in ("lora", "qlora"):
        raise UsageError(f"adapter: '{adapter}' is not supported; orpo trains 'lora' and 'qlora' adapters")
    if "peft" in values:
        raise UsageError("the config gives both 'adapter' (Axolotl) and a 'peft' block; keep one")
    if target_linear:
        if "target_modules" in lora:
            raise UsageError("give one of lora_target_linear and lora_target_modules")
        lora["target_modules"] = "all-linear"
    values["peft"] = {key: value for key, value in lora.items() if value is not None}
    notes.append(f"'adapter: {adapter}' and the lora_* keys (Axolotl) read as peft: {values['peft']}")
    if adapter == "qlora":
        if values.get("load_in_8bit"):
            raise UsageError("adapter: qlora trains on a 4-bit base; remove load_in_8bit")
        if not values.get("load_in_4bit"):
            notes.append("'adapter: qlora' (Axolotl) loads the base in 4-bit (load_in_4bit: true)")
        values["load_in_4bit"] = True


def _attention(values: dict, out: Translated, notes: list[str]) -> None:
    chosen = [key for key in ATTENTION_KEYS if values.pop(key, None)]
    if values.pop("xformers_attention", None):
        raise UsageError("xformers_attention is not supported; use sdp_attention or flash_attention")
    if len(chosen) > 1:
        raise UsageError(f"choose one attention implementation, got {', '.join(chosen)}")
    if chosen:
        out.model_options["attn_implementation"] = ATTENTION_KEYS[chosen[0]]
        notes.append(
            f"'{chosen[0]}: true' (Axolotl) read as attn_implementation: {ATTENTION_KEYS[chosen[0]]}"
        )


def _trackers(values: dict, out: Translated, notes: list[str]) -> None:
    """``use_tensorboard`` and ``wandb_*`` -> ``report_to`` (added to any given), W&B's environment
    variables and ``run_name``; empty ``wandb_*`` values mean no W&B, as in Axolotl."""
    added = ["tensorboard"] if values.pop("use_tensorboard", None) else []
    run_name = values.pop("wandb_name", None)
    for key, variable in WANDB_ENV.items():
        value = values.pop(key, None)
        if value not in (None, ""):
            out.env[variable] = str(value).lower() if isinstance(value, bool) else str(value)
    if "WANDB_PROJECT" in out.env:
        added.append("wandb")
        if run_name:
            values.setdefault("run_name", run_name)
    if not added:
        return
    given = values.get("report_to")
    current = [] if given in (None, "none") else [given] if isinstance(given, str) else list(given)
    values["report_to"] = current + [name for name in added if name not in current]
    notes.append(f"Axolotl's tracker keys read as report_to: {values['report_to']}")


def _per_epoch(values: dict, notes: list[str]) -> None:
    """``evals_per_epoch`` / ``saves_per_epoch``: once per epoch is the ``epoch`` strategy; k per epoch
    over E epochs is a step interval of 1 / (k * E), which Trainer takes as a fraction of all training
    steps (of max_steps, when that is set). Evaluations need held-out data; without it, none."""
    if not any(key in values for key in ("evals_per_epoch", "saves_per_epoch")):
        return
    from transformers import TrainingArguments  # only here: checking a config's key names must not need it

    default = TrainingArguments.num_train_epochs
    epochs = float(values.get("num_train_epochs", values.get("num_epochs", default)) or 1)
    has_eval_data = any(
        values.get(key) for key in ("eval_datasets", "eval_dataset", "test_datasets", "val_set_size")
    )
    for key, strategy, steps in (
        ("evals_per_epoch", "eval_strategy", "eval_steps"),
        ("saves_per_epoch", "save_strategy", "save_steps"),
    ):
        per_epoch = values.pop(key, None)
        if not per_epoch:
            continue
        if strategy in values or steps in values:
            raise UsageError(f"give one of {key} (Axolotl) and {strategy} / {steps}")
        if key == "evals_per_epoch" and not has_eval_data:
            notes.append(f"ignoring '{key}': no eval_datasets (test_datasets) or val_set_size to evaluate on")
            continue
        if float(per_epoch) == 1:
            values[strategy] = "epoch"
            notes.append(f"'{key}: 1' (Axolotl) read as {strategy}: epoch")
            continue
        values[strategy] = "steps"
        values[steps] = 1 / (float(per_epoch) * epochs)
        notes.append(
            f"'{key}: {per_epoch}' (Axolotl) read as {strategy}: steps, {steps}: {values[steps]:.4g} "
            "(a fraction of all training steps)"
        )
