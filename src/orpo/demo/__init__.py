"""The embedded demo: a tiny Llama-family config, a byte-level tokenizer with a chat template, and
shipped preference data. Nothing here is downloaded; the model is built from the config with a
fixed seed."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from orpo.errors import OrpoError

DEMO_DIR = Path(str(resources.files("orpo.demo")))
TOKENIZER_DIR = DEMO_DIR / "tokenizer"
MODEL_CONFIG = DEMO_DIR / "model_config.json"


def demo_tokenizer():
    """The shipped byte-level tokenizer (259 ids, ChatML template, eos ``<|im_end|>``)."""
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def tiny_model(seed: int = 0, **overrides):
    """A freshly initialised causal LM from the shipped config (``overrides`` change config fields)."""
    values = json.loads(MODEL_CONFIG.read_text())
    values.update(overrides)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def demo_data_path(split: str) -> Path:
    """Path of the shipped JSONL preference data: ``split`` is ``"train"`` or ``"test"``."""
    if split not in ("train", "test"):
        raise OrpoError(f"demo:{split}: the demo data has splits 'train' and 'test' (demo:train, demo:test)")
    return DEMO_DIR / f"{split}.jsonl"


def load_demo_dataset(split: str = "train"):
    """The shipped preference data as a ``datasets.Dataset`` of prompt / chosen / rejected strings."""
    from datasets import Dataset

    with demo_data_path(split).open(encoding="utf-8") as f:
        return Dataset.from_list([json.loads(line) for line in f])
