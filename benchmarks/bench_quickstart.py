"""Check the quickstart's targets (issue: ORPO beats SFT-only on held-out near-miss pairs) for some seeds.

    python benchmarks/bench_quickstart.py [--seeds 0 1 2] [--max-steps N]

For each seed it runs the whole ``orpo quickstart`` (both trainings, evaluation, generation) and prints
the held-out numbers side by side with a pass/fail per target:
ORPO reward accuracy >= 0.95; SFT-only accuracy lower by at least 0.2; ORPO's rejected log-prob lower than SFT's; ORPO's
margin larger; ORPO exact match >= 0.5; wall time <= 150 s.
"""

from __future__ import annotations

from demo_runs import each_run

from orpo.demo.quickstart import run_quickstart


def check(comparison: dict, wall: float) -> dict[str, bool]:
    orpo, sft = comparison["orpo"], comparison["sft"]
    return {
        "orpo accuracy >= 0.95": orpo["eval_rewards/accuracies"] >= 0.95,
        "sft accuracy visibly lower (by >= 0.2)": sft["eval_rewards/accuracies"]
        <= orpo["eval_rewards/accuracies"] - 0.2,
        "orpo rejected logp lower": orpo["eval_logps/rejected"] < sft["eval_logps/rejected"],
        "orpo margin larger": orpo["eval_rewards/margins"] > sft["eval_rewards/margins"],
        "orpo exact match >= 0.5": orpo["exact_match"] >= 0.5,
        "wall <= 150 s": wall <= 150,
    }


def main() -> None:
    for seed, precision, comparison, wall in each_run(__doc__, run_quickstart):
        orpo, sft = comparison["orpo"], comparison["sft"]
        print(f"\nseed {seed}, precision {precision}: wall {wall:.1f} s")
        for key in (
            "eval_rewards/accuracies",
            "eval_rewards/margins",
            "eval_logps/chosen",
            "eval_logps/rejected",
            "eval_nll_loss",
            "exact_match",
            "train_seconds",
        ):
            print(f"  {key:<26} orpo {orpo[key]:>9.4f}   sft {sft[key]:>9.4f}")
        for target, ok in check(comparison, wall).items():
            print(f"  [{'pass' if ok else 'FAIL'}] {target}")


if __name__ == "__main__":
    main()
