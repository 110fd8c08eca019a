"""Log-probs of target tokens straight from hidden states and the LM-head weight, in token chunks.

A causal LM's head turns ``hidden [N, H]`` into ``logits [N, V]``; with modern vocabularies
(V = 128k–256k) that fp32 tensor, and its gradient, dominate training memory. We only need one
number per scored token, ``log softmax(logits)[target]``, so :func:`chunked_target_logprobs`
computes it ``chunk_size`` tokens at a time and its backward recomputes each chunk's logits
(``dlogits = g · (onehot − softmax)``): peak extra memory is ``O(chunk_size × V)`` in forward and
backward, and the result is exact (the same math as the full computation, not an approximation).

This module knows nothing of ORPO, pairs or batch layouts.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 2048


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of one chunk in fp32 (fp64 for fp64 inputs); also ``tanh(z / cap)`` when
    soft-capping, for the backward."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden @ weight.T).to(dtype)
    if bias is not None:
        logits = logits + bias.to(dtype)
    if softcap is None:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


class _ChunkedTargetLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap):
        n = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logps = torch.empty(n, dtype=dtype, device=hidden.device)
        mean_logits = torch.empty(n, dtype=dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits, _ = _chunk_logits(hidden[start:end], weight, bias, softcap)
            target_logits = logits.gather(1, targets[start:end, None]).squeeze(1)
            logps[start:end] = target_logits - torch.logsumexp(logits, dim=-1)
            mean_logits[start:end] = logits.mean(dim=-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size = chunk_size
        ctx.softcap = softcap
        ctx.mark_non_differentiable(mean_logits)
        return logps, mean_logits

    @staticmethod
    def backward(ctx, grad_logps, _grad_mean_logits):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # Accumulate the head's gradient in fp32 over chunks; cast once at the end.
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=dtype) if need_bias else None
        grad_logps = grad_logps.to(dtype)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:end]
            g = grad_logps[start:end]
            logits, capped = _chunk_logits(h, weight, bias, ctx.softcap)
            # d logp_target / d logits = onehot(target) - softmax(logits); softmax in place, to hold
            # one [chunk, V] buffer rather than two.
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            grad_logits = logits.sub_(lse).exp_().mul_(-g[:, None])
            grad_logits.scatter_add_(1, targets[start:end, None], g[:, None])
            if capped is not None:  # d (cap·tanh(z/cap)) / dz = 1 - tanh²
                grad_logits.mul_(1.0 - capped * capped)
            if need_hidden:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.add_(grad_logits.T @ h.to(dtype))
            if need_bias:
                grad_bias.add_(grad_logits.sum(0))
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def chunked_target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(hidden @ weight.T + bias)[i, targets[i]]`` without materialising ``[N, V]``.

    Args:
        hidden: ``[N, H]`` final hidden states at the positions that predict ``targets``.
        weight: ``[V, H]`` LM-head weight (tied or not; any float dtype, the matmul runs in it).
        targets: ``[N]`` long target token ids.
        bias: optional ``[V]`` LM-head bias.
        chunk_size: tokens per chunk; peak extra memory is about ``3 × chunk_size × V × 4`` bytes.
        softcap: Gemma-2-style final logit soft-capping ``cap · tanh(z / cap)``, or None.

    Returns:
        ``(logps [N], mean_logits [N])`` in fp32 (fp64 for fp64 inputs); the mean logit over the vocabulary (for the
        ``logits/*`` metrics) carries no gradient.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedTargetLogProbs.apply(hidden, weight, bias, targets.long(), chunk_size, softcap)


def full_target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference computation from materialised ``logits [N, V]``: same outputs as
    :func:`chunked_target_logprobs`. Used for models whose head cannot be separated."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logps = logits.log_softmax(-1).gather(1, targets.long()[:, None]).squeeze(1)
    return logps, logits.detach().mean(-1)
