"""LM head + ORPO loss, alone: orpo's fused and chunked heads vs Liger's fused ORPO loss vs full logits.

The work of one training step's head: final hidden states of ``2B`` rows (B chosen, B rejected) of
``T`` positions, the first half of each row a prompt -> ORPO loss (NLL of the chosen responses +
alpha x odds-ratio term) -> backward into the hidden states and the head weight.

Variants (each measurement in its own subprocess, since peak RSS is per process; variants
alternate A B C ... A B C so machine noise hits all of them alike):

- ``orpo``: ``fused_linear_loss`` over the scored (response) positions, whole pairs per chunk,
  chunk size from the vocabulary (what ``ORPOTrainer`` runs by default);
- ``orpo-unfused``: ``chunked_target_logprobs`` + ``orpo_loss`` (backward recomputes the logits);
- ``liger``: ``liger_kernel.chunked_loss.LigerFusedLinearORPOLoss(compiled=False)`` on all positions
  (prompt targets ``-100``), one pair per chunk, its default;
- ``liger-compiled``: the same with ``compiled=True`` (timed on a second call, after compilation);
- ``naive``: full ``[2B, T, V]`` logits, ``log_softmax``, gather (what TRL's trainer does).

Usage::

    python benchmarks/bench_head.py                 # the default grid
    python benchmarks/bench_head.py --preset micro  # seconds; used by the test suite
    python benchmarks/bench_head.py --points 8x512x128256 --variants orpo liger --repeats 3

Prints, per grid point, peak-RSS increase and time of each variant and the ratios orpo/peer, and
writes them as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time

PRESETS = {
    # pairs x positions per row x vocabulary
    "default": [
        "4x512x32000",
        "8x512x32000",
        "8x1024x32000",
        "4x512x128256",
        "8x512x128256",
        "8x1024x128256",
    ],
    "micro": ["2x32x1000"],
}
VARIANTS = ["orpo", "orpo-unfused", "liger", "liger-compiled", "naive"]
ALPHA = 0.1


def parse_point(text: str) -> tuple[int, int, int]:
    pairs, length, vocab = (int(x) for x in text.lower().split("x"))
    return pairs, length, vocab


def measure(variant: str, pairs: int, length: int, vocab: int, hidden_size: int) -> dict:
    """One measurement, in this (child) process."""
    import torch

    torch.manual_seed(0)
    hidden = torch.randn(2 * pairs, length, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (2 * pairs, length))
    prompt = length // 2
    step = _step_function(variant, hidden, weight, targets, prompt, pairs)
    if variant == "liger-compiled":
        step()  # compile outside the timed call, as a long training run amortises it
        hidden.grad = weight.grad = None
    base = reset_peak_rss()
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_increase_mib": (peak_rss() - base) / 2**20, "loss": float(loss)}


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark of this process (Linux: ``5 > /proc/self/clear_refs``) and
    return the current RSS in bytes, so a later :func:`peak_rss` covers only what follows."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _step_function(variant, hidden, weight, targets, prompt, pairs):
    import torch

    rows, length, _ = hidden.shape
    if variant.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearORPOLoss

        liger_targets = targets.clone()
        liger_targets[:, :prompt] = -100
        loss_module = LigerFusedLinearORPOLoss(beta=ALPHA, compiled=variant == "liger-compiled")

        def step():
            out = loss_module(weight, hidden, liger_targets)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return loss.detach()

        return step

    from orpo.logprobs import chunk_size_for, chunked_target_logprobs, fused_linear_loss, segment_chunks
    from orpo.loss import orpo_loss

    # Scored tokens pair by pair (chosen row, then rejected row), as orpo's collator lays them out.
    order = [r for p in range(pairs) for r in (p, pairs + p)]
    positions = torch.cat([r * length + torch.arange(prompt, length) for r in order])
    flat_targets = targets.reshape(-1)[positions]
    per_row = length - prompt
    pair_index = torch.arange(pairs).repeat_interleave(2 * per_row)
    is_chosen = torch.tensor([True] * per_row + [False] * per_row).repeat(pairs)
    is_response = torch.ones_like(is_chosen)
    norms = {"nll_normalizer": int(is_chosen.sum()), "pair_normalizer": pairs}

    def loss_of(logps, pair, chosen, response, count):
        return orpo_loss(logps, pair, chosen, response, count, alpha=ALPHA, beta=1.0, **norms)[0]

    if variant == "naive":

        def step():
            logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
            logps = (
                logits.log_softmax(-1).index_select(0, positions).gather(1, flat_targets[:, None]).squeeze(1)
            )
            loss = loss_of(logps, pair_index, is_chosen, is_response, pairs)
            loss.backward()
            return loss.detach()

        return step

    chunk = chunk_size_for(weight.shape[0])

    def step():
        scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        if variant == "orpo":
            chunks = segment_chunks([2 * per_row] * pairs, chunk, max_chunk_size=4 * chunk)  # as ORPOTrainer
            assert chunks is not None, (
                "a pair does not fit in one chunk at this point: use a larger vocab budget"
            )

            def chunk_loss(logps, start, end):
                first = start // (2 * per_row)
                return loss_of(
                    logps,
                    pair_index[start:end] - first,
                    is_chosen[start:end],
                    is_response[start:end],
                    (end - start) // (2 * per_row),
                )

            loss, _, _ = fused_linear_loss(scored, weight, flat_targets, chunks=chunks, loss_fn=chunk_loss)
        else:
            logps, _ = chunked_target_logprobs(scored, weight, flat_targets, chunk_size=chunk)
            loss = loss_of(logps, pair_index, is_chosen, is_response, pairs)
        loss.backward()
        return loss.detach()

    return step


def run_child(variant: str, point: str, hidden_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--points", point, "--hidden", str(hidden_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" in r] == []
    if not ok:
        return {"error": next(r["error"] for r in runs if "error" in r)}
    return {
        "best_seconds": min(r["seconds"] for r in runs),
        "median_seconds": statistics.median(r["seconds"] for r in runs),
        "peak_increase_mib": statistics.median(r["peak_increase_mib"] for r in runs),
        "loss": runs[0]["loss"],
    }


NAIVE_LIMIT_GIB = 12


def fits(variant: str, point: str) -> bool:
    """The naive variant holds ~3 fp32 [tokens, vocab] tensors; skip it where that exceeds the limit."""
    pairs, length, vocab = parse_point(point)
    return variant != "naive" or 3 * 4 * 2 * pairs * length * vocab / 2**30 <= NAIVE_LIMIT_GIB


too_big = {"error": f"skipped: full logits would need more than {NAIVE_LIMIT_GIB} GiB here"}


def available(variant: str) -> str | None:
    """None if the variant can run here, else why not."""
    if variant.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install -e '.[bench]')"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--points", nargs="+", help="grid points PAIRSxLENGTHxVOCAB (overrides --preset)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    points = args.points or PRESETS[args.preset]
    if args.child:
        print(json.dumps(measure(args.child, *parse_point(points[0]), args.hidden)))
        return

    skipped = {v: why for v in args.variants if (why := available(v))}
    variants = [v for v in args.variants if v not in skipped]
    for variant, why in skipped.items():
        print(f"skipping {variant}: {why}")
    results = {}
    for point in points:
        runs = {v: [] for v in variants}
        for _ in range(args.repeats):
            for variant in variants:
                runs[variant].append(
                    run_child(variant, point, args.hidden) if fits(variant, point) else too_big
                )
        results[point] = {v: summarise(r) for v, r in runs.items()}
        print_point(point, results[point], args)
    if args.json:
        import torch

        meta = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
        }
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "meta": meta, "results": results}, fh, indent=2)


def print_point(point: str, summary: dict, args) -> None:
    pairs, length, vocab = parse_point(point)
    print(
        f"\n{pairs} pairs x {length} positions (half prompt) = {2 * pairs * length} tokens, vocab {vocab}, "
        f"hidden {args.hidden}; best of {args.repeats}"
    )
    print(f"{'variant':>15} {'peak MiB':>9} {'seconds':>8} {'mem ratio':>10} {'time ratio':>11} {'loss':>10}")
    ours = summary.get("orpo", {})
    for variant, s in summary.items():
        if "error" in s:
            print(f"{variant:>15}  failed: {s['error']}")
            continue
        mem = time_ratio = ""
        if variant != "orpo" and "best_seconds" in ours:
            mem = (
                f"{ours['peak_increase_mib'] / s['peak_increase_mib']:.2f}"
                if s["peak_increase_mib"] >= 1
                else "-"
            )
            time_ratio = f"{ours['best_seconds'] / s['best_seconds']:.2f}"
        print(
            f"{variant:>15} {s['peak_increase_mib']:>9.0f} {s['best_seconds']:>8.2f} {mem:>10} {time_ratio:>11} "
            f"{s['loss']:>10.5f}"
        )
    print("(ratios are orpo / variant: below 1 means orpo uses less memory / time)")


if __name__ == "__main__":
    main()
