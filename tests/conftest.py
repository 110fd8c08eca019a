"""Shared fixtures: a tiny model built from a config and the shipped tokenizer; nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "ORPO_CACHE_DIR" not in os.environ:  # keep the tests' tokenization cache out of the user's home
    import tempfile

    os.environ["ORPO_CACHE_DIR"] = tempfile.mkdtemp(prefix="orpo-test-cache-")

from orpo.demo import demo_tokenizer, tiny_model  # noqa: E402

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
)


# Logged metrics that equivalent runs (accumulation, processes, layouts) must agree on.
STEP_METRICS = (
    "loss",
    "nll_loss",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "log_odds_ratio",
    "logits/chosen",
)


# Bad ORPO option values and the message each gives, from Python (tests/test_config.py) and from a config
# file through `orpo train` (tests/test_bad_inputs.py).
BAD_OPTION_VALUES = [
    ({"orpo_alpha": -1.0}, "orpo_alpha must be >= 0"),
    ({"orpo_beta": 0.0}, "orpo_beta must be > 0"),
    ({"max_length": 0}, "max_length must be a positive"),
    ({"max_length": 256, "max_prompt_length": 256}, "max_prompt_length (256) must be smaller"),
    ({"logprob_chunk_size": 0}, "logprob_chunk_size must be >= 1"),
    ({"nan_policy": "ignore"}, "nan_policy must be 'error' or 'skip'"),
    ({"divergence_factor": 0.5}, "divergence_factor must be a number above 1"),
]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)


def orpo_args(tmp_path, **kwargs):
    """An ORPOConfig for a test run: output under ``tmp_path``, no reporting, saving or progress bar, a log
    every step, fp32 (the exactness checks compare with the model's own fp32 forward; on a CPU with native
    bf16 the default would be bf16 autocast: tests/test_precision.py covers that); ``kwargs`` override."""
    from orpo import ORPOConfig

    base = dict(
        bf16=False,
        output_dir=str(tmp_path / "out"),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    return ORPOConfig(**{**base, **kwargs})


def padded_args(tmp_path, **kwargs):
    """Padded rows unless a test asks for another layout: the head and loss checks compare against the
    model's own forward on padded rows (tests/test_layouts.py compares every layout with padded rows)."""
    return orpo_args(tmp_path, **{"padding_free": False, "prefix_sharing": False, "seed": 0, **kwargs})


def batch_for(trainer, n=6, **collator_kwargs):
    """The first ``n`` training pairs collated (by the trainer's collator, or its type with other options)."""
    features = [trainer.train_dataset[i] for i in range(n)]
    collator = trainer.data_collator
    if collator_kwargs:
        collator = type(collator)(collator.pad_token_id, collator.nll_include_prompt, **collator_kwargs)
    return collator(features)


def reference_logps(model, batch):
    """The scored tokens' log-probs from the model's own full logits on a padded batch."""
    from orpo.logprobs import full_target_logprobs

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    flat = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["score_positions"])
    return full_target_logprobs(flat, batch["score_targets"])[0]


def demo_train_argv(output_dir, *flags: str, **options) -> list[str]:
    """``orpo train`` arguments for the demo model on the held-out demo data, without a progress bar;
    ``options`` become ``--key value``, ``flags`` (e.g. ``--resume``) are appended as they are."""
    argv = ["train", "--model", "demo", "--dataset", "demo:test", "--output-dir", str(output_dir)]
    argv += ["--disable_tqdm", "true"]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return [*argv, *flags]


@pytest.fixture
def tokenizer():
    return demo_tokenizer()


def make_model(seed: int = 0, **overrides):
    """A ~25k-parameter Llama from the demo config (fp32, eval-free, dropout-free)."""
    return tiny_model(seed=seed, **{**TINY, **overrides})


def family_model(
    config_class, seed: int = 0, attn_implementation: str | None = None, layers: int = 2, **special
):
    """A tiny model of any family (config class), e.g. to test its logit transform or attention masks."""
    from transformers import AutoModelForCausalLM

    config = config_class(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
        **special,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


@pytest.fixture
def model():
    return make_model()


def toy_rows(n: int = 32, seed: int = 0) -> list[dict]:
    """Addition prompts with variable lengths; the rejected answer is off by one."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = (
            int(x)
            for x in torch.randint(0, 10 ** int(torch.randint(1, 4, (1,), generator=g)), (2,), generator=g)
        )
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)})
    return rows


@pytest.fixture
def toy_dataset():
    return Dataset.from_list(toy_rows())
