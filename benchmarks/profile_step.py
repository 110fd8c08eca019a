"""Where a training step's time goes: torch.profiler over a few optimizer steps of a bench_vs_trl scenario.

Usage::

    python benchmarks/profile_step.py --scenario large-vocab [--impl orpo|trl] [--steps 3] [--rows 15]

Prints the operators with the most self time (CPU, and CUDA where there is one), so the next
optimisation targets the real bottleneck. The first step is left out of the profile (warm-up).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import ORPO_VARIANTS, SCENARIOS, build, make_rows  # noqa: E402


class ProfileSteps(TrainerCallback):
    """Starts the profiler after the first optimizer step and stops it at the end of training."""

    def __init__(self, prof):
        self.prof = prof

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.prof.start()

    def on_train_end(self, args, state, control, **kwargs):
        self.prof.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="large-vocab")
    parser.add_argument("--impl", choices=[*ORPO_VARIANTS, "trl"], default="orpo")
    parser.add_argument("--vocab", type=int, help="default: the scenario's first vocabulary size")
    parser.add_argument("--steps", type=int, default=3, help="profiled optimizer steps (after one warm-up)")
    parser.add_argument("--rows", type=int, default=15, help="operators to show")
    args = parser.parse_args()
    scenario = dataclasses.replace(SCENARIOS[args.scenario], steps=args.steps + 1)
    vocab = args.vocab or scenario.vocab_sizes[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as out:
        trainer = build(args.impl, scenario, vocab, out, make_rows(scenario, scenario.steps * scenario.batch))
        prof = profile(activities=activities)
        trainer.add_callback(ProfileSteps(prof))
        trainer.train()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"{args.impl} on {args.scenario} (vocab {vocab}), {args.steps} profiled optimizer steps")
    events = prof.key_averages()
    print(events.table(sort_by=sort, row_limit=args.rows))
    if torch.cuda.is_available():  # GPU-bound or waiting on the host?
        busy = sum(e.self_device_time_total for e in events) / 1e6
        print(f"GPU busy {busy:.2f} s of the profiled steps' kernels (compare with the steps' wall time)")


if __name__ == "__main__":
    main()
