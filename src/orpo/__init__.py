"""ORPO — Odds Ratio Preference Optimization (Hong, Lee, Thorne 2024) on the Hugging Face stack.

Where things live (each module imports only from rows above it or its own room):

- base: ``errors`` (OrpoError / UsageError), ``defaults`` (every default, importing nothing), ``legacy_args``
  (the argument names older transformers and TRL releases had, and what each is now), ``config`` (ORPOConfig),
  ``guards`` (the launch guard, the non-finite loss policy, stop signals, the clean exit);
- math: ``loss`` (the ORPO objective from per-token log-probs), ``logprobs`` (the chunked / fused LM head);
- model: ``hub`` (one reachability probe before the first hub name), ``models`` (load, tokenizer, PEFT, dropout),
  ``chat_format`` (TRL's setup_chat_format / clone_chat_template), ``head`` (the head run outside the model), ``layouts``
  (batch layouts, their masks and the proof that a model keeps them exact);
- data: ``data`` (``load_pairs``: sources -> formats -> tokenize), ``data.collator``, ``data.batching``;
- training: ``trainer`` (ORPOTrainer: Trainer overrides only), ``checkpoints``, ``generation``, ``model_card``
  (the README.md beside every saved model);
- command line: ``cli`` (one module per command, ``run_config``, ``axolotl``), ``quickstart`` (the tiny demo),
  ``exercise`` (SmolLM2 learns one-sentence answers; the rule in ``one_sentence``), ``plot``, ``demo``.

``trainer.train()`` -> ``ORPOTrainer.compute_loss`` -> ``HeadRunner`` (body, then the head at the scored
positions) -> ``orpo_loss``.
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
    "setup_chat_format": "orpo.chat_format",
    "log1mexp": "orpo.loss",
    "orpo_loss": "orpo.loss",
}
__all__ = [
    "ORPOConfig",
    "ORPOTrainer",
    "OrpoError",
    "clone_chat_template",
    "log1mexp",
    "orpo_loss",
    "setup_chat_format",
]

if TYPE_CHECKING:
    from orpo.chat_format import clone_chat_template, setup_chat_format
    from orpo.config import ORPOConfig
    from orpo.errors import OrpoError
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
