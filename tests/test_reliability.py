"""Kill-safety: SIGKILL after a checkpoint and in the middle of writing one, SIGTERM, and exact
resume (same weights bit for bit and the same logged losses as an uninterrupted run, on CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import demo_train_argv

pytestmark = pytest.mark.slow  # kills and resumes real runs in subprocesses

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def train_argv(out, steps=30):
    # demo:test has 200 rows: 4 x 2 accumulated = 8 pairs a step, 25 steps an epoch, so 30 steps cross
    # into a second epoch (shuffled again); save every 10 steps.
    return demo_train_argv(
        out,
        max_steps=steps,
        save_steps=10,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate="1e-3",
        logging_steps=1,
        seed=0,
    )


def run_cli(argv, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "orpo", *argv], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def run_until_killed(hook, argv, tmp_path, timeout=300):
    marker = tmp_path / f"{hook.replace(':', '-')}.marker"
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "kill_run.py"), hook, str(marker), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the hook never fired"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def losses(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_sigkill_after_and_during_a_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = run_cli(train_argv(reference))
    assert done.returncode == 0, done.stderr[-3000:]

    # 1. killed right after checkpoint-10 is complete
    run_until_killed("after-save:10", train_argv(killed), tmp_path)
    assert (killed / "checkpoint-10" / "model.safetensors").is_file()
    assert not (killed / "model.safetensors").exists()
    # 2. resumed, then killed while checkpoint-20 is written but not yet published
    run_until_killed("during-save:20", [*train_argv(killed), "--resume"], tmp_path)
    assert not (killed / "checkpoint-20").exists()  # the half-made one is not where resume looks
    assert (killed / ".incomplete" / "checkpoint-20").is_dir()
    # 3. resumed again: picks checkpoint-10 (the newest complete one) and finishes
    resumed = run_cli([*train_argv(killed), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = (
        load_file(str(reference / "model.safetensors")),
        load_file(str(killed / "model.safetensors")),
    )
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name  # bit for bit
    assert losses(killed) == losses(reference)
    assert sorted(losses(reference)) == list(range(1, 31))


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orpo", *train_argv(out, steps=100000)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-10").is_dir():  # training is under way
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: stopped after step" in err and "--resume" in err
    step = int(err.split("stopped after step ")[1].split(";")[0])
    assert (out / f"checkpoint-{step}" / "model.safetensors").is_file()
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert not (out / "model.safetensors").exists()  # not a finished-looking output directory


def test_resume_loads_checkpoints_with_weights_only(tmp_path, monkeypatch):
    """Models come from safetensors; every torch.load on resume (optimizer, scheduler, RNG) is weights_only."""
    from orpo.cli import main

    out = tmp_path / "run"
    argv = train_argv(out, steps=4)
    argv[argv.index("--save_steps") + 1] = "2"
    assert main(argv) == 0
    checkpoint = out / "checkpoint-4"
    assert (checkpoint / "model.safetensors").is_file()
    assert not list(out.rglob("pytorch_model*.bin"))

    real_load = torch.load
    calls = []

    def guarded_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, f"torch.load without weights_only=True: {args[:1]}"
        calls.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded_load)
    argv[argv.index("--max_steps") + 1] = "6"
    assert main([*argv, "--resume"]) == 0
    assert any(str(c).endswith("optimizer.pt") for c in calls)  # the guard saw the resume's loads
