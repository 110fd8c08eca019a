"""N processes equal 1 process: the same global batch gives the same losses, metrics and weights.

Each run is ``torchrun`` (gloo, CPU) of ``tests/distributed_run.py``; a crash or hang at shutdown
fails the test like any other error.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import STEP_METRICS, make_model

RUN = Path(__file__).resolve().parent / "distributed_run.py"


def launch(tmp_path, name, processes, batch, accum=1, steps=3, *extra):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd += [
        str(RUN),
        "--out",
        str(out),
        "--batch",
        str(batch),
        "--accum",
        str(accum),
        "--steps",
        str(steps),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    assert (out / "world_size.txt").read_text() == str(processes)
    history = [h for h in json.loads((out / "history.json").read_text()) if "loss" in h]
    return history, load_file(str(out / "model.safetensors"))


def assert_same_run(a, b):
    (history_a, weights_a), (history_b, weights_b) = a, b
    assert len(history_a) == len(history_b) > 0
    for step_a, step_b in zip(history_a, history_b, strict=True):
        for name in STEP_METRICS:
            assert step_a[name] == pytest.approx(step_b[name], rel=1e-5, abs=1e-7), (step_a["step"], name)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.allclose(weights_a[name], weights_b[name], rtol=1e-5, atol=1e-7), name


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    one = launch(tmp_path, "one", processes=1, batch=4)
    two = launch(tmp_path, "two", processes=2, batch=2)
    assert_same_run(one, two)
    # Teeth: training moved the weights, and a run that sees only one process's half of each
    # global batch ends elsewhere, so the comparison can tell runs apart.
    initial = {n: p.detach() for n, p in make_model(seed=3).state_dict().items()}
    assert any(not torch.allclose(initial[n], w) for n, w in one[1].items() if n in initial)
    half = launch(tmp_path, "half", processes=1, batch=2)
    assert any(not torch.allclose(one[1][n], half[1][n], rtol=1e-5, atol=1e-7) for n in one[1])


def test_processes_times_accumulation_equal_one_process_accumulating(tmp_path):
    one = launch(tmp_path, "one", processes=1, batch=1, accum=4)
    two = launch(tmp_path, "two", processes=2, batch=1, accum=2)
    assert_same_run(one, two)


def test_token_budget_batches_split_across_processes(tmp_path):
    """With max_tokens_per_batch each process takes every other batch of the same order, so 2 processes
    equal 1 process accumulating 2 of those batches."""
    one = launch(tmp_path, "one", 1, 1, 2, 3, "--max-tokens", "150")
    two = launch(tmp_path, "two", 2, 1, 1, 3, "--max-tokens", "150")
    assert_same_run(one, two)


def test_fsdp2_with_the_chunked_head_equals_one_process(tmp_path):
    """FSDP2 full shard over 2 processes: the chunked head sees the whole (unsharded) head weight and its
    gradient reaches FSDP's reduce-scatter, so the run equals 1 process with the same global batch."""
    one = launch(tmp_path, "one", processes=1, batch=4)
    fsdp = launch(tmp_path, "fsdp", 2, 2, 1, 3, "--fsdp")
    assert (tmp_path / "fsdp" / "head.txt").read_text() == "chunked"
    assert_same_run(one, fsdp)
