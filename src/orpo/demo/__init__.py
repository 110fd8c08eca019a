"""The demos and their assets: the embedded tiny model's config (``model_config.json``), its byte-level tokenizer
(``tokenizer/``) and the shipped preference data (``*.jsonl``, ``smollm2/``), and the two demos that use them,
``orpo quickstart`` (:mod:`.quickstart`: the tiny model learns to reverse words) and its ``--model smollm2``
exercise (:mod:`.exercise`: SmolLM2-135M-Instruct learns one-sentence answers, the rule in
:mod:`.one_sentence`), with the helpers they share (:mod:`.common`).

The names ``demo`` / ``smollm2`` (models) and ``demo:NAME`` (data) resolve where every other name does, in
:mod:`orpo.models` and :mod:`orpo.data.sources`, which find these files by path; the loaders are repeated here
for scripts and notebooks (``from orpo.demo import tiny_model, demo_tokenizer, load_demo_dataset``)."""

from orpo.data.sources import DEMO_DATA, demo_data_path, load_demo_dataset
from orpo.defaults import DEMO_DIR
from orpo.models import (
    MODEL_CONFIG,
    SMOLLM2_GGUF,
    TOKENIZER_DIR,
    demo_tokenizer,
    smollm2_folder,
    smollm2_gguf,
    tiny_model,
)

__all__ = [
    "DEMO_DATA",
    "DEMO_DIR",
    "MODEL_CONFIG",
    "SMOLLM2_GGUF",
    "TOKENIZER_DIR",
    "demo_data_path",
    "demo_tokenizer",
    "load_demo_dataset",
    "smollm2_folder",
    "smollm2_gguf",
    "tiny_model",
]
