"""Padding-free packing gives the padded layout's log-probs, loss and gradients, per model family and
attention backend; a mask that lets packed sequences see each other is an error, not a wrong result."""

import re

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from conftest import family_model
from orpo import ORPOConfig, ORPOTrainer
from orpo.errors import OrpoError

FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config}

# Flex attention compiles its block mask on first use (~15 s on 2 cores): those cases are in the slow set.
FLEX = pytest.param("flex_attention", marks=pytest.mark.slow)


def tiny(family, attn, seed=0):
    return family_model(
        FAMILIES[family],
        seed=seed,
        attn_implementation=attn,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )


def trainer_for(tmp_path, model, tokenizer, dataset, **kwargs):
    args = ORPOConfig(
        **{
            "output_dir": str(tmp_path / "out"),
            "report_to": "none",
            "save_strategy": "no",
            "disable_tqdm": True,
            "bf16": False,  # exactness at fp32 (bf16 is the default on a CPU with native bf16)
            **kwargs,
        }
    )
    return ORPOTrainer(model=model, args=args, train_dataset=dataset, tokenizer=tokenizer)


@pytest.fixture
def skewed_dataset():
    from datasets import Dataset

    rows = [
        {"prompt": "p" * n, "chosen": "c" * m, "rejected": "r" * k}
        for n, m, k in [(3, 2, 5), (40, 1, 3), (1, 30, 2), (12, 7, 7), (2, 2, 60), (25, 4, 1)]
    ]
    return Dataset.from_list(rows)


# (padding_free, prefix_sharing) of each layout besides padded rows.
LAYOUTS = {
    "packed": {"padding_free": True, "prefix_sharing": False},
    "shared": {"padding_free": False, "prefix_sharing": True},
    "packed-shared": {"padding_free": True, "prefix_sharing": True},
}
PADDED = {"padding_free": False, "prefix_sharing": False}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("include_prompt", [False, True])
def test_layout_equals_padded(tmp_path, tokenizer, skewed_dataset, layout, family, attn, include_prompt):
    """Per-token log-probs, loss and gradients of a layout equal the padded layout's."""
    model = tiny(family, attn)
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for name, options in (("padded", PADDED), (layout, LAYOUTS[layout])):
        trainer = trainer_for(
            tmp_path,
            model,
            tokenizer,
            skewed_dataset,
            nll_include_prompt=include_prompt,
            orpo_alpha=0.5,
            **options,
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
        rows = batch["input_ids"].shape[0]
        if name == "packed":
            assert "position_ids" in batch and "attention_mask" not in batch and rows < 12
        if name == "shared":
            assert rows == 6  # one row per pair
        if name == "packed-shared":
            assert rows < 6  # pairs share rows
        real = int(batch["attention_mask"].sum()) if name == "padded" else None
        results.setdefault("real", real)
        # every layout counts the same real tokens, but shared prefixes count each prompt once
        if name != "padded" and "segment_ids" not in batch:
            assert int(batch["num_tokens"]) == results["real"]
        logps, _ = trainer.scored_logprobs(model, batch)
        loss = trainer.compute_loss(model, batch)
        results[name] = (logps.detach(), loss, torch.autograd.grad(loss, params))
    (logps_a, loss_a, grads_a), (logps_b, loss_b, grads_b) = results["padded"], results[layout]
    assert torch.allclose(logps_a, logps_b, atol=1e-5)
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.fixture
def eager_flex(monkeypatch):
    """Flex attention run without torch's compiler (the same numbers as its fused kernel, within
    rounding): on the CPU the compiler fails on some masks (a C++ error on transformers' own
    packed-sequence mask), and flex attention has no backward there, so these tests check forward
    results only."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as integration

    def uncompiled(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(integration, "compile_friendly_flex_attention", uncompiled)


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flex_attention_layout_equals_padded(tmp_path, tokenizer, skewed_dataset, eager_flex, layout, family):
    """Flex attention takes the shared-prefix rows as a block mask: log-probs and loss equal the padded
    layout's (forward only, see ``eager_flex``; ``benchmarks/gpu_check.py`` compares gradients on a GPU)."""
    model = tiny(family, "flex_attention")
    results = {}
    for name, options in (("padded", PADDED), (layout, LAYOUTS[layout])):
        trainer = trainer_for(tmp_path, model, tokenizer, skewed_dataset, orpo_alpha=0.5, **options)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
        with torch.no_grad():
            results[name] = trainer.scored_logprobs(model, batch)[0], trainer.compute_loss(model, batch)
    (logps_a, loss_a), (logps_b, loss_b) = results["padded"], results[layout]
    assert torch.allclose(logps_a, logps_b, atol=1e-5)
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)


def test_packed_rows_are_fewer_and_no_longer_than_padded_rows(tmp_path, tokenizer, skewed_dataset):
    trainer = trainer_for(tmp_path, tiny("llama", "sdpa"), tokenizer, skewed_dataset, **LAYOUTS["packed"])
    features = [trainer.train_dataset[i] for i in range(6)]
    packed = trainer.data_collator(features)
    padded = trainer_for(tmp_path, tiny("llama", "sdpa"), tokenizer, skewed_dataset, **PADDED).data_collator(
        features
    )
    lengths = padded["attention_mask"].sum(1)
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1] == int(lengths.max())
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # skewed lengths pack well
    real = int(lengths.sum())
    assert packed["input_ids"].numel() - real < padded["input_ids"].numel() - real  # less padding
    # every real token appears once, at its restarting position
    flat_ids, flat_pos = packed["input_ids"].flatten(), packed["position_ids"].flatten()
    assert torch.equal(flat_ids[packed["score_positions"] + 1], packed["score_targets"])
    assert torch.equal(
        flat_pos[packed["score_positions"] + 1], padded["score_positions"] % padded["input_ids"].shape[1] + 1
    )


# ---- prompt prefix sharing ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["shared", "packed-shared"])
@pytest.mark.parametrize("attn", ["eager", "sdpa", FLEX])
def test_rejected_never_sees_chosen(tmp_path, tokenizer, skewed_dataset, eager_flex, attn, layout):
    model = tiny("llama", attn)
    trainer = trainer_for(tmp_path, model, tokenizer, skewed_dataset, **LAYOUTS[layout])
    features = [trainer.train_dataset[i] for i in range(6)]
    changed = [
        {**f, "chosen_input_ids": [(t * 7 + 3) % 259 for t in f["chosen_input_ids"]]} for f in features
    ]
    with torch.no_grad():
        a, _ = trainer.scored_logprobs(model, trainer.data_collator(features))
        b, _ = trainer.scored_logprobs(model, trainer.data_collator(changed))
    rejected = ~trainer.data_collator(features)["score_chosen"]
    assert torch.equal(a[rejected], b[rejected])  # not one bit of chosen reaches a rejected log-prob
    assert not torch.allclose(a[~rejected], b[~rejected])  # (chosen did change)


def test_packed_pairs_never_see_each_other(tmp_path, tokenizer, skewed_dataset):
    model = tiny("llama", "sdpa")
    trainer = trainer_for(tmp_path, model, tokenizer, skewed_dataset, **LAYOUTS["packed-shared"])
    features = [trainer.train_dataset[i] for i in range(6)]
    batch = trainer.data_collator(features)
    row_of_token = batch["score_positions"] // batch["input_ids"].shape[1]
    # a pair that shares its row with another pair is kept; every other pair changes entirely
    kept = next(
        pair
        for pair in range(6)
        if int((batch["segment_ids"][row_of_token[batch["score_pair"] == pair][0]] // 3).max()) >= 1
    )
    changed = [
        f
        if i == kept
        else {k: [(t * 7 + 3) % 259 for t in v] if k.endswith("input_ids") else v for k, v in f.items()}
        for i, f in enumerate(features)
    ]
    with torch.no_grad():
        a, _ = trainer.scored_logprobs(model, batch)
        b, _ = trainer.scored_logprobs(model, trainer.data_collator(changed))
    assert torch.equal(
        trainer.data_collator(changed)["score_positions"], batch["score_positions"]
    )  # same places
    same = batch["score_pair"] == kept
    assert torch.equal(a[same], b[same])
    assert not torch.allclose(a[~same], b[~same])


# ---- choosing the layout -------------------------------------------------------------------------------

IGNORE_PACKING = ("transformers.masking_utils", "find_packed_sequence_indices", lambda position_ids: None)
IGNORE_SHARED_MASK = ("orpo.layouts", "shared_prefix_mask", lambda segment_ids, impl, dtype: None)


def _patch(monkeypatch, *patches):
    import importlib

    for module, name, replacement in patches:
        monkeypatch.setattr(importlib.import_module(module), name, replacement)


@pytest.mark.parametrize("attn", ["sdpa", "eager", FLEX])
def test_default_is_the_fastest_exact_layout(tmp_path, tokenizer, skewed_dataset, eager_flex, attn):
    trainer = trainer_for(tmp_path, tiny("llama", attn), tokenizer, skewed_dataset)
    assert (trainer.layout.packed, trainer.layout.shared) == tuple(LAYOUTS["packed-shared"].values())
    assert trainer.layout.description == "shared prompt prefix, pairs packed into rows"


@pytest.mark.parametrize(
    "patches,expected",
    [
        ((IGNORE_SHARED_MASK,), "padding-free packed rows"),
        ((IGNORE_SHARED_MASK, IGNORE_PACKING), "padded rows"),
    ],
    ids=["mask-ignored", "mask-and-packing-ignored"],
)
def test_default_falls_back_when_the_model_leaks(
    tmp_path, tokenizer, skewed_dataset, monkeypatch, patches, expected
):
    _patch(monkeypatch, *patches)
    with pytest.warns(UserWarning, match="does not keep this layout exact"):
        trainer = trainer_for(tmp_path, tiny("llama", "sdpa"), tokenizer, skewed_dataset)
    assert trainer.layout.description == expected


def test_default_keeps_to_supported_backends(tmp_path, tokenizer, skewed_dataset, monkeypatch):
    import orpo.layouts

    # flash attention cannot take our mask; stand in for it by taking sdpa off the supported list
    monkeypatch.setattr(orpo.layouts, "PREFIX_SHARING_BACKENDS", ("eager",))
    trainer = trainer_for(tmp_path, tiny("llama", "sdpa"), tokenizer, skewed_dataset)
    assert trainer.layout.description == "padding-free packed rows"
    with pytest.raises(
        OrpoError, match="prefix_sharing: llama with attn_implementation='sdpa' is not supported"
    ):
        trainer_for(tmp_path, tiny("llama", "sdpa"), tokenizer, skewed_dataset, prefix_sharing=True)


@pytest.mark.parametrize(
    "layout,patch,message",
    [
        (
            "packed",
            IGNORE_PACKING,
            "padding_free=true, prefix_sharing=false: llama with attn_implementation='sdpa' does not keep this "
            "layout exact (packed sequences attend to each other",
        ),
        (
            "shared",
            IGNORE_SHARED_MASK,
            "padding_free=false, prefix_sharing=true: llama with attn_implementation='sdpa' does not keep this "
            "layout exact (rejected tokens see chosen ones",
        ),
    ],
    ids=["packing-leak", "ignored-shared-mask"],
)
def test_a_layout_asked_for_that_the_model_does_not_honour_is_an_error(
    tmp_path, tokenizer, skewed_dataset, monkeypatch, layout, patch, message
):
    _patch(monkeypatch, patch)
    with pytest.raises(OrpoError, match=re.escape(message)):
        trainer_for(tmp_path, tiny("llama", "sdpa"), tokenizer, skewed_dataset, **LAYOUTS[layout])


def test_engine_models_choose_on_their_first_layers_and_check_the_whole_model_on_the_first_batch(
    tmp_path, tokenizer, skewed_dataset, monkeypatch
):
    """Under FSDP / DeepSpeed the model runs whole only once the engine has prepared it: at construction
    the layout is chosen on its first decoder layers (auto picks the fastest exact one, a leak falls
    back or, asked for, is an error), and the whole prepared model is checked on the first batch."""
    monkeypatch.setattr(ORPOTrainer, "_engine_prepares_model", lambda self: True)
    model = tiny("llama", "sdpa")
    trainer = trainer_for(tmp_path, model, tokenizer, skewed_dataset)
    assert trainer.layout.description == "shared prompt prefix, pairs packed into rows"
    # a model that turns out not to honour the layout once prepared: caught on the first batch
    _patch(monkeypatch, IGNORE_SHARED_MASK)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    with pytest.raises(OrpoError, match="rejected tokens see chosen ones"):
        trainer.compute_loss(model, batch)
    # a leak the first layers show: auto falls back at construction, a layout asked for is an error
    _patch(monkeypatch, IGNORE_PACKING)
    with pytest.warns(UserWarning, match="trying the next layout"):
        trainer = trainer_for(tmp_path, tiny("llama", "sdpa"), tokenizer, skewed_dataset)
    assert trainer.layout.description == "padded rows"
    with pytest.raises(OrpoError, match="packed sequences attend to each other"):
        trainer_for(tmp_path, tiny("llama", "sdpa"), tokenizer, skewed_dataset, **LAYOUTS["packed"])


def test_engine_models_not_at_hand_check_the_layout_on_the_first_batch(
    tmp_path, tokenizer, skewed_dataset, monkeypatch
):
    """Parameters not at hand at construction (meta on some processes, ZeRO-3 partitions): auto means
    padded, and a layout asked for is checked on the first batch."""
    import orpo.layout_proof

    monkeypatch.setattr(ORPOTrainer, "_engine_prepares_model", lambda self: True)
    monkeypatch.setattr(orpo.layout_proof, "probe_ready", lambda model: False)
    assert (
        trainer_for(tmp_path, tiny("llama", "sdpa"), tokenizer, skewed_dataset).layout.description
        == "padded rows"
    )
    _patch(monkeypatch, IGNORE_PACKING)
    model = tiny("llama", "sdpa")
    trainer = trainer_for(tmp_path, model, tokenizer, skewed_dataset, **LAYOUTS["packed"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    with pytest.raises(OrpoError, match="packed sequences attend to each other"):
        trainer.compute_loss(model, batch)


def test_first_layers_keeps_the_first_layers_and_one_of_each_attention_type():
    from transformers import Gemma2Config

    from orpo.layout_proof import first_layers

    types = ["sliding_attention"] * 5 + ["full_attention"]
    model = family_model(
        Gemma2Config, layers=6, num_key_value_heads=1, head_dim=16, layer_types=types, sliding_window=4
    )
    layers = list(model.model.layers)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with first_layers(model):
        assert list(model.model.layers) == [layers[0], layers[1], layers[5]]
        assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
        assert model.config.num_hidden_layers == 3
        model(input_ids=ids, use_cache=False)  # runs (the layout check uses no cache)
    assert list(model.model.layers) == layers and model.config.num_hidden_layers == 6
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_training_run(tmp_path, tokenizer, skewed_dataset, layout):
    model = tiny("qwen2", "sdpa")
    trainer = trainer_for(
        tmp_path,
        model,
        tokenizer,
        skewed_dataset,
        max_steps=2,
        per_device_train_batch_size=3,
        **LAYOUTS[layout],
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_without_data_to_check_on_the_default_is_padded(tokenizer, tmp_path):
    args = ORPOConfig(output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True)
    assert ORPOTrainer(model=tiny("llama", "sdpa"), args=args, tokenizer=tokenizer).layout.description == (
        "padded rows"
    )
