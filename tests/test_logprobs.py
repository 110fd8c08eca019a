import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from orpo.logprobs import (
    chunk_size_for,
    chunked_target_logprobs,
    full_target_logprobs,
    fused_linear_loss,
    segment_chunks,
)


def inputs(n=7, h=5, v=11, dtype=torch.float64, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=dtype, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, targets


def reference(hidden, weight, bias, targets, softcap=None):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return full_target_logprobs(logits, targets)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_gradcheck_fp64(bias, softcap, chunk_size):
    hidden, weight, b, targets = inputs(bias=bias)

    def fn(h, w, *maybe_bias):
        return chunked_target_logprobs(
            h, w, targets, maybe_bias[0] if maybe_bias else None, chunk_size=chunk_size, softcap=softcap
        )[0]

    args = (hidden, weight) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 4096])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_full_logits_fp32(chunk_size, bias):
    hidden, weight, b, targets = inputs(n=37, h=16, v=301, dtype=torch.float32, bias=bias)
    grad_out = torch.randn(37)
    ours, ours_mean = chunked_target_logprobs(hidden, weight, targets, b, chunk_size=chunk_size)
    params = [hidden, weight] + ([b] if bias else [])
    ours_grads = torch.autograd.grad((ours * grad_out).sum(), params)
    ref, ref_mean = reference(hidden, weight, b, targets)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), params)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(ours_mean, ref_mean, atol=1e-5)
    for a, r in zip(ours_grads, ref_grads, strict=True):
        assert torch.allclose(a, r, atol=1e-5)


def test_bf16_inputs_match_bf16_full_logits():
    hidden, weight, _, targets = inputs(n=16, h=32, v=64, dtype=torch.bfloat16)
    ours, _ = chunked_target_logprobs(hidden, weight, targets, chunk_size=5)
    ref, _ = reference(hidden, weight, None, targets)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=2e-2)
    ours.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_frozen_weight_gets_no_gradient_and_hidden_does():
    hidden, weight, _, targets = inputs(dtype=torch.float32)
    weight = weight.detach()
    ours, _ = chunked_target_logprobs(hidden, weight, targets, chunk_size=2)
    ours.sum().backward()
    assert weight.grad is None and hidden.grad is not None


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tokens_by_vocab_tensor_exists_in_forward_or_backward():
    n, h, v, chunk = 256, 8, 1000, 16
    hidden, weight, _, targets = inputs(n=n, h=h, v=v, dtype=torch.float32)
    with LargestTensor() as probe:
        logps, _ = chunked_target_logprobs(hidden, weight, targets, chunk_size=chunk)
        logps.sum().backward()
    assert probe.largest <= max(chunk * v, v * h, n * h)  # one chunk of logits, never [n, v]
    with LargestTensor() as full_probe:
        ref, _ = reference(hidden, weight, None, targets)
        ref.sum().backward()
    assert full_probe.largest >= n * v  # the probe does see the full computation's logits


# ---- the fused head + loss ---------------------------------------------------------------------------


def segment_loss(segment_of, weights):
    """A loss that is a sum over segments of a non-linear function of each segment's mean, like ORPO's."""

    def loss_fn(logps, start, end):
        seg = segment_of[start:end] - segment_of[start]
        count = int(seg.max()) + 1
        means = logps.new_zeros(count).index_add_(0, seg, logps) / torch.bincount(seg, minlength=count)
        return -(logps * weights[start:end]).sum() + torch.nn.functional.softplus(-3 * means).sum()

    return loss_fn


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_size", [5, 9, 1000])
def test_fused_loss_equals_loss_of_full_logits(bias, softcap, chunk_size):
    sizes = [3, 5, 2, 4, 5]
    hidden, weight, b, targets = inputs(n=sum(sizes), h=6, v=29, bias=bias)
    segment_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    weights = torch.rand(sum(sizes), dtype=torch.float64)
    loss_fn = segment_loss(segment_of, weights)
    chunks = segment_chunks(sizes, chunk_size)
    params = [hidden, weight] + ([b] if bias else [])

    loss, logps, mean_logits = fused_linear_loss(
        hidden, weight, targets, b, chunks=chunks, loss_fn=loss_fn, softcap=softcap
    )
    grads = torch.autograd.grad(loss * 2.5, params)  # the incoming gradient scales every gradient
    ref_logps, ref_mean = reference(hidden, weight, b, targets, softcap)
    ref_loss = loss_fn(ref_logps, 0, sum(sizes))
    ref_grads = torch.autograd.grad(ref_loss * 2.5, params)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert torch.allclose(logps, ref_logps.detach()) and torch.allclose(mean_logits, ref_mean)
    for a, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, r, atol=1e-10)


def test_fused_loss_bf16_within_bf16_tolerance_and_frozen_weight():
    sizes = [4, 6, 6]
    hidden, weight, _, targets = inputs(n=16, h=32, v=64, dtype=torch.bfloat16)
    weight = weight.detach()
    segment_of = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    loss_fn = segment_loss(segment_of, torch.ones(16))
    loss, _, _ = fused_linear_loss(hidden, weight, targets, chunks=segment_chunks(sizes, 10), loss_fn=loss_fn)
    (grad,) = torch.autograd.grad(loss, [hidden])
    ref_logps, _ = reference(hidden.float(), weight.float(), None, targets)
    ref_loss = loss_fn(ref_logps, 0, 16)
    (ref_grad,) = torch.autograd.grad(ref_loss, [hidden])
    assert grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    assert (grad.float() - ref_grad.float()).abs().max() <= 2e-2 * ref_grad.abs().max()  # bf16 rounding


def test_fused_loss_holds_one_chunk_of_logits_at_a_time():
    sizes = [8] * 32
    hidden, weight, _, targets = inputs(n=256, h=8, v=1000, dtype=torch.float32)
    segment_of = torch.repeat_interleave(torch.arange(32), torch.tensor(sizes))
    loss_fn = segment_loss(segment_of, torch.ones(256))
    with LargestTensor() as probe:
        loss, _, _ = fused_linear_loss(
            hidden, weight, targets, chunks=segment_chunks(sizes, 16), loss_fn=loss_fn
        )
        loss.backward()
    assert probe.largest <= max(16 * 1000, 1000 * 8, 256 * 8)


def test_segment_chunks_groups_whole_segments():
    assert segment_chunks([3, 5, 2, 4, 5], 9) == [(0, 8), (8, 14), (14, 19)]
    assert segment_chunks([3, 5], 100) == [(0, 8)]
    assert segment_chunks([3, 10, 2], 9) is None  # a segment that cannot fit: the caller falls back
    assert segment_chunks([], 4) == []
    # an oversized segment may take a chunk of its own, up to max_chunk_size
    assert segment_chunks([3, 10, 2, 2], 9, max_chunk_size=12) == [(0, 3), (3, 13), (13, 17)]
    assert segment_chunks([3, 13], 9, max_chunk_size=12) is None


def test_chunk_size_follows_the_vocabulary():
    assert chunk_size_for(128_256, budget_mib=256) == 523  # 523 x 128,256 fp32 logits ~ 256 MiB
    assert chunk_size_for(32_000, budget_mib=256) == 2097
    assert chunk_size_for(10**9, budget_mib=1) == 1
