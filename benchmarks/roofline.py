"""How close a training step comes to the machine's matmul ceiling (issue 29), measured in the same process.

The step's matmul FLOPs are counted from what orpo actually ran: every linear layer of the body over the
tokens the batch layout laid out (padding included: those matmuls run), and the LM head over the scored
tokens only (orpo's head sees nothing else), forward and both backward products (6 FLOPs per weight and
token). Attention's score and value products are left out: they are not GEMMs with weights, and the ceiling
below has no kernel for them. The ceiling is a GEMM micro-benchmark of exactly those shapes, in the dtype the
step's matmuls ran in (bf16 under bf16 autocast, else the weights'), on random tensors, best of a few runs.

    fraction = (step matmul FLOPs / step seconds) / (the same FLOPs / their bare GEMM seconds)
             = bare GEMM seconds / step seconds

so 100% would be a step that does nothing but its matmuls at the speed the same GEMMs reach alone.
"""

from __future__ import annotations

import time

import torch


def step_shapes(trainer) -> tuple[list[tuple[int, int]], tuple[int, int] | None, torch.nn.Module]:
    """``(body linears' (in, out), the head's (hidden, vocab), the head module)`` of the trainer's model."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    head = model.get_output_embeddings()
    body = [
        (m.in_features, m.out_features)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    ]
    return body, (head.weight.shape[1], head.weight.shape[0]) if head is not None else None, head


def laid_out_tokens(trainer) -> tuple[int, int, int]:
    """``(laid-out tokens, scored tokens, batches)`` over one pass of the trainer's training batches (the
    same collator and sampler as the timed run; counted, not timed)."""
    laid = scored = batches = 0
    for batch in trainer.get_train_dataloader():
        laid += batch["input_ids"].numel()
        scored += batch["score_positions"].numel()
        batches += 1
    return laid, scored, batches


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_seconds(shapes: list[tuple[int, int, int]], dtype: torch.dtype, repeats: int = 3) -> float:
    """Best time of the forward and both backward GEMMs of every ``(tokens, in, out)`` in ``shapes``."""
    generator = torch.Generator().manual_seed(0)
    operands = [
        (
            torch.randn(tokens, d_in, generator=generator).to(dtype),
            torch.randn(d_out, d_in, generator=generator).mul_(0.02).to(dtype),
            torch.randn(tokens, d_out, generator=generator).to(dtype),
        )
        for tokens, d_in, d_out in shapes
    ]

    def run():
        for x, w, dy in operands:
            x @ w.T  # forward
            dy @ w  # gradient of the input
            dy.T @ x  # gradient of the weight

    return _best_seconds(run, repeats)


def matmul_roofline(trainer, step_seconds: float) -> dict:
    """An optimizer step of ``step_seconds``: its matmul FLOP/s against the bare GEMMs of the same shapes and
    dtype (see the module)."""
    body, head_shape, _ = step_shapes(trainer)
    laid, scored, batches = laid_out_tokens(trainer)
    per_step = trainer.args.gradient_accumulation_steps  # batches per optimizer step
    mean_laid, mean_scored = laid / batches * per_step, scored / batches * per_step
    dtype = torch.bfloat16 if trainer.args.bf16 else next(trainer.model.parameters()).dtype
    shapes = [(round(mean_laid), d_in, d_out) for d_in, d_out in body]
    if head_shape is not None:
        shapes.append((round(mean_scored), *head_shape))
    flops = sum(6 * tokens * d_in * d_out for tokens, d_in, d_out in shapes)
    ceiling = gemm_seconds(shapes, dtype)
    step = step_seconds
    return {
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "laid_out_tokens_per_step": mean_laid,
        "scored_tokens_per_step": mean_scored,
        "step_matmul_gflop": flops / 1e9,
        "step_seconds": step,
        "achieved_matmul_gflops": flops / step / 1e9,
        "ceiling_gflops": flops / ceiling / 1e9,
        "ceiling_fraction": ceiling / step,
    }
