"""LM head + log-prob memory and time: orpo's chunked head vs the naive full-logits computation.

Each measurement runs in its own subprocess (peak RSS is per process), alternating A B A B, and
the script prints ratios measured side by side in one run. Usage:

    python benchmarks/bench_head.py [--tokens 4096] [--hidden 256] [--vocab 32000] [--repeats 3]

Work measured: hidden states [tokens, hidden] -> log-prob of each target token -> backward into
the hidden states and the head weight (what the trainer does per batch).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(variant: str, tokens: int, hidden: int, vocab: int, chunk: int) -> dict:
    import torch

    from orpo.logprobs import chunked_target_logprobs, full_target_logprobs

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "chunked":
        logps, _ = chunked_target_logprobs(h, w, targets, chunk_size=chunk)
    else:
        logps, _ = full_target_logprobs(h @ w.T, targets)
    logps.sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "seconds": seconds, "peak_increase_mib": (peak - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.hidden, args.vocab, args.chunk)))
        return
    results = {"chunked": [], "full": []}
    for _ in range(args.repeats):
        for variant in ("chunked", "full"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--tokens",
                str(args.tokens),
                "--hidden",
                str(args.hidden),
                "--vocab",
                str(args.vocab),
                "--chunk",
                str(args.chunk),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    summary = {}
    for variant, runs in results.items():
        summary[variant] = {
            "best_seconds": min(r["seconds"] for r in runs),
            "median_seconds": statistics.median(r["seconds"] for r in runs),
            "median_peak_increase_mib": statistics.median(r["peak_increase_mib"] for r in runs),
        }
    c, f = summary["chunked"], summary["full"]
    print(
        f"head: tokens={args.tokens} hidden={args.hidden} vocab={args.vocab} chunk={args.chunk} "
        f"(forward + backward, {args.repeats} alternating runs each)"
    )
    print(f"{'':>10} {'peak RSS increase MiB':>22} {'best s':>8} {'median s':>9}")
    for name, s in summary.items():
        print(
            f"{name:>10} {s['median_peak_increase_mib']:>22.0f} {s['best_seconds']:>8.3f} {s['median_seconds']:>9.3f}"
        )
    print(
        f"ratio chunked/full: memory {c['median_peak_increase_mib'] / f['median_peak_increase_mib']:.3f}, "
        f"time (best) {c['best_seconds'] / f['best_seconds']:.3f}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "summary": summary, "runs": results}, fh, indent=2)


if __name__ == "__main__":
    main()
