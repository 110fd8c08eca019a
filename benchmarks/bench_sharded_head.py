"""The chunked LM head under sharding engines: peak memory and time of 2-process training (CPU, gloo)
with the chunked head vs the model's own full logits, side by side, for DDP, FSDP2 full shard and
DeepSpeed ZeRO-3, on a large vocabulary (where the head's logits dominate activation memory).

Each run is ``tests/distributed_run.py`` under ``torchrun`` (the multi-process tests' harness; FSDP
really shards there, see its ``run_fsdp_on_cpu``); the figures are process 0's: the increase of its peak
resident memory during ``train()`` and the wall time of ``train()``.

    python benchmarks/bench_sharded_head.py                 # vocab 128256, 16 pairs, 4 steps, 2 repeats
    python benchmarks/bench_sharded_head.py --engines zero3 --vocab 151936
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / "tests" / "distributed_run.py"
ENGINES = {"ddp": [], "fsdp2": ["--fsdp"], "zero3": ["--zero", "3"]}


def run(engine: str, model_head: bool, vocab: int, steps: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(RUN),
        ]
        cmd += ["--out", out, "--batch", str(batch), "--steps", str(steps), "--vocab", str(vocab), "--untied"]
        cmd += ENGINES[engine] + (["--model-head"] if model_head else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{engine} run failed:\n{proc.stderr[-3000:]}")
        cost = json.loads(Path(out, "cost.json").read_text())
        cost["head"] = Path(out, "head.txt").read_text()
        return cost


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="pairs per process and step")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    engines = [e for e in args.engines if e != "zero3" or importlib.util.find_spec("deepspeed")]
    print(f"vocab {args.vocab}, {args.batch} pairs per process, {args.steps} steps, 2 processes (process 0)")
    print(f"{'engine':>7} {'head':>8} {'peak MiB':>9} {'seconds':>8}")
    for engine in engines:
        best = {}
        for _ in range(args.repeats):  # alternating, best of each
            for model_head in (False, True):
                cost = run(engine, model_head, args.vocab, args.steps, args.batch)
                key = cost["head"]
                best[key] = {
                    "peak_increase_mib": min(
                        cost["peak_increase_mib"], best.get(key, cost)["peak_increase_mib"]
                    ),
                    "seconds": min(cost["seconds"], best.get(key, cost)["seconds"]),
                }
        for head, cost in best.items():
            print(f"{engine:>7} {head:>8} {cost['peak_increase_mib']:>9.0f} {cost['seconds']:>8.2f}")
        if {"chunked", "model"} <= best.keys():
            chunked, full = best["chunked"], best["model"]
            print(
                f"{engine:>7} chunked/model: peak memory {chunked['peak_increase_mib'] / full['peak_increase_mib']:.2f}, "
                f"speed {full['seconds'] / chunked['seconds']:.2f}x"
            )


if __name__ == "__main__":
    main()
