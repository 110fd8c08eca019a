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

pytestmark = pytest.mark.slow

RUN = Path(__file__).resolve().parent / "distributed_run.py"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
PACKED_SHARED = "shared prompt prefix, pairs packed into rows"


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
    logged = json.loads((out / "history.json").read_text())
    history = [h for h in logged if "loss" in h]
    saved = out / "adapter_model.safetensors"  # a LoRA run saves the adapter only
    weights = load_file(str(saved if saved.exists() else out / "model.safetensors"))
    # with --eval: the evaluations during training (in the history) and the one after it
    evaluations = [h for h in logged if "eval_loss" in h]
    evaluations.append(json.loads((out / "eval.json").read_text()))
    generations = out / "eval_generations.jsonl"  # with --generate: written by the first process only
    if generations.exists():
        evaluations.append([json.loads(line) for line in generations.read_text().splitlines()])
    return history, weights, evaluations


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1-process runs, each launched once per module and shared by the tests that compare with it."""
    runs = {}

    def run(batch, accum=1, steps=3, *extra):
        key = (batch, accum, steps, *extra)
        if key not in runs:
            runs[key] = launch(tmp_path_factory.mktemp("reference"), "one", 1, batch, accum, steps, *extra)
        return runs[key]

    return run


def assert_same_run(a, b):
    (history_a, weights_a, evaluations_a), (history_b, weights_b, evaluations_b) = a, b
    assert len(history_a) == len(history_b) > 0
    assert len(evaluations_a) == len(evaluations_b)
    for step_a, step_b in zip(history_a, history_b, strict=True):
        for name in STEP_METRICS:
            # abs: margins and log-odds are differences of O(1) terms, so their float32 noise (other
            # summation orders) is absolute, ~1e-7 of the terms, however small the difference
            assert step_a[name] == pytest.approx(step_b[name], rel=1e-5, abs=1e-6), (step_a["step"], name)
    for eval_a, eval_b in zip(evaluations_a, evaluations_b, strict=True):
        if isinstance(eval_a, list):  # generate_during_eval's rows: the same prompts and completions
            assert eval_a == eval_b and all(row["completion"] for row in eval_a)
            continue
        for name in STEP_METRICS:
            key = f"eval_{name}"
            if key in eval_a or key in eval_b:
                assert eval_a[key] == pytest.approx(eval_b[key], rel=1e-5, abs=1e-6), key
    # the same names: a tied head weight is saved once, whatever state dict the engine gathered
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.allclose(weights_a[name], weights_b[name], rtol=1e-5, atol=1e-7), name


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, reference):
    one = reference(4)
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


@pytest.mark.parametrize(
    "flags",
    [("--eval", "--generate"), ("--untied", "--unfused"), ("--lora",)],
    ids=["tied-head-fused-eval-generate", "own-head-unfused", "lora"],
)
def test_fsdp2_full_shard_with_the_chunked_head_equals_one_process(tmp_path, reference, flags):
    """FSDP2 full shard over 2 processes (really sharded: see distributed_run.run_fsdp_on_cpu) equals
    1 process with the same global batch. accelerate puts the LM head in the last FSDP unit, which stays
    unsharded from the forward to the backward: the chunked head sees the whole weight, and its
    gradient reaches FSDP's reduce-scatter. Evaluation (during and after training) equals too."""
    one = reference(4, 1, 3, *[f for f in flags if f in ("--untied", "--lora", "--eval", "--generate")])
    fsdp = launch(tmp_path, "fsdp", 2, 2, 1, 3, "--fsdp", *flags)
    assert (tmp_path / "fsdp" / "engine.txt").read_text() == "fsdp2"
    assert (tmp_path / "fsdp" / "head.txt").read_text() == "chunked"
    assert (tmp_path / "fsdp" / "layout.txt").read_text() == PACKED_SHARED  # checked before sharding
    assert_same_run(one, fsdp)


def _needs_deepspeed():
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional: pip install deepspeed)")


def test_deepspeed_zero2_equals_one_process(tmp_path, reference):
    """ZeRO-2 (gradients and optimizer state sharded) through the Trainer's DeepSpeed integration, on
    DeepSpeed's CPU accelerator with gloo: 2 processes equal 1 process without DeepSpeed."""
    _needs_deepspeed()
    one = reference(4)
    zero2 = launch(tmp_path, "zero2", 2, 2, 1, 3, "--zero", "2")
    assert (tmp_path / "zero2" / "head.txt").read_text() == "chunked"
    assert (tmp_path / "zero2" / "layout.txt").read_text() == PACKED_SHARED
    assert_same_run(one, zero2)


@pytest.mark.parametrize(
    "flags",
    [
        ("--untied",),
        ("--untied", "--unfused"),
        ("--packed-shared", "--gradient-checkpointing", "--eval", "--generate"),
    ],
    ids=["own-head-fused", "own-head-unfused", "tied-head-packed-shared-checkpointing-eval-generate"],
)
def test_deepspeed_zero3_gathers_the_head_for_the_chunked_head(tmp_path, reference, flags):
    """ZeRO-3 partitions every parameter (the harness sets no persistence threshold): the chunked head
    runs as a call of the head module, so DeepSpeed gathers its weight for the forward and for the
    backward; its gradient reaches ZeRO's reduce-scatter, and 2 processes equal 1 process. A head
    weight of its own (untied) is the case a plain gather would break: its gradient is accumulated
    right after the head's backward, when the weight must still be whole. Evaluation equals too."""
    _needs_deepspeed()
    # the reference: 1 process, the same model, default layout, fused head, no checkpointing (none of
    # which change results)
    one = reference(4, 1, 3, *[f for f in flags if f in ("--untied", "--eval", "--generate")])
    zero3 = launch(tmp_path, "zero3", 2, 2, 1, 3, "--zero", "3", *flags)
    assert (tmp_path / "zero3" / "head.txt").read_text() == "chunked"
    # asked for or not: checked on the first layers before partitioning, on the whole model after
    assert (tmp_path / "zero3" / "layout.txt").read_text() == PACKED_SHARED
    assert_same_run(one, zero3)


def test_deepspeed_zero3_lora_on_a_base_partitioned_as_it_loads(tmp_path):
    """The `orpo train` path under ZeRO-3: the base is loaded by path after the config, so transformers
    partitions it as it loads (zero.Init), then the LoRA adapter is added; the run and the saved adapter
    equal 1 process's (the adapter's initial weights come from the seed, not from the loading's random
    draws)."""
    _needs_deepspeed()
    base = tmp_path / "base"
    make_model(seed=3).save_pretrained(base)
    one = launch(tmp_path, "one", 1, 4, 1, 3, "--lora", "--model-dir", str(base))
    zero3 = launch(tmp_path, "zero3", 2, 2, 1, 3, "--zero", "3", "--lora", "--model-dir", str(base))
    assert (tmp_path / "zero3" / "partitioned_at_load.txt").read_text() == "True"
    # checked at construction on the first layers, gathered from their partitions
    assert (tmp_path / "zero3" / "layout.txt").read_text() == PACKED_SHARED
    assert (tmp_path / "one" / "partitioned_at_load.txt").read_text() == "False"
    assert_same_run(one, zero3)


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # the README's two-CPU-process command
    "accelerate": ["-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "ddp-cpu.yaml")],
}


CLI_RUN = (
    "model: demo\ndatasets: [demo:train]\nmax_steps: 3\nlogging_steps: 1\nmax_length: 64\n"
    "max_prompt_length: 32\nsave_strategy: 'no'\ndisable_tqdm: true\nseed: 7\n"
)
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def orpo_train(out: Path, launcher: list[str], batch: int) -> tuple[subprocess.CompletedProcess, list, dict]:
    """``orpo train`` as a user runs it (a subprocess, under ``launcher``): its output, the logged steps
    and the final weights."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(CLI_RUN + f"per_device_train_batch_size: {batch}\noutput_dir: {out}\n")
    cmd = [sys.executable, *launcher, "-m", "orpo", "train", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=CLI_ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return proc, [h for h in history if "loss" in h], load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process_cli(tmp_path_factory):
    """``orpo train`` in one process with the global batch of 2 processes × 2 pairs."""
    return orpo_train(tmp_path_factory.mktemp("cli") / "one", [], batch=4)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_orpo_train_under_a_launcher_is_one_data_parallel_job(tmp_path, launcher, one_process_cli):
    """The command line under torchrun and accelerate launch (the README's commands): 2 processes × batch 2
    train exactly like 1 process × batch 4 (per-step losses and metrics, epoch, final weights), and the exit
    is clean (orpo.guards.finish_processes: trainer released, barrier, process group destroyed; without it
    some runs abort at interpreter exit). Before the fix each process trained its own copy of the whole data
    (the epoch was half, the losses those of batch 2)."""
    proc, history, weights = orpo_train(tmp_path / "two", LAUNCHERS[launcher], batch=2)
    _, history_one, weights_one = one_process_cli
    assert "terminate called" not in proc.stderr
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in proc.stderr
    assert proc.stdout.count("final metrics:") == 2  # two processes trained; each reports the global metrics
    assert [h["step"] for h in history] == [h["step"] for h in history_one] == [1, 2, 3]
    for step, step_one in zip(history, history_one, strict=True):
        assert step["epoch"] == step_one["epoch"], step["step"]
        for name in STEP_METRICS:
            assert step[name] == pytest.approx(step_one[name], rel=1e-5, abs=1e-6), (step["step"], name)
    assert weights.keys() == weights_one.keys()
    for name in weights:
        assert torch.allclose(weights[name], weights_one[name], rtol=1e-5, atol=1e-7), name


def test_a_launch_whose_trainer_is_not_distributed_stops_before_training(tmp_path):
    """A script under torchrun that builds another TrainingArguments after its ORPOConfig (which resets
    accelerate's state to a single process on a machine without GPUs) is stopped with one message instead of
    training 2 unsynchronised copies."""
    script = tmp_path / "script.py"
    script.write_text(
        "from transformers import TrainingArguments\n"
        "from orpo import ORPOConfig, ORPOTrainer\n"
        "from orpo.demo import demo_tokenizer, load_demo_dataset, tiny_model\n"
        f"args = ORPOConfig(output_dir={str(tmp_path / 'out')!r}, max_steps=2, report_to='none')\n"
        "trainer = ORPOTrainer(model=tiny_model(), args=args, train_dataset=load_demo_dataset('train'),\n"
        "                      tokenizer=demo_tokenizer())\n"
        f"TrainingArguments(output_dir={str(tmp_path / 'other')!r})\n"
        "trainer.train()\n"
    )
    cmd = [sys.executable, *LAUNCHERS["torchrun"], str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=CLI_ENV)
    assert proc.returncode != 0
    assert proc.stderr.count("this process is one of 2 started by the launcher") == 2
    assert "each would train its own copy" in proc.stderr
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_finish_processes_destroys_the_process_group(tmp_path):
    import torch.distributed as dist

    from orpo.guards import finish_processes

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    finish_processes()
    assert not dist.is_initialized()
    finish_processes()  # and a no-op without a process group


def test_processes_agree_on_the_layout(tmp_path, reference):
    """Under an engine each process checks the layout itself; they take the most conservative choice,
    so one process that cannot check (here process 1) puts both on padded rows (their batches must be
    laid out alike, e.g. for token budgets), and the run still equals 1 process."""
    one = reference(4)
    both = launch(tmp_path, "both", 2, 2, 1, 3, "--fsdp", "--unready-rank", "1")
    assert (tmp_path / "both" / "layout.txt").read_text() == "padded rows"  # process 0's own choice: packed
    assert_same_run(one, both)
