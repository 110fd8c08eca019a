"""Correctness checks that need a CUDA GPU, for the code paths the CPU test suite cannot train through.

The suite proves every batch layout equal to padded rows on the CPU; on a GPU the attention kernels
differ (sdpa's memory-efficient kernel with our boolean mask; flex attention's Triton kernel with our
block mask, which has no CPU backward at all; Liger's Triton RMSNorm / SwiGLU / RoPE). Each check
builds a tiny seed-built model in fp32 (TF32 off), scores the same six pairs of the shipped data in
padded rows and in the packed shared-prefix layout (or with and without Liger), and compares
log-probs, loss and every parameter's gradient.

Usage (on a machine with a CUDA device)::

    python benchmarks/gpu_check.py [--json out.json]

Exit status 1 if any difference exceeds its tolerance; checks whose backend is missing are listed as
skipped with the reason. ``--device cpu`` runs the sdpa checks only (the suite runs it so the script
never rots).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile

import torch

# fp32 with TF32 off: only the kernels' summation order differs between the runs compared
TOLERANCE = {"logps": 1e-4, "loss": 1e-5, "grad": 1e-4}


def _trainer(model, out: str, **options):
    from orpo import ORPOConfig, ORPOTrainer
    from orpo.demo import demo_tokenizer, load_demo_dataset

    args = ORPOConfig(
        output_dir=out,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        orpo_alpha=0.5,
        nll_include_prompt=False,
        **options,
    )
    dataset = load_demo_dataset("train").select(range(6))
    return ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=demo_tokenizer())


def _score(trainer, model) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    logps, _ = trainer.scored_logprobs(model, batch)
    loss = trainer.compute_loss(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    return logps.detach(), loss.detach(), [g.detach() for g in torch.autograd.grad(loss, params)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def compare(reference, candidate) -> dict[str, float]:
    (logps_a, loss_a, grads_a), (logps_b, loss_b, grads_b) = reference, candidate
    return {
        "logps": (logps_a - logps_b).abs().max().item(),
        "loss": abs(loss_a.item() - loss_b.item()) / abs(loss_a.item()),
        "grad": max(_relative(b, a) for a, b in zip(grads_a, grads_b, strict=True)),
    }


def layout_check(family: str, attn: str, device: str) -> dict[str, float]:
    """Packed shared-prefix rows vs padded rows on one model with ``attn`` attention."""
    from orpo.demo import tiny_model

    model = tiny_model(
        seed=0, model_type=family, attn_implementation=attn, num_key_value_heads=1, tie_word_embeddings=False
    ).to(device)
    with tempfile.TemporaryDirectory() as out:
        padded = _trainer(model, out, padding_free=False, prefix_sharing=False)
        shared = _trainer(model, out, padding_free=True, prefix_sharing=True)
        assert shared.layout.shared and shared.layout.packed
        return compare(_score(padded, model), _score(shared, model))


def liger_check(family: str, device: str) -> dict[str, float]:
    """The default layout with and without Liger's kernels patched into the model (as
    ``use_liger_kernel`` does at the start of training)."""
    from transformers.integrations.liger import apply_liger_kernel

    from orpo.demo import tiny_model

    results = []
    for liger in (False, True):
        model = tiny_model(seed=0, model_type=family, tie_word_embeddings=False).to(device)
        with tempfile.TemporaryDirectory() as out:
            trainer = _trainer(model, out)
            if liger:
                apply_liger_kernel(model, {})
            results.append(_score(trainer, model))
    return compare(*results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA device (--device cpu runs the sdpa checks only)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    on_cpu = "flex attention and Liger train on GPUs only"
    no_liger = "liger-kernel is not installed (pip install -e '.[bench]')"
    checks = {}
    for family in ("llama", "qwen2"):
        checks[f"{family} sdpa: packed shared-prefix vs padded"] = lambda f=family: layout_check(
            f, "sdpa", device
        )
        checks[f"{family} flex_attention: packed shared-prefix vs padded"] = (
            on_cpu if device == "cpu" else lambda f=family: layout_check(f, "flex_attention", device)
        )
        checks[f"{family}: use_liger_kernel vs without"] = (
            on_cpu
            if device == "cpu"
            else no_liger
            if importlib.util.find_spec("liger_kernel") is None
            else lambda f=family: liger_check(f, device)
        )
    results, failed = {}, False
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; tolerances {TOLERANCE}")
    for name, check in checks.items():
        if isinstance(check, str):
            results[name] = {"skipped": check}
            print(f"SKIP {name}: {check}")
            continue
        try:
            differences = check()
        except Exception as err:  # e.g. the layout check refusing a backend: report it, run the rest
            failed = True
            results[name] = {"error": f"{type(err).__name__}: {err}", "ok": False}
            print(f"FAIL {name}: {type(err).__name__}: {err}")
            continue
        ok = all(differences[k] <= TOLERANCE[k] for k in TOLERANCE)
        failed |= not ok
        results[name] = {**differences, "ok": ok}
        shown = ", ".join(f"{k} {v:.2e}" for k, v in differences.items())
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {shown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
