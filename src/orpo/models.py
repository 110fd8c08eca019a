"""Loading causal LMs and tokenizers by name or path, with user-facing errors, and the model
adjustments the trainer makes before training (dropout off)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from orpo.config import bf16_supported
from orpo.errors import OrpoError


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


def load_causal_lm(name_or_path: str, init_kwargs: dict | None = None) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with dtype names resolved and ``load_in_4bit`` /
    ``load_in_8bit`` turned into a bitsandbytes quantization config; ``trust_remote_code`` stays off
    unless the caller passes it."""
    kwargs = dict(init_kwargs or {})
    for key in ("dtype", "torch_dtype"):
        if key in kwargs:
            kwargs["dtype"] = _dtype_from_name(kwargs.pop(key))
    quantization = quantization_config(kwargs)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    kwargs.setdefault("trust_remote_code", False)
    check_adapter_base(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        reason = str(err)
        if "Unrecognized configuration class" in reason:  # transformers then lists every causal LM config
            reason = reason.split("\n")[0].split(" for this kind")[0] + " is not a causal language model"
        raise OrpoError(f"could not load a causal LM from '{name_or_path}': {reason}") from err


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with a user-facing error when it cannot be loaded."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise OrpoError(f"could not load a tokenizer from '{name_or_path}': {err}") from err


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
