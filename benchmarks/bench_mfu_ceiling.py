"""The MFU ceiling of a model shape: its matmuls and attention alone, forward and backward.

A training step of a decoder is its linear layers (6N FLOPs per token), attention (12·L·d·T per token
by the usual convention) and everything else: norms, activations, rotary embeddings, casts, the
softmax over the vocabulary, the optimizer. This times only the first two, on random tensors at the
model's shapes (``tokens`` rows per micro-batch, sequences of ``length`` tokens), with the fastest
kernels torch has (cuBLAS; sdpa's flash kernel, causal), and reports the MFU they reach. A whole
training step of the same shape cannot exceed it, so it says how much of the gap between a
trainer's MFU and 100% is the hardware at these shapes and how much is the trainer.

Usage::

    python benchmarks/bench_mfu_ceiling.py --scenario gpu-0.5b [--tokens 16384] [--length 1024]
    python benchmarks/bench_mfu_ceiling.py --scenario micro --json out.json   # CPU, seconds

Peak: 989 TFLOP/s (H100 / H200 bf16 dense); on the CPU no MFU is printed, only the times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import PEAK_BF16_FLOPS, SCENARIOS, scenario_model  # noqa: E402


def scenario_shape(scenario):
    """The scenario model's config and the ``(in, out)`` of every matmul in one forward (each layer's
    q, k, v, o and MLP projections, then the head), read off the model built on the meta device."""
    with torch.device("meta"):
        model = scenario_model(scenario, scenario.vocab_sizes[0])
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return model.config, shapes


def _time(fn, repeats: int, device: torch.device) -> float:
    """Best wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure(scenario, tokens: int, length: int, repeats: int, device: torch.device, dtype) -> dict:
    config, shapes = scenario_shape(scenario)
    weights = {
        shape: torch.randn(shape[1], shape[0], device=device, dtype=dtype) * 0.02 for shape in set(shapes)
    }
    inputs = {d: torch.randn(tokens, d, device=device, dtype=dtype) for d in {s[0] for s in shapes}}
    grads = {d: torch.randn(tokens, d, device=device, dtype=dtype) for d in {s[1] for s in shapes}}

    def linears():
        for shape in shapes:
            w, x, dy = weights[shape], inputs[shape[0]], grads[shape[1]]
            x @ w.T  # forward
            dy @ w  # gradient of the input
            dy.T @ x  # gradient of the weight

    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    sequences = max(1, tokens // length)
    q, k, v = (
        torch.randn(sequences, heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    )

    def attention():
        for _ in range(config.num_hidden_layers):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(torch.ones_like(out))

    linear_seconds = _time(linears, repeats, device)
    attention_seconds = _time(attention, repeats, device)
    linear_flops = 6 * tokens * sum(i * o for i, o in shapes)
    attention_flops = 12 * config.num_hidden_layers * config.hidden_size * length * sequences * length
    result = {
        "tokens": tokens,
        "length": length,
        "linear_seconds": linear_seconds,
        "attention_seconds": attention_seconds,
        "linear_tflops": linear_flops / linear_seconds / 1e12,
        "attention_tflops": attention_flops / attention_seconds / 1e12,
        "step_tflops": (linear_flops + attention_flops) / (linear_seconds + attention_seconds) / 1e12,
    }
    if device.type == "cuda":
        for key in ("linear", "attention", "step"):
            result[f"{key}_mfu"] = result[f"{key}_tflops"] * 1e12 / PEAK_BF16_FLOPS
        result["device"] = torch.cuda.get_device_name()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="gpu-0.5b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384], help="rows per micro-batch")
    parser.add_argument("--length", type=int, default=1024, help="sequence length for attention")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    scenario = SCENARIOS[args.scenario]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = [measure(scenario, t, args.length, args.repeats, device, dtype) for t in args.tokens]
    print(f"{args.scenario}: matmuls and attention alone, forward + backward, {dtype}, {device}")
    for r in results:
        line = (
            f"tokens {r['tokens']:>6}, length {r['length']}: linear {r['linear_tflops']:.3g} TFLOP/s, "
            f"attention {r['attention_tflops']:.3g} TFLOP/s, both {r['step_tflops']:.3g} TFLOP/s"
        )
        if "step_mfu" in r:
            line += f"; MFU ceiling {r['step_mfu']:.1%} (linear {r['linear_mfu']:.1%}, attention {r['attention_mfu']:.1%})"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scenario": args.scenario, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
