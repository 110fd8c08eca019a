"""``ORPOConfig``: ``transformers.TrainingArguments`` plus the ORPO knobs."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from orpo import defaults
from orpo.errors import ConfigError, OrpoError
from orpo.guards import launched_processes
from orpo.legacy_args import flag_aliases
from orpo.legacy_args import translate as translate_legacy_args

logger = logging.getLogger("orpo")


def accelerator_present() -> bool:
    """True where torch sees an accelerator (CUDA, ROCm, MPS, XPU, ...) or runs on TPUs (XLA)."""
    from transformers.utils import is_torch_xla_available

    return torch.accelerator.is_available() or is_torch_xla_available()


def bf16_supported() -> bool:
    """True on an accelerator where bf16 training is fast and supported (CUDA with bf16, or XPU)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch, "xpu", None) and torch.xpu.is_available())


def cpu_bf16_native() -> str | None:
    """The CPU's native bf16 instructions (``"AMX"`` or ``"avx512_bf16"``), or None where bf16 would be
    emulated. Measured on a 2-core AVX-512 EPYC with avx512_bf16 (benchmarks/RESULTS.md): bf16 GEMMs at
    SmolLM2's shapes run 2-5x faster than fp32 and a SmolLM2 training step 1.8-2.1x faster; without those
    instructions oneDNN converts in software and bf16 buys nothing."""
    cpu = getattr(torch, "cpu", None)
    for name, check in (("AMX", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        if getattr(cpu, check, lambda: False)():
            return name
    return None


def default_bf16(fp16: bool, use_cpu: bool) -> bool:
    """bf16's default: on where the device that trains computes bf16 natively (an accelerator, or the CPU
    with :func:`cpu_bf16_native` when there is no accelerator or ``use_cpu``), never beside fp16."""
    if fp16:
        return False
    if use_cpu or not accelerator_present():
        return cpu_bf16_native() is not None
    return bf16_supported()


# Narrower models train in fp32 by default on the CPU: their matmuls are too small for bf16 to pay for autocast's
# casts. Measured (benchmarks/RESULTS.md): the quickstart's demo model (hidden 64, one thread) trained 1.6x
# slower in bf16; SmolLM2-135M (hidden 576) 1.8-2.1x faster.
CPU_BF16_MIN_HIDDEN = 256


def settle_default_bf16(args, model) -> None:
    """The CPU's bf16 default, settled once the model is known: off for models narrower than
    :data:`CPU_BF16_MIN_HIDDEN` (an explicit ``bf16=True`` is kept)."""
    if not (args.bf16 and getattr(args, "bf16_by_default", False)):
        return
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    if not isinstance(hidden, int) or hidden >= CPU_BF16_MIN_HIDDEN:
        return
    args.bf16, args.mixed_precision, args.bf16_by_default = False, "no", False
    args.fp32_because = (
        f"the CPU's bf16 default is off for this model: hidden size {hidden} < {CPU_BF16_MIN_HIDDEN}, matmuls too "
        "small for bf16 to pay; bf16: true turns it on"
    )
    logger.info(f"precision: fp32 ({args.fp32_because})")


def precision_description(args) -> str:
    """One line on what a run computes in, for the log."""
    on_cpu = args.use_cpu or not accelerator_present()
    if args.bf16 and on_cpu:
        return (
            f"bf16 autocast on the CPU ({cpu_bf16_native()}); fp32 weights, "
            "optimizer states and loss math; bf16: false trains in fp32"
        )
    if args.bf16 or args.fp16:
        return f"{'bf16' if args.bf16 else 'fp16'} autocast; fp32 weights, optimizer states and loss math"
    if getattr(args, "fp32_because", None):
        return f"fp32 ({args.fp32_because})"
    return "fp32" + ("" if not on_cpu or cpu_bf16_native() is None else " (bf16: true would be faster here)")


@functools.cache
def field_types(cls=None) -> dict[str, Any]:
    """Each field's type hint of the dataclass ``cls`` (default ``ORPOConfig``, TrainingArguments' fields
    included)."""
    cls = ORPOConfig if cls is None else cls
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def scalar_type_problem(hint, name: str, value) -> str | None:
    """What is wrong with ``value`` for a field of numbers or booleans (None when nothing is, or when the
    field holds something else: those are checked where they are used)."""
    if not _scalar(hint) or accepts(hint, value):
        return None
    return f"{name} must be {type_name(hint)}, got {type(value).__name__} {value!r}"


def accepts(hint, value) -> bool:
    """Whether ``value`` is of the type ``hint`` (None always is; ints are floats; bools are not numbers)."""
    if hint is Any or value is None:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(arg, value) for arg in typing.get_args(hint))
    if origin is not None:
        hint = origin
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        if issubclass(hint, str) and hasattr(hint, "__members__"):  # str enums (schedulers, strategies)
            return isinstance(value, str)
        return isinstance(value, hint)
    return True


def type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _scalar(hint) -> bool:
    """A hint of numbers or booleans only (and None): the fields whose type ORPOConfig checks itself."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return all(arg in (int, float, bool, type(None)) for arg in args)


def _parser_metadata(cls) -> None:
    """What ``HfArgumentParser`` (TRL's ``TrlParser``, example scripts) reads from the fields of ``cls``:

    - every ``bool | None`` field is a bare flag (``--bf16``, as TRL 0.8's documented commands write it): the
      parser gives a bare flag only to booleans whose default is not None, so ``bf16 = None`` demanded a value;
    - the old names of renamed fields are flag aliases (``--evaluation_strategy steps``, :mod:`orpo.legacy_args`).

    The fields are copied first, so ``TrainingArguments``' own are left as they are."""
    hints = typing.get_type_hints(cls)
    aliases = flag_aliases()
    for name, f in list(cls.__dataclass_fields__.items()):
        extra = {}
        if f.init and hints.get(name) == (bool | None) and "nargs" not in f.metadata:
            extra.update(nargs="?", const=True)
        if name in aliases:
            extra["aliases"] = [f"--{old}" for old in aliases[name]]
        if extra:
            copied = copy.copy(f)
            copied.metadata = types.MappingProxyType({**f.metadata, **extra})
            cls.__dataclass_fields__[name] = copied


def _reading_legacy_names(init):
    """``ORPOConfig.__init__`` that first reads the names older transformers and TRL releases had
    (:func:`orpo.legacy_args.translate`), each with a one-line note."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        kwargs, notes = translate_legacy_args(kwargs)
        for note in notes:
            logger.warning(note)
        init(self, *args, **kwargs)

    return __init__


def as_orpo_config(args) -> ORPOConfig:
    """The trainer's ``args``: an :class:`ORPOConfig` as it is, a plain ``TrainingArguments`` converted
    (its fields kept), None the defaults."""
    if args is None:
        return ORPOConfig(output_dir="orpo-output")
    if isinstance(args, ORPOConfig):
        return args
    if isinstance(args, TrainingArguments):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        for key in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):
            values.pop(key, None)  # mirrors of activation_checkpointing*, resolved again
        return ORPOConfig(**values)
    raise OrpoError(f"args must be an ORPOConfig or TrainingArguments, got {type(args).__name__}")


@dataclass
class ORPOConfig(TrainingArguments):
    """Training arguments for :class:`orpo.ORPOTrainer`.

    Everything ``transformers.TrainingArguments`` takes, plus the fields below. ``orpo_alpha`` and
    ``orpo_beta`` are the canonical names; TRL's ``beta`` (which is ORPO's λ, i.e. our alpha) is
    accepted as an alias of ``orpo_alpha``. ``bf16`` defaults to on where the device that trains
    computes bf16 natively (a CPU with AVX512-BF16 or AMX included), so the defaults run fast and
    everywhere; ``bf16=True`` on a machine without an accelerator trains on the CPU.
    """

    orpo_alpha: float | None = field(
        default=None,
        metadata={
            "help": f"Weight λ of the odds-ratio term (default {defaults.ALPHA}, the paper's λ; 0 = SFT only). "
            "TRL calls it `beta`."
        },
    )
    orpo_beta: float = field(
        default=defaults.BETA,
        metadata={"help": "Temperature on the log odds ratio inside the sigmoid; 1.0 = the paper's loss."},
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "TRL's name for `orpo_alpha` (accepted as an alias; folded into orpo_alpha)."},
    )
    max_length: int | None = field(
        default=defaults.MAX_LENGTH,
        metadata={"help": "Maximum tokens of prompt + response; longer rows are truncated."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum prompt tokens; longer prompts keep their end. Unset: half of max_length (TRL has no "
            "such option; half leaves every response room)."
        },
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Maximum response tokens; longer responses keep their start."}
    )
    nll_include_prompt: bool = field(
        default=defaults.NLL_INCLUDE_PROMPT,
        metadata={
            "help": "Score the prompt tokens in the NLL term too, as TRL's trainer and the paper's reference "
            "code do (the default); False = the paper's equation, NLL of the chosen response only."
        },
    )
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "Data format: auto, standard, conversational or implicit (prompt = shared prefix)."
        },
    )
    dataset_columns: dict[str, str] | str | None = field(
        default=None,
        metadata={"help": "Map your column names onto prompt/chosen/rejected, e.g. {'prompt': 'question'}."},
    )
    dataset_subset: str | None = field(
        default=None, metadata={"help": "Subset (configuration) of a hub dataset given by name."}
    )
    skip_invalid_rows: bool = field(
        default=False, metadata={"help": "Drop invalid rows (counted and reported) instead of stopping."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability to 0."})
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes for dataset tokenization."}
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for AutoModelForCausalLM.from_pretrained when `model` is a name."
        },
    )
    logprob_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per chunk of the LM head (peak head memory ~ 2 × chunk × vocab × 4 bytes); "
            f"default: chunks of about {defaults.CHUNK_MIB} MiB of fp32 logits for the model's vocabulary."
        },
    )
    padding_free: bool | None = field(
        default=None,
        metadata={
            "help": "Pack sequences into shared rows with restarting position_ids and no padding. Default (unset): "
            "on where the attention backend supports it and a check on the first data row shows it exact; "
            "true: required (an unsupported model is an error); false: off."
        },
    )
    prefix_sharing: bool | None = field(
        default=None,
        metadata={
            "help": "Lay each pair out as [prompt][chosen][rejected] with a mask that hides chosen from rejected, "
            "so each prompt is processed once (eager and sdpa attention). Default (unset): on where supported "
            "and checked exact; true: required; false: off. With padding_free, pairs are packed into rows."
        },
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Training micro-batches of as many pairs as fit in this many tokens (padding included, as the "
            "batch layout lays them out), grouped by length, instead of per_device_train_batch_size pairs."
        },
    )
    nan_policy: str = field(
        default="error",
        metadata={
            "help": "A non-finite loss: 'error' saves the last good state and stops, naming the step and the "
            "dataset rows of the batch; 'skip' leaves that micro-batch out of the update and counts it "
            "('nan_skipped_batches' in the log)."
        },
    )
    divergence_factor: float | None = field(
        default=10.0,
        metadata={
            "help": "A step loss above this many times the median of the earlier steps' losses (from the "
            "fourth step on) is a diverged run: with "
            "nan_policy 'error' training stops (the weights before that step saved), with 'skip' a warning. "
            "null: no check."
        },
    )
    fused_head_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the loss and its gradient while each chunk's logits are live (3 head matmuls per "
            "chunk instead of 4), when every pair's scored tokens fit in one chunk; exact either way."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "orpo train: start over in an output_dir that holds a finished run or checkpoints (its "
            "checkpoints are removed first); without it such a directory is refused unless resuming "
            "(transformers < 5 had this option)."
        },
    )
    val_set_size: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction (below 1) or number (from 1) of the training pairs, seeded, as the "
            "evaluation set (Axolotl's option); 0 = none."
        },
    )
    generate_during_eval: bool = field(
        default=False,
        metadata={
            "help": "At each evaluation, generate completions for a few fixed held-out prompts and log them "
            "(output_dir/eval_generations.jsonl; a 'game_log' table in W&B or Comet when reporting there)."
        },
    )
    padding_value: int | None = field(
        default=None, metadata={"help": "Token id that pads batches; default: the tokenizer's pad token."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Let a model or tokenizer loaded by name run code from its repository (TRL's option; the "
            "same as trust_remote_code in model_init_kwargs). Off by default."
        },
    )
    is_encoder_decoder: bool | None = field(
        default=None,
        metadata={
            "help": "TRL's option; orpo trains decoder-only causal LMs, so only unset or false is valid."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision (fp32 weights and optimizer states); default: on where the device computes "
            "bf16 natively: a bf16 GPU, or a CPU with AVX512-BF16 or AMX."
        },
    )
    # TRL's ORPOConfig defaults where they differ from Trainer's.
    learning_rate: float = field(
        default=defaults.LEARNING_RATE,
        metadata={"help": "AdamW's initial learning rate (TRL's default, 1e-6)."},
    )
    logging_steps: float = field(
        default=defaults.LOGGING_STEPS,
        metadata={"help": "Log every X steps (an integer, or a float below 1: a ratio of the total steps)."},
    )

    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs", "dataset_columns"]

    def __post_init__(self):
        if self.beta is not None:
            if self.orpo_alpha is not None and self.orpo_alpha != self.beta:
                raise OrpoError(
                    f"ORPOConfig got orpo_alpha={self.orpo_alpha} and beta={self.beta}: `beta` is TRL's name "
                    "for orpo_alpha, so give one of them (or the same value)"
                )
        if self.orpo_alpha is None:
            self.orpo_alpha = defaults.ALPHA if self.beta is None else self.beta
        self.beta = self.orpo_alpha  # TRL's code reads args.beta: the same value under both names
        lengths = {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length}
        if not type_problems(lengths) and (
            self.max_length is None or self.max_length >= 1
        ):  # else: checked below
            self.max_prompt_length = defaults.prompt_limit(self.max_length, self.max_prompt_length)
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            # TRL's ORPOConfig default (gradient_checkpointing=True): a script ported from TRL keeps its memory
            # footprint. Measured on CPU (8-layer Llama, 8 pairs of ~700 tokens): off is 1.11-1.30x faster and
            # takes 2.1x the activation memory. Set here, not as the field default, so transformers does not
            # warn that the deprecated alias gradient_checkpointing was used.
            self.activation_checkpointing = True
        if not self.use_cpu and launched_processes() > 1 and not accelerator_present():
            # Under torchrun / accelerate launch on a machine without accelerators, accelerate chooses its
            # multi-CPU (gloo) mode only when asked for the CPU; otherwise every process would train alone.
            self.use_cpu = True
        # Whether bf16 was chosen here for a CPU (settle_default_bf16 may turn it off once the model is known)
        self.bf16_by_default = self.bf16 is None and (self.use_cpu or not accelerator_present())
        if self.bf16 is None:
            self.bf16 = default_bf16(self.fp16, self.use_cpu)
        elif self.bf16 and (self.use_cpu or not accelerator_present()) and cpu_bf16_native() is None:
            # TRL's default and TRL 0.8's documented commands (--bf16): on a CPU without bf16 instructions
            # every bf16 matmul would be converted in software, slower than fp32 and less exact
            logger.warning(
                "bf16=True: this CPU has no native bf16 (no AVX512-BF16 or AMX), so bf16 would be emulated; "
                "training in fp32 instead"
            )
            self.bf16 = False
        if self.bf16 and not self.use_cpu and not accelerator_present():
            # transformers runs the CPU's bf16 autocast only when told use_cpu (else "You need to assign
            # use_cpu"); without an accelerator the CPU is where the run trains anyway
            self.use_cpu = True
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per dataloader
        if problems := config_problems(self):
            raise ConfigError(problems)
        super().__post_init__()
        self._check_dataset_columns()  # after TrainingArguments parsed a JSON string into a dict
        self._fold_trust_remote_code()

    def _check_dataset_columns(self) -> None:
        columns = self.dataset_columns
        if columns is None:
            return
        if not isinstance(columns, dict) or not all(
            key in defaults.COLUMN_ROLES and isinstance(value, str) for key, value in columns.items()
        ):
            raise OrpoError(
                f"dataset_columns must map {', '.join(defaults.COLUMN_ROLES)} to your column names, e.g. "
                f"{{'prompt': 'question', 'chosen': 'good', 'rejected': 'bad'}}; got {columns!r}"
            )

    def _fold_trust_remote_code(self) -> None:
        """``trust_remote_code=True`` (TRL's field) is ``model_init_kwargs['trust_remote_code']``, which the
        loaders read; the two may not disagree."""
        init_kwargs = dict(self.model_init_kwargs or {})
        if self.trust_remote_code:
            if init_kwargs.get("trust_remote_code") is False:
                raise OrpoError(
                    "trust_remote_code=True but model_init_kwargs sets trust_remote_code: false; give one of them"
                )
            init_kwargs["trust_remote_code"] = True
            self.model_init_kwargs = init_kwargs
        self.trust_remote_code = bool(init_kwargs.get("trust_remote_code", False))


def type_problems(values: dict[str, Any], named: str = "{}", every_field: bool = False) -> list[str]:
    """Values of the wrong type among ``values`` (ORPOConfig fields: ``learning_rate="fast"``), each naming the
    key as ``named`` formats it (a config file says ``config key 'learning_rate'``): fields of numbers and
    booleans, or with ``every_field`` every field (a config file's strings, lists and mappings too; from
    Python, Trainer takes objects of its own in some of those)."""
    hints = field_types()
    problems = []
    for name, value in values.items():
        if name not in hints:
            continue
        if every_field and not accepts(hints[name], value):
            problems.append(
                f"{named.format(name)} must be {type_name(hints[name])}, got {type(value).__name__} {value!r}"
            )
        elif not every_field and (problem := scalar_type_problem(hints[name], name, value)) is not None:
            problems.append(named.format(name) + problem[len(name) :])
    return problems


def config_problems(c) -> list[str]:
    """Every problem with a config's values at once: wrong types (:func:`type_problems`), then every value rule
    broken by a field of the right type (a rule on a mistyped field is not evaluated: its type is the problem).
    ``ORPOConfig`` raises them together (:class:`~orpo.errors.ConfigError`); ``orpo train`` reports them with
    the config file's other problems."""
    problems = type_problems({name: getattr(c, name) for name in field_types()})
    mistyped = {problem.split(" ", 1)[0] for problem in problems}

    def rule(names: str, holds, problem: str) -> None:
        if mistyped.isdisjoint(names.split()) and not holds():
            problems.append(problem)

    for name in ("orpo_alpha", "orpo_beta", "learning_rate"):
        value = getattr(c, name)
        rule(name, lambda v=value: math.isfinite(v), f"{name} must be a finite number, got {value}")
    rule("orpo_alpha", lambda: not c.orpo_alpha < 0, f"orpo_alpha must be >= 0, got {c.orpo_alpha}")
    rule("orpo_beta", lambda: not c.orpo_beta <= 0, f"orpo_beta must be > 0, got {c.orpo_beta}")
    rule(
        "learning_rate", lambda: not c.learning_rate < 0, f"learning_rate must be >= 0, got {c.learning_rate}"
    )
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(c, name)
        rule(name, lambda v=value: v >= 1, f"{name} must be >= 1, got {value}")
    rule(  # -1 (the default) means: train by epochs
        "max_steps",
        lambda: c.max_steps >= -1,
        f"max_steps must be a number of steps, or -1 to train by epochs; got {c.max_steps}",
    )
    for name in ("max_length", "max_prompt_length", "max_completion_length", "max_tokens_per_batch"):
        value = getattr(c, name)
        what = "a positive number of tokens" if name != "max_tokens_per_batch" else ">= 1"
        rule(name, lambda v=value: v is None or v >= 1, f"{name} must be {what}, got {value}")
    if all(
        isinstance(n, int) and n >= 1 for n in (c.max_length, c.max_prompt_length)
    ):  # both set, each valid
        rule(
            "max_length max_prompt_length",
            lambda: c.max_prompt_length < c.max_length,
            f"max_prompt_length ({c.max_prompt_length}) must be smaller than max_length ({c.max_length}), "
            "or no response token would fit",
        )
    factor = c.divergence_factor
    rule(
        "divergence_factor",
        lambda: factor is None or (math.isfinite(factor) and factor > 1),
        f"divergence_factor must be a number above 1, or null for no check; got {factor}",
    )
    rule(
        "nan_policy",
        lambda: c.nan_policy in ("error", "skip"),
        f"nan_policy must be 'error' or 'skip', got {c.nan_policy!r}",
    )
    rule(
        "val_set_size",
        lambda: c.val_set_size >= 0,
        f"val_set_size must be >= 0 (a fraction below 1 or a number of pairs), got {c.val_set_size}",
    )
    rule(
        "is_encoder_decoder",
        lambda: not c.is_encoder_decoder,
        "is_encoder_decoder=True: orpo trains decoder-only causal language models (the paper's setting); "
        "encoder-decoder models such as T5 are not supported",
    )
    chunk = c.logprob_chunk_size
    rule(
        "logprob_chunk_size",
        lambda: chunk is None or chunk >= 1,
        f"logprob_chunk_size must be >= 1, got {chunk}",
    )
    return problems


_parser_metadata(ORPOConfig)
ORPOConfig.__init__ = _reading_legacy_names(ORPOConfig.__init__)
