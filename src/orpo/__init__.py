"""ORPO — Odds Ratio Preference Optimization (Hong, Lee, Thorne 2024) on the Hugging Face stack.

Where things live, room by room; a module imports only from the rooms above it or its own room (no circles:
tests/test_import_map.py reads this list and checks every import of the package against it):

- base: ``errors`` (OrpoError, UsageError, ConfigError), ``defaults`` (every default, importing nothing of
  orpo's), ``legacy_args`` (the argument names older transformers and TRL releases had, and what each is now),
  ``private_api`` (the private transformers names orpo relies on), ``guards`` (the launch guard, a step's
  health: non-finite losses, divergence; stop signals, the clean exit), ``config`` (ORPOConfig, and the one
  checker of its values);
- math: ``scored`` (the typed batch of scored tokens a collator builds), ``loss`` (the ORPO objective from
  per-token log-probs), ``logprobs`` (the chunked / fused LM head);
- model: ``hub`` (one reachability probe before the first hub name), ``models`` (load a model and tokenizer by
  hub name, folder, GGUF file or the names demo / smollm2; PEFT), ``chat_format`` (TRL's setup_chat_format /
  clone_chat_template), ``layouts`` (what a batch layout is: segments, support, masks, model inputs),
  ``layout_proof`` (proving a layout exact on the model; the first-batch checks), ``head`` (the head run
  outside the model);
- data: ``data`` (``load_pairs``: sources -> formats -> tokenize; the collators, token-budget batching);
- training: ``cpu_heap`` (malloc's heap kept warm while a run trains on the CPU), ``checkpoints`` (atomic checkpoints), ``run_folder`` (the output folder's one owner: lock, the
  earlier-run rule, settings file, resume check), ``generation``, ``model_card`` (the README.md beside every
  saved model), ``plot``, ``trainer`` (ORPOTrainer: Trainer overrides only);
- export: ``export`` (a saved model as one GGUF file for llama.cpp, Ollama and LM Studio: ``export_gguf``; knows
  nothing of training);
- demos: ``demo`` (the shipped tiny model, tokenizer and data; ``orpo quickstart`` and its SmolLM2 exercise with
  their shared helpers);
- command line: ``cli`` (one module per command, ``run_config``, ``axolotl``), ``__main__``.

``trainer.train()`` -> ``ORPOTrainer.compute_loss`` -> ``HeadRunner`` (body, then the head at the scored
positions of the batch's ``ScoredTokens``) -> ``PairLoss`` (``orpo_loss``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"  # first: submodules read it while the package initialises

# The public names load on first use (PEP 562): ``ORPOTrainer`` pulls in transformers, peft and
# torch (seconds), which ``orpo --help``, ``--version`` or a mistyped command line never need.
_EXPORTS = {
    "ORPOConfig": "orpo.config",
    "ORPOTrainer": "orpo.trainer",
    "OrpoError": "orpo.errors",
    "clone_chat_template": "orpo.chat_format",
    "export_gguf": "orpo.export",
    "setup_chat_format": "orpo.chat_format",
    "log1mexp": "orpo.loss",
    "orpo_loss": "orpo.loss",
}
__all__ = [
    "ORPOConfig",
    "ORPOTrainer",
    "OrpoError",
    "clone_chat_template",
    "export_gguf",
    "log1mexp",
    "orpo_loss",
    "setup_chat_format",
]

if TYPE_CHECKING:
    from orpo.chat_format import clone_chat_template, setup_chat_format
    from orpo.config import ORPOConfig
    from orpo.errors import OrpoError
    from orpo.export import export_gguf
    from orpo.loss import log1mexp, orpo_loss
    from orpo.trainer import ORPOTrainer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
