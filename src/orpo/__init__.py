"""ORPO — Odds Ratio Preference Optimization (Hong, Lee, Thorne 2024) on the Hugging Face stack."""

from orpo.config import ORPOConfig
from orpo.errors import OrpoError
from orpo.loss import log1mexp, orpo_loss
from orpo.trainer import ORPOTrainer

__all__ = ["ORPOConfig", "ORPOTrainer", "OrpoError", "log1mexp", "orpo_loss"]
__version__ = "0.1.0"
