import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from orpo.logprobs import chunked_target_logprobs, full_target_logprobs


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
