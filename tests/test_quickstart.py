import filecmp
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from orpo.cli import main
from orpo.demo import DEMO_DIR, TOKENIZER_DIR, load_demo_dataset
from orpo.demo.quickstart import DEMO_ALPHA, run_quickstart

pytestmark = pytest.mark.slow  # trains the quickstart end to end

ROOT = Path(__file__).resolve().parents[1]


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_shipped_data_regenerates_byte_identically(tmp_path):
    script = runpy.run_path(str(ROOT / "scripts" / "build_demo_data.py"))
    script["write"](tmp_path)
    for name in ("train.jsonl", "test.jsonl"):
        assert filecmp.cmp(tmp_path / name, DEMO_DIR / name, shallow=False), name


def test_shipped_tokenizer_regenerates_identically(tmp_path):
    script = runpy.run_path(str(ROOT / "scripts" / "build_demo_tokenizer.py"))
    script["build"](tmp_path)
    for path in TOKENIZER_DIR.iterdir():
        assert filecmp.cmp(tmp_path / path.name, path, shallow=False), path.name


def test_demo_pairs_are_near_misses_and_held_out_prompts_are_new():
    train, test = load_demo_dataset("train"), load_demo_dataset("test")
    assert len(train) >= 2000 and len(test) >= 200
    for row in list(train) + list(test):
        assert row["chosen"] != row["rejected"]
        assert edit_distance(row["chosen"], row["rejected"]) <= 2
    assert not set(train["prompt"]) & set(test["prompt"])


def test_demo_preferences_rank_best_over_flawed_over_worse():
    """Half the training pairs prefer the reversal over the reversal with a trailing '!', half that
    flawed answer over '!!'; every held-out pair is the reversal over the flawed answer."""
    train, test = load_demo_dataset("train"), load_demo_dataset("test")
    kinds = []
    for row in train:
        best = row["prompt"][len("rev ") : -1][::-1]
        pair = (row["chosen"], row["rejected"])
        assert pair in ((best, best + "!"), (best + "!", best + "!!")), row
        kinds.append(pair[0] == best)
    assert kinds.count(True) == kinds.count(False) == len(train) // 2
    for row in test:
        best = row["prompt"][len("rev ") : -1][::-1]
        assert (row["chosen"], row["rejected"]) == (best, best + "!")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    comparison = run_quickstart(output_dir=str(out), max_steps=3, seed=1)
    return out, comparison


def test_quickstart_writes_models_reports_and_plot(quick_run):
    out, comparison = quick_run
    for name in ("orpo", "sft"):
        files = {p.name for p in (out / name).iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "log_history.json"} <= files
        assert not any(f.startswith("pytorch_model") for f in files)
        AutoModelForCausalLM.from_pretrained(str(out / name))
        metrics = comparison[name]
        for key in (
            "eval_rewards/accuracies",
            "eval_rewards/margins",
            "eval_logps/chosen",
            "eval_logps/rejected",
            "eval_nll_loss",
            "eval_log_odds_ratio",
            "train_seconds",
            "exact_match",
        ):
            assert isinstance(metrics[key], float), key
    assert json.loads((out / "comparison.json").read_text()) == comparison
    png = (out / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "training_curves.png")).shape[0] > 100
    samples = (out / "samples.md").read_text()
    assert samples.count("| `rev ") == 3


def test_both_runs_are_scored_under_the_orpo_alpha(quick_run):
    _, comparison = quick_run
    # SFT trained with alpha=0, but evaluated with the ORPO run's alpha: its rewards are not all zero.
    sft = comparison["sft"]
    assert sft["eval_rewards/chosen"] == pytest.approx(DEMO_ALPHA * sft["eval_logps/chosen"])
    assert sft["eval_rewards/chosen"] != 0.0


def test_quickstart_is_deterministic_for_a_seed(quick_run, tmp_path):
    _, first = quick_run
    again = run_quickstart(output_dir=str(tmp_path), max_steps=3, seed=1)
    for name in ("orpo", "sft"):
        for key, value in first[name].items():
            if "runtime" in key or "per_second" in key or key == "train_seconds":
                continue
            assert again[name][key] == value, (name, key)


def test_cli_help_and_bad_flags(capsys):
    assert main([]) == 0
    assert "quickstart" in capsys.readouterr().out
    assert main(["quickstart", "--max-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "orpo: error: --max-steps must be >= 1" in err and "Traceback" not in err


def test_python_dash_m_orpo_runs():
    result = subprocess.run(
        [sys.executable, "-m", "orpo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "quickstart" in result.stdout


def test_tiny_model_is_in_the_promised_size_range():
    from orpo.demo import tiny_model

    params = sum(p.numel() for p in tiny_model().parameters())
    assert 100_000 <= params <= 5_000_000
    assert torch.equal(tiny_model(seed=3).lm_head.weight, tiny_model(seed=3).lm_head.weight)


def test_the_demo_trains_on_one_thread_and_gives_the_threads_back(tmp_path, monkeypatch):
    """Issue 22 item 17: with one core busy elsewhere the quickstart ran 2.7x slower on two threads (each of
    the tiny model's ops waits for both); on one it keeps its idle speed, and the caller's setting returns."""
    import torch

    import orpo.demo.quickstart

    seen = []
    real = orpo.demo.quickstart._train_one
    monkeypatch.setattr(
        orpo.demo.quickstart,
        "_train_one",
        lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k),
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_quickstart(output_dir=str(tmp_path), max_steps=1, seed=0)
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
