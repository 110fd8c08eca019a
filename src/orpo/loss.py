"""The ORPO objective as pure tensor math: per-token log-probs in, loss and statistics out.

ORPO: Monolithic Preference Optimization without Reference Model (Hong, Lee, Thorne 2024),
https://arxiv.org/abs/2403.07691

    "a minor penalty for the disfavored generation style is sufficient for
     preference-aligned supervised fine-tuning."

For a pair (x, y_w, y_l)::

    l(y)     = mean_t log P(y_t | x, y_<t)                 (length-normalised, response tokens)
    log odds = l - log(1 - exp(l))                          (log1mexp, computed stably)
    log OR   = log odds(y_w) - log odds(y_l)
    L_OR     = -log sigmoid(beta * log OR)
    L        = NLL(chosen tokens) + alpha * mean_pairs(L_OR)

Nothing here knows about models, chunks or batch layouts: the caller hands in one flat vector of
log-probs of the scored tokens and says, for each token, which pair it belongs to, whether it is
part of the chosen or the rejected sequence and whether it is a response token — as tensors
(:func:`orpo_loss`), or as the typed :class:`~orpo.scored.ScoredTokens` a collator built
(:class:`PairLoss`, which also gives the loss of a range of whole pairs, for a head that computes the
loss chunk by chunk).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orpo import defaults
from orpo.errors import OrpoError
from orpo.scored import ScoredTokens

# ℓ is clamped to at most this before log1mexp: a response whose every token has p ≈ 1 (common in
# bf16) would otherwise give log(1 - 1) = -inf and a NaN gradient.
MAX_MEAN_LOGP = -1e-6
_LOG_HALF = -math.log(2.0)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a <= 0``, accurate everywhere (Mächler 2012).

    ``log(-expm1(a))`` is exact near 0, ``log1p(-exp(a))`` is exact for very negative ``a``; the
    switch at ``-ln 2`` keeps both in their accurate range. Never ``log(1 - exp(a))``, which
    rounds ``1 - exp(a)`` to 0 for ``a`` close to 0.
    """
    # Evaluate each branch only where it is accurate (and finite), so neither the value nor the
    # gradient of the unused branch can poison the result through torch.where.
    near_zero = a > _LOG_HALF
    a_near = torch.where(near_zero, a, torch.full_like(a, _LOG_HALF))
    a_far = torch.where(near_zero, torch.full_like(a, _LOG_HALF), a)
    return torch.where(near_zero, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` with ``p = exp(mean_logps)``; ``mean_logps`` is clamped to ``<= -1e-6``."""
    clamped = mean_logps.clamp(max=MAX_MEAN_LOGP)
    return clamped - log1mexp(clamped)


@dataclass
class ORPOStats:
    """What one call of :func:`orpo_loss` measured; every tensor is fp32.

    Per pair (shape ``[P]``): ``chosen_logps`` / ``rejected_logps`` (mean response log-prob ℓ),
    ``log_odds_ratio`` (log OR, before the temperature), ``or_losses`` (``-log σ(β log OR)``).
    ``nll_sum`` is the summed NLL of the NLL tokens, ``nll_tokens`` their count.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    log_odds_ratio: torch.Tensor
    or_losses: torch.Tensor
    nll_sum: torch.Tensor
    nll_tokens: torch.Tensor
    alpha: float

    def metric_sums(self) -> dict[str, torch.Tensor]:
        """Detached sums, so callers can add them over micro-batches and processes before
        dividing: every key but ``nll_loss`` is divided by ``pairs``, ``nll_loss`` by ``nll_tokens``."""
        # Rewards are α·ℓ (TRL's); an SFT-only run (α = 0) reports them at α = 1, i.e. ℓ itself, so its margins
        # and accuracies describe the same ranking instead of a flat 0 beside a rising accuracy.
        scale = self.alpha if self.alpha > 0 else 1.0
        chosen_rewards = scale * self.chosen_logps.detach()
        rejected_rewards = scale * self.rejected_logps.detach()
        log_or = self.log_odds_ratio.detach()
        return {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            # Compared on ℓ rather than α·ℓ: the same for α > 0, and still meaningful at α = 0 (SFT only).
            "rewards/accuracies": (self.chosen_logps.detach() > self.rejected_logps.detach()).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": self.chosen_logps.detach().sum(),
            "logps/rejected": self.rejected_logps.detach().sum(),
            "nll_loss": self.nll_sum.detach(),
            "log_odds_ratio": F.logsigmoid(log_or).sum(),
            "log_odds_chosen": log_or.sum(),
            "pairs": torch.tensor(float(log_or.numel()), device=log_or.device),
            "nll_tokens": self.nll_tokens.detach().float(),
        }

    def metrics(self) -> dict[str, float]:
        """Means under TRL's metric names (``rewards/accuracies``, ``nll_loss``, ...)."""
        return means_from_sums(self.metric_sums())


# The count each metric sum is divided by, where it is not the number of pairs.
PER_TOKEN = {"nll_loss": "nll_tokens"}


def means_from_sums(sums: dict[str, torch.Tensor], per: dict[str, str] | None = None) -> dict[str, float]:
    """Turn accumulated :meth:`ORPOStats.metric_sums` into means: each sum divided by the count ``per`` names
    for it (``nll_loss`` by ``nll_tokens``; callers add their own, e.g. a per-token metric), else by
    ``pairs``. The counts themselves are not means and are left out."""
    per = {**PER_TOKEN, **(per or {})}
    counts = {"pairs", *per.values()}
    pairs = max(float(sums["pairs"]), 1.0)
    return {
        name: float(value) / (max(float(sums[per[name]]), 1.0) if name in per else pairs)
        for name, value in sums.items()
        if name not in counts
    }


def sequence_mean_logps(
    token_logps: torch.Tensor, pair_index: torch.Tensor, num_pairs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``token_logps [N]`` per pair index (``[N]`` in ``0..num_pairs-1``).

    Returns ``(means [P], counts [P])``. Raises :class:`OrpoError` if a pair has no token:
    a response with nothing to score has no defined probability (TRL #1473 was exactly this 0/0).
    """
    sums = token_logps.new_zeros(num_pairs).index_add_(0, pair_index, token_logps)
    counts = torch.bincount(pair_index, minlength=num_pairs)[:num_pairs]
    if num_pairs and bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise OrpoError(
            f"pairs {empty} of this batch have a response with no scored token (it was truncated "
            "away or is empty); the data pipeline should have dropped such rows"
        )
    return sums / counts, counts


def orpo_loss(
    token_logps: torch.Tensor,
    pair_index: torch.Tensor,
    is_chosen: torch.Tensor,
    is_response: torch.Tensor,
    num_pairs: int | None = None,
    *,
    alpha: float = defaults.ALPHA,
    beta: float = defaults.BETA,
    nll_normalizer: torch.Tensor | float | None = None,
    pair_normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, ORPOStats]:
    """ORPO loss from the log-probs of the scored tokens.

    Args:
        token_logps: ``[N]`` log P(target | context) of every scored token, any float dtype
            (computed in fp32 here).
        pair_index: ``[N]`` long, the pair (row of preference data) each token belongs to,
            ``0 <= pair_index < num_pairs``.
        is_chosen: ``[N]`` bool, True for tokens of the chosen sequence, False for rejected.
        is_response: ``[N]`` bool, True for response tokens. Only response tokens enter ℓ (and
            so the odds ratio). The NLL term scores *every chosen token passed in*: pass chosen
            prompt tokens (``is_response=False``) to score the prompt too, as TRL's trainer and
            the paper's reference code do (``nll_include_prompt=True``); omit them for the
            paper's equation. Rejected prompt tokens, if passed, are ignored.
        num_pairs: number of pairs P; default ``pair_index.max() + 1``.
        alpha: weight λ of the odds-ratio term (paper: 0.1–0.25 for 2.7B–7B models; 0 = SFT only).
        beta: temperature on log OR inside the sigmoid; 1.0 is the paper's loss.
        nll_normalizer: divide the summed NLL by this (default: the NLL token count here). Pass the
            token count of the whole optimizer step so gradient accumulation and data parallelism
            give the objective of one big batch.
        pair_normalizer: likewise for the summed odds-ratio losses (default: P).

    Returns:
        ``(loss, stats)``: the scalar fp32 loss and an :class:`ORPOStats`.
    """
    token_logps = token_logps.float()
    if num_pairs is None:
        num_pairs = int(pair_index.max()) + 1 if pair_index.numel() else 0
    is_chosen = is_chosen.bool()
    is_response = is_response.bool()

    nll_tokens = is_chosen.sum()
    nll_sum = -(token_logps * is_chosen).sum()

    def response_means(selected: torch.Tensor) -> torch.Tensor:
        means, _ = sequence_mean_logps(token_logps[selected], pair_index[selected], num_pairs)
        return means

    chosen_logps = response_means(is_chosen & is_response)
    rejected_logps = response_means(~is_chosen & is_response)
    log_or = log_odds(chosen_logps) - log_odds(rejected_logps)
    or_losses = -F.logsigmoid(beta * log_or)

    if nll_normalizer is None:
        nll_normalizer = nll_tokens.clamp(min=1)
    if pair_normalizer is None:
        pair_normalizer = max(num_pairs, 1)
    loss = nll_sum / nll_normalizer + alpha * or_losses.sum() / pair_normalizer
    stats = ORPOStats(chosen_logps, rejected_logps, log_or, or_losses, nll_sum, nll_tokens, alpha)
    return loss, stats


@dataclass(frozen=True)
class PairLoss:
    """:func:`orpo_loss` with its settings bound, on the typed scored tokens of a batch.

    ``nll_normalizer`` / ``pair_normalizer`` are the counts the summed NLL and odds-ratio losses are divided
    by: the whole optimizer step's in training (so accumulation and data parallelism never change the
    objective), the batch's own by default (:meth:`for_batch`).
    """

    alpha: float
    beta: float
    nll_normalizer: torch.Tensor | float
    pair_normalizer: torch.Tensor | float

    @classmethod
    def for_batch(
        cls, scored: ScoredTokens, alpha: float, beta: float, step_nll_tokens=None, step_pairs=None
    ) -> PairLoss:
        """Normalised by the step's counts when given, else by this batch's."""
        return cls(
            alpha,
            beta,
            scored.chosen.sum().clamp(min=1) if step_nll_tokens is None else step_nll_tokens,
            max(scored.num_pairs, 1) if step_pairs is None else step_pairs,
        )

    def __call__(self, token_logps: torch.Tensor, scored: ScoredTokens) -> tuple[torch.Tensor, ORPOStats]:
        """``(loss, stats)`` of the scored tokens from their log-probs ``[N]``."""
        return orpo_loss(
            token_logps,
            scored.pair,
            scored.chosen,
            scored.response,
            scored.num_pairs,
            alpha=self.alpha,
            beta=self.beta,
            nll_normalizer=self.nll_normalizer,
            pair_normalizer=self.pair_normalizer,
        )

    def chunk_loss(self, scored: ScoredTokens) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
        """``loss_fn(logps, start, end)``: the loss of scored tokens ``start:end``, a range of whole pairs
        (``logps`` are theirs), under this batch's normalisers, so the chunks' losses add up to the batch's
        (:func:`orpo.logprobs.fused_linear_loss`)."""
        pair_at = {}  # first token of each pair (and the end) -> that pair's index
        offset = 0
        for index, size in enumerate(scored.pair_sizes):
            pair_at[offset] = index
            offset += size
        pair_at[offset] = scored.num_pairs

        def loss_fn(token_logps: torch.Tensor, start: int, end: int) -> torch.Tensor:
            return self(token_logps, scored.of_pairs(pair_at[start], pair_at[end], start, end))[0]

        return loss_fn
