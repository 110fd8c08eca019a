"""Argument names ORPO code was written with that today's libraries no longer have, and what each is now.

ORPO scripts and notebooks on the web were written against transformers 4.38 … 5.x and TRL 0.8 … 1.16, and
pass ``TrainingArguments`` / TRL ``ORPOConfig`` fields that were renamed or removed since (a TypeError in
the current libraries). One table, read by ``ORPOConfig(...)`` in Python, by ``HfArgumentParser`` command
lines (renames as flag aliases) and by ``orpo train``'s config files, so a pasted script only changes its
import:

- renamed: the value goes to the new name, with a one-line note naming it (both given, differently: an error);
- removed, and the value given is meaningless now (``use_mps_device=False``): accepted with a note;
- removed but meaningful: the current equivalent (``no_cuda=True`` -> ``use_cpu=True``), or an error that
  says what to write.

Built from the ``training_args.py`` of every transformers minor release 4.38 … 5.24 and TRL's
``orpo_config.py`` 0.8.2 … 1.16 (the README's "Coming from TRL" lists the same names; a test keeps them equal).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orpo.errors import OrpoError


@dataclass(frozen=True)
class LegacyArg:
    """One old name: where it came from, what it is now, and how a value given under it is read."""

    name: str
    origin: str  # the library and the versions that had it
    now: str  # what to write today (README, notes)
    read: Callable[[Any, dict], dict | None]  # (value, every value given) -> fields to set; None: ignored
    renamed_to: str | None = None  # a plain rename: also a flag alias for HfArgumentParser


def _rename(name: str, origin: str, new: str) -> LegacyArg:
    return LegacyArg(name, origin, f"`{new}`", _renamed(name, new), renamed_to=new)


def _renamed(old: str, new: str) -> Callable[[Any, dict], dict | None]:
    def read(value, given):
        if value is None:
            return None
        if new in given and given[new] is not None and given[new] != value:
            shown = "..." if new.endswith("token") else f"{given[new]!r}"
            raise OrpoError(f"{old} and {new}={shown} are both given: {old} is {new} now; give only {new}")
        return {new: value}

    return read


def _ignored(meaningful: Callable[[Any], bool] | None = None, error: str = "") -> Callable:
    """A removed name: ignored, unless ``meaningful(value)``, then an error saying ``error``."""

    def read(value, given):
        if meaningful is not None and meaningful(value):
            raise OrpoError(error.format(value=value))
        return None

    return read


def _switch(target: str, wanted, *, unless_set: bool = False) -> Callable:
    """A removed boolean whose True is ``target=wanted`` now; False (its old default) means nothing."""

    def read(value, given):
        if not value:
            return None
        if target in given and given[target] not in (None, wanted):
            if unless_set:
                return None
            raise OrpoError(f"it asks for {target}={wanted!r}, but {target}={given[target]!r} is given too")
        return {target: wanted}

    return read


def _into_mapping(field: str, key: str, empty=(None, False)) -> Callable:
    """A removed option that lives on as ``field[key]`` (accelerator_config, fsdp_config)."""

    def read(value, given):
        if value in empty:
            return None
        current = given.get(field) or {}
        if hasattr(current, "to_dict"):  # an AcceleratorConfig
            current = current.to_dict()
        if not isinstance(current, dict):
            raise OrpoError(
                f"it moved into {field}, which is given as {current!r}: write it there as '{key}'"
            )
        mapping = dict(current)
        if key == "transformer_layer_cls_to_wrap":
            value = [*_as_list(mapping.get(key)), *_as_list(value)]
        mapping[key] = value
        return {field: mapping}

    return read


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _append(field: str, item: str, joiner: str | None = None) -> Callable:
    """A removed boolean whose True is one more entry in ``field`` (a list, or a space-separated string)."""

    def read(value, given):
        if not value:
            return None
        current = given.get(field)
        if joiner is not None and isinstance(current, str | None):
            words = (current or "").split()
            return {field: joiner.join([*words, item] if item not in words else words)}
        items = _as_list(current)
        return {field: items if item in items else [*items, item]}

    return read


def _hub_model_id(value, given):
    if value is None:
        return None
    organization = given.get("push_to_hub_organization")
    return _renamed("push_to_hub_model_id", "hub_model_id")(
        f"{organization}/{value}" if organization else value, given
    )


def _hub_organization(value, given):
    """transformers 4: the organization alone is the repository ORG/<output_dir's name>."""
    if value is None or given.get("push_to_hub_model_id") is not None:
        return None  # folded in by push_to_hub_model_id
    if given.get("hub_model_id"):
        raise OrpoError(
            f"hub_model_id={given['hub_model_id']!r} is given too: write hub_model_id='{value}/NAME'"
        )
    name = os.path.basename(os.path.normpath(str(given.get("output_dir") or "trainer_output")))
    return {"hub_model_id": f"{value}/{name}"}


def _warmup_ratio(value, given):
    if not value:
        return None
    if not isinstance(value, int | float) or not 0 <= value <= 1:
        raise OrpoError(f"it must be a fraction of the training steps between 0 and 1, got {value!r}")
    if given.get("warmup_steps"):
        return None  # transformers 4.x: warmup_steps > 0 wins over the ratio
    if value == 1:
        raise OrpoError(
            "warming up over the whole run has no equivalent now (warmup_steps=1.0 is one step): "
            "write warmup_steps=<the run's steps> or warmup_steps=0.999"
        )
    return {"warmup_steps": value}


def _logging_dir(value, given):
    if value is None:
        return None
    # transformers 5.15+ reads TensorBoard's folder from the environment; one set there already wins
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(value))
    return {}


def _use_mps_device(value, given):
    if not value:
        return None
    import torch

    if not torch.backends.mps.is_available():
        raise OrpoError(
            "it asks for Apple's MPS device, which this machine does not have; remove it (the MPS device "
            "is used by itself wherever there is one)"
        )
    return None


TF4 = "transformers 4.38–4.57"  # removed in transformers 5.0
LEGACY_ARGS: tuple[LegacyArg, ...] = (
    # ---- transformers TrainingArguments --------------------------------------------------------
    _rename("evaluation_strategy", "transformers ≤ 4.50 (renamed in 4.41)", "eval_strategy"),
    LegacyArg("no_cuda", TF4, "`use_cpu`", _switch("use_cpu", True)),
    LegacyArg(
        "use_mps_device",
        TF4,
        "gone: MPS is used where present (True without MPS: an error)",
        _use_mps_device,
    ),
    _rename("per_gpu_train_batch_size", TF4, "per_device_train_batch_size"),
    _rename("per_gpu_eval_batch_size", TF4, "per_device_eval_batch_size"),
    LegacyArg("push_to_hub_model_id", TF4, "`hub_model_id` (with the organization, if given)", _hub_model_id),
    LegacyArg("push_to_hub_organization", TF4, "part of `hub_model_id`", _hub_organization),
    _rename("push_to_hub_token", TF4, "hub_token"),
    _rename("torchdynamo", TF4, "torch_compile_backend"),
    LegacyArg(
        "warmup_ratio", "transformers ≤ 5.14", "`warmup_steps` (a value below 1 is a ratio)", _warmup_ratio
    ),
    LegacyArg(
        "logging_dir",
        "transformers ≤ 5.14",
        "the environment variable `TENSORBOARD_LOGGING_DIR` (set from it unless set)",
        _logging_dir,
    ),
    LegacyArg(
        "group_by_length",
        "transformers ≤ 5.1",
        "`train_sampling_strategy='group_by_length'`",
        _switch("train_sampling_strategy", "group_by_length"),
    ),
    LegacyArg("adafactor", TF4, "`optim='adafactor'`", _switch("optim", "adafactor")),
    LegacyArg(
        "include_inputs_for_metrics",
        TF4,
        "`include_for_metrics=['inputs']`",
        _append("include_for_metrics", "inputs"),
    ),
    LegacyArg(
        "include_tokens_per_second",
        TF4,
        "`include_num_input_tokens_seen='all'` (logs tokens/s)",
        _switch("include_num_input_tokens_seen", "all", unless_set=True),
    ),
    LegacyArg(
        "tpu_metrics_debug", TF4, "`debug='tpu_metrics_debug'`", _append("debug", "tpu_metrics_debug", " ")
    ),
    LegacyArg(
        "dispatch_batches",
        "transformers ≤ 4.50",
        "`accelerator_config={'dispatch_batches': ...}`",
        _into_mapping("accelerator_config", "dispatch_batches", empty=(None,)),
    ),
    LegacyArg(
        "split_batches",
        "transformers ≤ 4.50",
        "`accelerator_config={'split_batches': ...}`",
        _into_mapping("accelerator_config", "split_batches"),
    ),
    LegacyArg(
        "fsdp_min_num_params",
        TF4,
        "`fsdp_config={'min_num_params': ...}`",
        _into_mapping("fsdp_config", "min_num_params", empty=(None, 0)),
    ),
    LegacyArg(
        "fsdp_transformer_layer_cls_to_wrap",
        TF4,
        "`fsdp_config={'transformer_layer_cls_to_wrap': [...]}`",
        _into_mapping("fsdp_config", "transformer_layer_cls_to_wrap"),
    ),
    LegacyArg(
        "fp16_backend",
        TF4,
        "gone: torch AMP (`fp16` / `bf16`); apex is an error",
        _ignored(lambda v: v == "apex", "the apex backend is gone: write fp16=True or bf16=True (torch AMP)"),
    ),
    LegacyArg(
        "half_precision_backend",
        TF4,
        "gone: torch AMP (`fp16` / `bf16`); apex is an error",
        _ignored(lambda v: v == "apex", "the apex backend is gone: write fp16=True or bf16=True (torch AMP)"),
    ),
    LegacyArg("fp16_opt_level", TF4, "gone (an apex setting)", _ignored()),
    LegacyArg(
        "save_safetensors",
        TF4,
        "gone: models always save as safetensors (False is an error)",
        _ignored(
            lambda v: v is False, "pickled weights are no longer written: remove save_safetensors=False"
        ),
    ),
    LegacyArg(
        "past_index",
        TF4,
        "gone (TransformerXL/XLNet memories; ≥ 0 is an error)",
        _ignored(lambda v: v is not None and v >= 0, "it served TransformerXL/XLNet memories: remove it"),
    ),
    LegacyArg(
        "ray_scope",
        TF4,
        "the environment variable `RAY_SCOPE`",
        _ignored(lambda v: v not in (None, "last"), "write RAY_SCOPE={value} in the environment instead"),
    ),
    LegacyArg(
        "tp_size",
        "transformers 4.50–4.51",
        "`parallelism_config` (tensor parallelism; > 1 is an error)",
        _ignored(
            lambda v: v is not None and v > 1,
            "write parallelism_config=ParallelismConfig(tp_size={value}) (accelerate), or load the "
            "model with tp_plan='auto'",
        ),
    ),
    LegacyArg("use_ipex", "transformers ≤ 4.56", "gone (a speed option of Intel's extension)", _ignored()),
    LegacyArg("jit_mode_eval", TF4, "gone (a speed option)", _ignored()),
    LegacyArg("mp_parameters", TF4, "gone (Trainer ignored it)", _ignored()),
    LegacyArg("tpu_num_cores", TF4, "gone (set by the TPU launcher)", _ignored()),
    LegacyArg("use_legacy_prediction_loop", TF4, "gone (one evaluation loop)", _ignored()),
    # ---- TRL ORPOConfig ------------------------------------------------------------------------
    _rename("max_target_length", "TRL ≤ 0.13 (DPO's name)", "max_completion_length"),
    LegacyArg(
        "truncation_mode",
        "TRL 0.8–0.29",
        "gone: long prompts keep their end (keep_start is an error)",
        _ignored(
            lambda v: v not in (None, "keep_end"),
            "prompts longer than max_prompt_length keep their end (TRL's keep_end); shorten them "
            "or raise max_prompt_length",
        ),
    ),
    LegacyArg(
        "label_pad_token_id",
        "TRL 0.8–0.27",
        "gone: orpo lays out its own batches, labels unused",
        _ignored(),
    ),
)
BY_NAME = {arg.name: arg for arg in LEGACY_ARGS}
# Old values of current fields.
LEGACY_VALUES = {("optim", "adamw_hf"): ("adamw_torch", "transformers ≤ 4.49")}


def translate(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``values`` (keyword arguments or config keys) with every old name read as it is now, and one note per
    old name. Raises :class:`OrpoError` naming the argument when a value has no current equivalent."""
    old = [name for name in values if name in BY_NAME]
    if not old and not any((k, v) in LEGACY_VALUES for k, v in values.items() if isinstance(v, str)):
        return values, []
    current = {k: v for k, v in values.items() if k not in BY_NAME}
    notes = []
    for name in old:
        arg, value = BY_NAME[name], values[name]
        try:
            updates = arg.read(value, {**values, **current})
        except OrpoError as err:
            shown = "..." if name.endswith("token") else f"{value!r}"
            raise OrpoError(f"{name}={shown} ({arg.origin}): {err}") from None
        if updates is not None:
            current.update(updates)
            written = ", ".join(f"{k}={v!r}" if k != "hub_token" else k for k, v in updates.items())
            notes.append(f"{name} ({arg.origin}) is {arg.now} now: read as {written or 'that'}")
        else:
            notes.append(f"{name}={value!r} ({arg.origin}) ignored: {arg.now}")
    for (key, old_value), (new_value, origin) in LEGACY_VALUES.items():
        if current.get(key) == old_value:
            current[key] = new_value
            notes.append(f"{key}={old_value!r} ({origin}) is {key}={new_value!r} now")
    return current, notes


def flag_aliases() -> dict[str, list[str]]:
    """Current field -> old names that are plain renames: ``HfArgumentParser`` takes them as flag aliases, so a
    documented command line such as ``--evaluation_strategy steps`` parses."""
    aliases: dict[str, list[str]] = {}
    for arg in LEGACY_ARGS:
        if arg.renamed_to is not None:
            aliases.setdefault(arg.renamed_to, []).append(arg.name)
    return aliases
