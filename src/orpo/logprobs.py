"""Log-probs of target tokens straight from hidden states and the LM-head weight, in token chunks.

A causal LM's head turns ``hidden [N, H]`` into ``logits [N, V]``; with modern vocabularies
(V = 128k–256k) that fp32 tensor, and its gradient, dominate training memory. We only need one
number per scored token, ``log softmax(logits)[target]``, so :func:`chunked_target_logprobs`
computes it ``chunk_size`` tokens at a time and its backward recomputes each chunk's logits
(``dlogits = g · (onehot − softmax)``): peak extra memory is ``O(chunk_size × V)`` in forward and
backward, and the result is exact (the same math as the full computation, not an approximation).

When the loss is a sum over segments of tokens (ORPO: over pairs, given the step's normalisers)
and whole segments fit in a chunk, :func:`fused_linear_loss` goes further: it evaluates the loss
on each chunk while its logits are live and computes the gradients right there, so the logits are
never recomputed: three ``[chunk, H] × [H, V]`` matmuls per chunk instead of four.

This module knows nothing of ORPO, pairs or batch layouts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from orpo.defaults import CHUNK_MIB as DEFAULT_CHUNK_MIB  # one chunk's fp32 logits block


def chunk_size_for(vocab_size: int, budget_mib: float = DEFAULT_CHUNK_MIB) -> int:
    """Tokens per chunk so that one chunk's fp32 ``[chunk, V]`` logits take about ``budget_mib``
    (peak head memory is about twice that: the logits and one temporary of the same size)."""
    return max(1, int(budget_mib * 2**20 // (4 * vocab_size)))


def segment_chunks(
    segment_sizes: Sequence[int], chunk_size: int, max_chunk_size: int | None = None
) -> list[tuple[int, int]] | None:
    """Group consecutive segments (token counts) into ``(start, end)`` token ranges of at most
    ``chunk_size`` tokens, never splitting a segment. A segment larger than ``chunk_size`` gets a
    chunk of its own if it has at most ``max_chunk_size`` tokens (default: ``chunk_size``);
    returns None if one is larger still."""
    limit = max(chunk_size, max_chunk_size or chunk_size)
    chunks, start, end = [], 0, 0
    for size in segment_sizes:
        if size > limit:
            return None
        if end > start and end + size - start > chunk_size:
            chunks.append((start, end))
            start = end
        end += size
    if end > start:
        chunks.append((start, end))
    return chunks


def rounding_tolerance(low_precision: bool, logit_scale: float = 0.0) -> float:
    """How far two exact computations of the same log-probs may differ by rounding alone (max |Δ log p|):
    a batch layout against the sequences alone, or the separated LM head against the model's own logits.
    In bf16 a logit is rounded to 2^-8 of its size, so logits as large as ``logit_scale`` (max |logit|: ~25
    for SmolLM2) move log-probs by a few hundredths on their own. Any real difference (a leaking mask, an
    unknown logit transform such as a scale or a soft cap) is far larger."""
    return max(5e-2, 4 * 2.0**-8 * logit_scale) if low_precision else 1e-4


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


def _logsumexp_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lse [n], exps, sums [n, 1])`` with ``exps = exp(logits - max)`` written over ``logits``: one
    ``[chunk, V]`` buffer instead of the two ``torch.logsumexp`` needs; ``exps / sums`` is the softmax."""
    peak = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(peak).exp_()
    sums = exps.sum(dim=-1, keepdim=True)
    return (peak + sums.log()).squeeze(1), exps, sums


def _mean_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Mean logit over the vocabulary per token (for the ``logits/*`` metrics). Logits are linear in
    the weight, so this is ``hidden @ mean(weight)``: no pass over ``[N, V]``. (Soft-capped logits
    are not linear; their mean is taken chunk by chunk instead.)"""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    with torch.no_grad():
        mean = hidden.to(dtype) @ weight.to(dtype).mean(0)
        return mean + bias.to(dtype).mean() if bias is not None else mean


def _in_compute_dtype(weight, hidden, compute_dtype):
    """The head's weight and hidden states in the matmuls' dtype (cast once, outside the chunk loop)."""
    if compute_dtype is None or compute_dtype == weight.dtype:
        return weight, hidden.to(weight.dtype)
    return weight.detach().to(compute_dtype), hidden.to(compute_dtype)


def _backprop_chunk(grad_logits, g, targets, capped, h, weight, start, grads) -> None:
    """Finish ``grad_logits`` (given as ``-g · softmax``: add ``g`` at the targets, the soft-cap
    factor) and push it into the hidden-state rows ``start:`` and the head's gradient accumulators
    (``grads = (grad_hidden, grad_weight, grad_bias)``, any of which may be None)."""
    grad_hidden, grad_weight, grad_bias = grads
    grad_logits.scatter_add_(1, targets[:, None], g[:, None])
    if capped is not None:  # d (cap·tanh(z/cap)) / dz = 1 - tanh²
        grad_logits.mul_(1.0 - capped * capped)
    # Both matmuls in the head's dtype, as the model's own head backward would run: on bf16 hardware
    # that is the tensor cores (an fp32 [V, chunk] @ [chunk, H] is several times slower there).
    low = grad_logits.to(weight.dtype)
    if grad_hidden is not None:
        grad_hidden[start : start + h.shape[0]] = (low @ weight).to(grad_hidden.dtype)
    if grad_weight is not None:
        grad_weight.add_(low.T @ h.to(weight.dtype))
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0))


class _ChunkedTargetLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap, compute_dtype):
        n = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logps = torch.empty(n, dtype=dtype, device=hidden.device)
        # Kept for the backward, so that it needs one exp pass over each chunk's logits, not three.
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        mean_logits = _mean_logits(hidden, weight, bias) if softcap is None else torch.empty_like(lse)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        weight, hidden = _in_compute_dtype(weight, hidden, compute_dtype)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits, _ = _chunk_logits(hidden[start:end], weight, bias, softcap)
            if softcap is not None:
                mean_logits[start:end] = logits.mean(dim=-1)
            target_logits = logits.gather(1, targets[start:end, None]).squeeze(1)
            lse[start:end], _, _ = _logsumexp_(logits)
            logps[start:end] = target_logits - lse[start:end]
            del logits  # free this chunk before the next one is allocated: one chunk alive at a time
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.softcap = softcap
        ctx.mark_non_differentiable(mean_logits)
        return logps, mean_logits

    @staticmethod
    def backward(ctx, grad_logps, _grad_mean_logits):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # Accumulate the head's gradient in fp32 over chunks; cast once at the end.
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=dtype) if need_bias else None
        grad_logps = grad_logps.to(dtype)
        grads = (grad_hidden, grad_weight, grad_bias)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:end]
            g = grad_logps[start:end]
            logits, capped = _chunk_logits(h, weight, bias, ctx.softcap)
            # d logp_target / d logits = onehot(target) - softmax(logits); softmax in place, to hold
            # one [chunk, V] buffer rather than two.
            grad_logits = logits.sub_(lse[start:end, None]).exp_().mul_(-g[:, None])
            _backprop_chunk(grad_logits, g, targets[start:end], capped, h, weight, start, grads)
            del logits, grad_logits, capped  # one chunk alive at a time
        if need_weight:
            grad_weight = grad_weight.to(ctx.dtypes[1])
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        if need_hidden:
            grad_hidden = grad_hidden.to(ctx.dtypes[0])
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def chunked_target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int,
    softcap: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(hidden @ weight.T + bias)[i, targets[i]]`` without materialising ``[N, V]``.

    Args:
        hidden: ``[N, H]`` final hidden states at the positions that predict ``targets``.
        weight: ``[V, H]`` LM-head weight (tied or not; any float dtype, the matmul runs in it).
        targets: ``[N]`` long target token ids.
        bias: optional ``[V]`` LM-head bias.
        chunk_size: tokens per chunk; peak extra memory is about ``3 × chunk_size × V × 4`` bytes.
        softcap: Gemma-2-style final logit soft-capping ``cap · tanh(z / cap)``, or None.
        compute_dtype: the matmuls' dtype (mixed precision: bf16 for fp32 weights), if not the weight's. The
            weight is cast once per call, not per chunk, and its gradient accumulates in fp32 and is returned
            in the weight's own dtype (no round trip through bf16, as autocast's cast of the weight would do).

    Returns:
        ``(logps [N], mean_logits [N])`` in fp32 (fp64 for fp64 inputs); the mean logit over the vocabulary (for the
        ``logits/*`` metrics) carries no gradient.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedTargetLogProbs.apply(
        hidden, weight, bias, targets.long(), chunk_size, softcap, compute_dtype
    )


def full_target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference computation from materialised ``logits [N, V]``: same outputs as
    :func:`chunked_target_logprobs`. Used for models whose head cannot be separated."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logps = logits.log_softmax(-1).gather(1, targets.long()[:, None]).squeeze(1)
    return logps, logits.detach().mean(-1)


ChunkLoss = Callable[[torch.Tensor, int, int], torch.Tensor]
"""``loss_fn(logps, start, end)``: the loss of the scored tokens ``start:end`` (one chunk of whole
segments) from their log-probs; the total loss must be the sum of these."""


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunks, loss_fn, softcap, compute_dtype):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        logps = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=dtype) if need_bias else None
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        grads = (grad_hidden, grad_weight, grad_bias)
        mean_logits = _mean_logits(hidden, weight, bias) if softcap is None else torch.empty_like(logps)
        weight, hidden = _in_compute_dtype(weight, hidden, compute_dtype)
        for start, end in chunks:
            h = hidden[start:end]
            logits, capped = _chunk_logits(h, weight, bias, softcap)
            if softcap is not None:
                mean_logits[start:end] = logits.mean(dim=-1)
            target_logits = logits.gather(1, targets[start:end, None]).squeeze(1)
            lse, exps, sums = _logsumexp_(logits)
            chunk_logps = target_logits - lse
            logps[start:end] = chunk_logps
            with torch.enable_grad():
                leaf = chunk_logps.detach().requires_grad_()
                loss = loss_fn(leaf, start, end)
                (g,) = torch.autograd.grad(loss, leaf)
            total = total + loss.detach()
            # Same gradient as _ChunkedTargetLogProbs.backward, while the logits are still here.
            grad_logits = exps.mul_(-g[:, None] / sums)  # = -g · softmax, in place
            _backprop_chunk(grad_logits, g, targets[start:end], capped, h, weight, start, grads)
            del logits, exps, grad_logits, capped  # one chunk alive at a time
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(logps, mean_logits)
        return total, logps, mean_logits

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps, _grad_mean_logits):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_loss.to(grad_hidden.dtype)).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_loss).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunks: Sequence[tuple[int, int]],
    loss_fn: ChunkLoss,
    softcap: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loss that is a sum over chunks of scored tokens, with the LM head fused in.

    Same inputs as :func:`chunked_target_logprobs`, plus ``chunks`` (``(start, end)`` ranges covering
    ``0..N``, e.g. from :func:`segment_chunks`) and ``loss_fn``. Each chunk's logits are computed
    once; the gradients into ``hidden``, ``weight`` and ``bias`` are computed in the forward pass
    and scaled by the incoming gradient in the backward.

    Returns:
        ``(loss, logps [N], mean_logits [N])``; only ``loss`` carries a gradient.
    """
    return _FusedLinearLoss.apply(
        hidden, weight, bias, targets.long(), list(chunks), loss_fn, softcap, compute_dtype
    )
