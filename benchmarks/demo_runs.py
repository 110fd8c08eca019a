"""The seed x precision loop the demo benchmarks share (bench_quickstart.py, bench_exercise.py): parse
``--seeds``, ``--max-steps`` and ``--precision``, run the demo once per pair in a temporary folder, and
yield each run's comparison with its wall time."""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator

PRECISIONS = {"default": None, "fp32": False, "bf16": True}  # ORPOConfig's bf16: None = its own choice


def each_run(description: str, run: Callable[..., dict]) -> Iterator[tuple[int, str, dict, float]]:
    """``(seed, precision, comparison, wall seconds)`` for every run the command line asks for."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=list(PRECISIONS),
        default=["default"],
        help="run each seed under each (default: ORPOConfig's, bf16 where the CPU has it)",
    )
    args = parser.parse_args()
    for seed in args.seeds:
        for precision in args.precision:
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                comparison = run(
                    output_dir=out, max_steps=args.max_steps, seed=seed, bf16=PRECISIONS[precision]
                )
                yield seed, precision, comparison, time.perf_counter() - start
