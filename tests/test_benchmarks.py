"""The benchmark scripts run end to end on their micro presets (so they never rot), and the
implementations they compare agree on the loss."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark scripts (TRL side by side, sharded heads)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script, *args, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_head_micro_all_variants_agree_on_the_loss(tmp_path):
    variants = ["orpo", "orpo-unfused", "naive"]
    if importlib.util.find_spec("liger_kernel") is not None:
        variants.append("liger")  # the compiled variant takes a minute to compile: not here
    result, stdout = run(
        "bench_head.py", "--preset", "micro", "--repeats", "1", "--variants", *variants, tmp_path=tmp_path
    )
    point = result["results"]["2x32x1000"]
    assert set(point) == set(variants)
    losses = [point[v]["loss"] for v in variants]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])
    assert all(point[v]["best_seconds"] > 0 for v in variants)
    assert "ratios are orpo / variant" in stdout


@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None, reason="trl is not installed (pip install -e '.[test]')"
)
def test_bench_vs_trl_micro_runs_both_trainers_and_the_losses_agree(tmp_path):
    orpo_variants = ["orpo-padded-full", "orpo-padded", "orpo-packed", "orpo-shared", "orpo"]
    result, stdout = run(
        "bench_vs_trl.py",
        "--scenario",
        "micro",
        "--repeats",
        "1",
        "--check-loss",
        "--impls",
        *orpo_variants,
        "orpo-budget",
        "trl",
        tmp_path=tmp_path,
    )
    micro = result["results"]["micro (vocab 1000)"]
    for impl in (*orpo_variants, "orpo-budget", "trl"):
        assert micro[impl]["best_tokens_per_s"] > 0
        assert len(micro[impl]["runs"]) == 1
    # The ablation's variants train on the same batches: layouts and head change the cost, not the loss.
    losses = [micro[impl]["runs"][0]["train_loss"] for impl in orpo_variants]
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0])
    fractions = {impl: micro[impl]["padding_fraction"] for impl in (*orpo_variants, "orpo-budget")}
    assert (
        fractions["orpo-padded"] >= fractions["orpo-packed"] and fractions["orpo-padded"] > fractions["orpo"]
    )
    assert fractions["orpo-budget"] < fractions["orpo"]  # length-grouped batches pad less
    # Same model, same batch, orpo with nll_include_prompt=True: TRL's objective, to fp32 rounding.
    assert micro["loss_check"]["relative_difference"] <= 1e-5
    assert "speed orpo/TRL" in stdout


def test_bench_sharded_head_runs_both_heads_side_by_side():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_sharded_head.py"), "--engines", "ddp", "--vocab", "2000"]
        + ["--steps", "1", "--batch", "2", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {tuple(line.split()[:2]) for line in proc.stdout.splitlines() if line.strip().startswith("ddp")}
    assert {("ddp", "chunked"), ("ddp", "model")} <= rows
    assert "ddp chunked/model: peak memory" in proc.stdout


def test_gpu_check_runs_its_sdpa_checks_on_the_cpu(tmp_path):
    result, stdout = run("gpu_check.py", "--device", "cpu", tmp_path=tmp_path)
    sdpa = [name for name in result if " sdpa:" in name]
    assert len(sdpa) == 2 and all(result[name]["ok"] for name in sdpa)
    assert all("GPUs only" in result[name]["skipped"] for name in result if name not in sdpa)
    assert "ok   llama sdpa: packed shared-prefix vs padded" in stdout


def test_mfu_ceiling_counts_the_models_own_matmuls(tmp_path):
    """The ceiling's FLOPs come from the scenario model's real linear layers (q, k, v, o, MLP, head), and
    the 0.5B scenario is Qwen2-0.5B's shape."""
    sys.path.insert(0, str(BENCHMARKS))
    import torch
    from bench_mfu_ceiling import scenario_shape
    from bench_vs_trl import SCENARIOS, model_flops_per_token, scenario_model

    for name in ("gpu-0.5b", "micro", "small-vocab"):
        s = SCENARIOS[name]
        with torch.device("meta"):
            model = scenario_model(s, s.vocab_sizes[0])
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        config, shapes = scenario_shape(s)
        assert sum(i * o for i, o in shapes) == linear
        assert len(shapes) == 7 * config.num_hidden_layers + 1  # q, k, v, o, gate, up, down; the head
        if name == "gpu-0.5b":  # Qwen2-0.5B: 494,032,768 parameters, the embedding tied to the head
            assert sum(p.numel() for p in model.parameters()) == 494_032_768
        # bench_vs_trl's MFU counts the same matmuls (and the norms' and biases' few parameters), not
        # an untied input embedding, which is a lookup
        extra = model_flops_per_token(model, 0) / 6 - linear
        assert 0 <= extra < 0.01 * linear
    result, stdout = run(
        "bench_mfu_ceiling.py",
        "--scenario",
        "micro",
        "--tokens",
        "128",
        "--length",
        "32",
        "--repeats",
        "1",
        tmp_path=tmp_path,
    )
    (r,) = result["results"]
    assert r["linear_seconds"] > 0 and r["attention_seconds"] > 0 and r["step_tflops"] > 0
    assert "matmuls and attention alone" in stdout


def test_gpu_session_script_parses_and_names_real_variants():
    """benchmarks/gpu_session.sh runs only where a GPU is lent: here, its syntax, its time limits (under
    the device tool's 600 s per call) and the variants it names are checked."""
    import re

    sys.path.insert(0, str(BENCHMARKS))
    from bench_vs_trl import ORPO_VARIANTS

    script = BENCHMARKS / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert sum(int(s) for s in re.findall(r"^part \S+ (\d+)", text, re.M)) <= 560
    named = {v for group in re.findall(r"--impls ((?:[\w-]+ )+)--json", text) for v in group.split()}
    assert {"orpo-flex", "orpo-liger", "orpo-compiled", "orpo", "trl"} <= named <= {*ORPO_VARIANTS, "trl"}
