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
        output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", disable_tqdm=True, **kwargs
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


@pytest.mark.parametrize("layout", ["padding_free", "prefix_sharing"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("include_prompt", [False, True])
def test_layout_equals_padded(tmp_path, tokenizer, skewed_dataset, layout, family, attn, include_prompt):
    """Per-token log-probs, loss and gradients of a layout equal the padded layout's."""
    model = tiny(family, attn)
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for on in (False, True):
        trainer = trainer_for(
            tmp_path,
            model,
            tokenizer,
            skewed_dataset,
            nll_include_prompt=include_prompt,
            orpo_alpha=0.5,
            **{layout: on},
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
        if on and layout == "padding_free":
            assert "position_ids" in batch and "attention_mask" not in batch
        if on and layout == "prefix_sharing":
            assert batch["input_ids"].shape[0] == 6  # one row per pair
        logps, _ = trainer.scored_logprobs(model, batch)
        loss = trainer.compute_loss(model, batch)
        results[on] = (logps.detach(), loss, torch.autograd.grad(loss, params))
    (logps_a, loss_a, grads_a), (logps_b, loss_b, grads_b) = results[False], results[True]
    assert torch.allclose(logps_a, logps_b, atol=1e-5)
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_packed_rows_are_fewer_and_no_longer_than_padded_rows(tmp_path, tokenizer, skewed_dataset):
    trainer = trainer_for(tmp_path, tiny("llama", "sdpa"), tokenizer, skewed_dataset, padding_free=True)
    features = [trainer.train_dataset[i] for i in range(6)]
    packed = trainer.data_collator(features)
    padded = trainer_for(tmp_path, tiny("llama", "sdpa"), tokenizer, skewed_dataset).data_collator(features)
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


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_rejected_never_sees_chosen(tmp_path, tokenizer, skewed_dataset, attn):
    model = tiny("llama", attn)
    trainer = trainer_for(tmp_path, model, tokenizer, skewed_dataset, prefix_sharing=True)
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


def test_prefix_sharing_needs_a_supported_backend(tmp_path, tokenizer, skewed_dataset, monkeypatch):
    import orpo.trainer

    # flash attention cannot take our mask; stand in for it by taking sdpa off the supported list
    monkeypatch.setattr(orpo.trainer, "PREFIX_SHARING_BACKENDS", ("eager",))
    model = tiny("llama", "sdpa")
    trainer = trainer_for(tmp_path, model, tokenizer, skewed_dataset, prefix_sharing=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with pytest.raises(
        OrpoError, match="prefix_sharing: llama with attn_implementation='sdpa' is not supported"
    ):
        trainer.compute_loss(model, batch)


@pytest.mark.parametrize(
    "layout,patch,message",
    [
        # a backend that ignores restarting position_ids: one causal mask over the whole packed row
        (
            "padding_free",
            ("transformers.masking_utils", "find_packed_sequence_indices", lambda position_ids: None),
            "padding_free: llama with attn_implementation='sdpa' lets packed sequences attend to each other",
        ),
        # a model that drops our 4D mask
        (
            "prefix_sharing",
            ("orpo.trainer", "shared_prefix_mask", lambda segment_ids, impl, dtype: None),
            "prefix_sharing: llama with attn_implementation='sdpa' does not apply the shared-prefix mask",
        ),
    ],
    ids=["packing-leak", "ignored-shared-mask"],
)
def test_a_layout_the_model_does_not_honour_is_an_error(
    tmp_path, tokenizer, skewed_dataset, monkeypatch, layout, patch, message
):
    import importlib

    module, name, replacement = patch
    monkeypatch.setattr(importlib.import_module(module), name, replacement)
    model = tiny("llama", "sdpa")
    trainer = trainer_for(tmp_path, model, tokenizer, skewed_dataset, **{layout: True})
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    with pytest.raises(OrpoError, match=re.escape(message)):
        trainer.compute_loss(model, batch)


@pytest.mark.parametrize("layout", ["padding_free", "prefix_sharing"])
def test_training_run(tmp_path, tokenizer, skewed_dataset, layout):
    model = tiny("qwen2", "sdpa")
    trainer = trainer_for(
        tmp_path,
        model,
        tokenizer,
        skewed_dataset,
        max_steps=2,
        per_device_train_batch_size=3,
        **{layout: True},
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
