"""The real-model exercise (``orpo quickstart --model smollm2``): the behaviour's definition, the shipped data
(rebuilt by scripts/build_smollm2_data.py, byte for byte), the example config, and the command end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orpo.demo import demo_data_path
from orpo.demo.exercise import GENERATION_BATCH
from orpo.demo.one_sentence import first_sentence, is_one_sentence, whole_sentences

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import build_smollm2_data as builder  # noqa: E402


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in demo_data_path(name).read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(
    ("text", "first", "one"),
    [
        (
            "Photosynthesis is how plants make food. It needs light.",
            "Photosynthesis is how plants make food.",
            False,
        ),
        ("Water boils at 100.5 degrees here.", "Water boils at 100.5 degrees here.", True),
        ("It is e.g. the best one here.", "It is e.g. the best one here.", True),
        ('He said "stop it now." Then he left.', 'He said "stop it now."', False),
        ("Sure! Here is more text.", None, False),  # an interjection, not an answer
        ("**Title**\n\nText is here.", None, False),  # markdown
        ("No end of sentence at all", None, False),
        ("A list follows here:\n1. one", None, False),
    ],
)
def test_what_counts_as_one_sentence(text, first, one):
    assert first_sentence(text) == first
    assert is_one_sentence(text) is one


def test_the_shipped_pairs_are_what_the_builder_makes_of_the_answers():
    """Without the model: each pair's chosen is the first sentence of its rejected answer, which is whole
    sentences; prompts come in the builder's order, held-out topics never occur in training."""
    for name, prompts in (
        ("smollm2-train", builder.train_prompts()),
        ("smollm2-test", builder.test_prompts()),
    ):
        shipped = rows(name)
        assert len(shipped) >= 0.9 * len(prompts)  # few prompts make no pair (the builder prints which)
        asked = [row["prompt"][0]["content"] for row in shipped]
        positions = [prompts.index(p) for p in asked]
        assert positions == sorted(positions) and len(set(asked)) == len(asked)
        for row in shipped:
            rejected = row["rejected"][0]["content"]
            assert row["chosen"][0]["content"] == first_sentence(rejected)
            assert whole_sentences(rejected) == rejected and not is_one_sentence(rejected)
    train_topics = set(builder.topics(builder.TRAIN_TOPICS))
    assert not train_topics & set(builder.topics(builder.TEST_TOPICS))
    assert [row["prompt"][0]["content"] for row in rows("smollm2-unrelated")] == builder.UNRELATED_PROMPTS


def test_the_example_config_is_the_exercises_orpo_run(tmp_path):
    """examples/smollm2-orpo.yaml trains what `orpo quickstart --model smollm2` trains as its ORPO half."""
    from orpo.cli.run_config import read_config_file, resolve
    from orpo.demo.exercise import ALPHA, STEPS, _config

    run = resolve(read_config_file(str(ROOT / "examples" / "smollm2-orpo.yaml")), [])
    ours = _config(tmp_path, ALPHA, STEPS, seed=0)
    assert run.model["name"] == "smollm2"
    assert run.datasets == ["demo:smollm2-train"] and run.eval_datasets == ["demo:smollm2-test"]
    for key in (
        "orpo_alpha",
        "orpo_beta",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "max_steps",
        "max_length",
        "max_prompt_length",
        "activation_checkpointing",
        "logging_steps",
        "weight_decay",
    ):
        assert getattr(run.args, key) == getattr(ours, key), key


@pytest.mark.slow
def test_the_builder_regenerates_the_shipped_files_byte_for_byte():
    """The model's greedy answers for the first batch of prompts of each file, made into lines as the
    builder makes them, equal the shipped lines (the whole rebuild: scripts/build_smollm2_data.py --check,
    about 5 minutes on 2 cores)."""
    model, tokenizer = builder.load_base()
    for name, prompts in (
        ("smollm2-train", builder.train_prompts()),
        ("smollm2-test", builder.test_prompts()),
    ):
        first = prompts[:GENERATION_BATCH]
        made, _ = builder.make_pairs(first, builder.greedy_answers(model, tokenizer, first))
        shipped = demo_data_path(name).read_text(encoding="utf-8").splitlines(keepends=True)
        assert builder.jsonl(made) == "".join(shipped[: len(made)]), name
    unrelated = builder.UNRELATED_PROMPTS[:GENERATION_BATCH]
    answers = builder.greedy_answers(model, tokenizer, unrelated)
    made = builder.jsonl(
        {"prompt": builder.user(p), "answer": builder.assistant(a)}
        for p, a in zip(unrelated, answers, strict=True)
    )
    shipped = demo_data_path("smollm2-unrelated").read_text(encoding="utf-8").splitlines(keepends=True)
    assert made == "".join(shipped[: len(unrelated)])


@pytest.mark.slow
def test_the_exercise_runs_end_to_end_on_the_real_model(tmp_path, monkeypatch, capsys):
    """`orpo quickstart --model smollm2` on a few pairs and 2 steps: both runs train from SmolLM2, every model
    is scored (preference metrics, behaviour rate, forgetting check) and the reports are written."""
    import orpo.demo.exercise
    from orpo.cli import main

    real = orpo.demo.exercise.load_demo_dataset
    monkeypatch.setattr(orpo.demo.exercise, "load_demo_dataset", lambda name: real(name).select(range(4)))
    out = tmp_path / "smollm2"
    assert main(["quickstart", "--model", "smollm2", "--max-steps", "2", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("reward accuracy", "one-sentence answers", "log-prob of own unrelated answers", "before"):
        assert label in printed
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison) == {"before", "orpo", "sft"}
    for scores in comparison.values():
        assert 0 <= scores["behaviour_rate"] <= 1 and scores["unrelated_logp"] < 0
        assert 0 <= scores["eval_rewards/accuracies"] <= 1
    assert comparison["before"]["behaviour_rate"] == 0  # the model answers with paragraphs
    for name in ("orpo", "sft"):
        assert (out / name / "model.safetensors").is_file() and (out / name / "orpo_config.yaml").is_file()
    assert (out / "training_curves.png").stat().st_size > 0 and "| prompt |" in (
        out / "samples.md"
    ).read_text()


@pytest.mark.slow
def test_the_hub_name_takes_the_same_path(tmp_path):
    """`--model HuggingFaceTB/SmolLM2-135M-Instruct` is what users with a network type: it goes to the same
    loader, which here (no hub) fails at once in one line."""
    environment = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "orpo", "quickstart", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    command += ["--output-dir", str(tmp_path / "out")]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        "could not load the model 'HuggingFaceTB/SmolLM2-135M-Instruct': HF_HUB_OFFLINE is set" in done.stderr
    )


def test_the_benchmark_checks_each_target():
    """benchmarks/bench_exercise.py's pass/fail per target (the issue's targets for three seeds)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_exercise import check

    def scores(accuracy, behaviour, rejected):
        return {
            "eval_rewards/accuracies": accuracy,
            "behaviour_rate": behaviour,
            "eval_logps/rejected": rejected,
        }

    good = {
        "before": scores(0.02, 0.0, -0.8),
        "sft": scores(0.95, 1.0, -0.75),
        "orpo": scores(1.0, 0.97, -1.1),
    }
    assert all(check(good, wall=600).values())
    tie = {**good, "sft": scores(1.0, 1.0, -0.75)}
    assert [k for k, ok in check(tie, wall=600).items() if not ok] == ["orpo accuracy above sft's"]
    assert [k for k, ok in check(good, wall=901).items() if not ok] == ["wall <= 15 min"]
