"""ORPO — Odds Ratio Preference Optimization (Hong, Lee, Thorne 2024) on the Hugging Face stack."""

__version__ = "0.1.0"  # first: submodules read it while the package initialises

from orpo.config import ORPOConfig  # noqa: E402
from orpo.errors import OrpoError  # noqa: E402
from orpo.loss import log1mexp, orpo_loss  # noqa: E402
from orpo.trainer import ORPOTrainer  # noqa: E402

__all__ = ["ORPOConfig", "ORPOTrainer", "OrpoError", "log1mexp", "orpo_loss"]
