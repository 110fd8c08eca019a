"""orpo.head: the LM head run outside the model (chunked, fused with the loss, through engine hooks) equals the
model's own logits, values and gradients, for every known head shape; unknown ones fall back with a warning."""

import warnings

import pytest
import torch
from torch import nn
from transformers import CohereConfig, Gemma2Config

from conftest import batch_for, family_model, make_model, padded_args, reference_logps
from orpo import ORPOTrainer

config = padded_args


def gemma2_model():
    return family_model(Gemma2Config, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0)


def cohere_model():
    return family_model(CohereConfig, num_key_value_heads=2, logit_scale=0.5)


def biased_head_model():
    model = make_model(tie_word_embeddings=False)
    model.lm_head = nn.Linear(32, 259, bias=True)
    nn.init.normal_(model.lm_head.bias)
    return model


class ScaledLogitsLlama(nn.Module):
    """A model that transforms its logits after the head in a way orpo cannot know."""

    def __init__(self):
        super().__init__()
        self.inner = make_model()
        self.config = self.inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits * 3.0
        return out


HEAD_FACTORIES = pytest.mark.parametrize(
    "factory",
    [
        lambda: make_model(),
        lambda: make_model(tie_word_embeddings=False),
        biased_head_model,
        gemma2_model,
        cohere_model,
    ],
    ids=["tied", "untied", "bias", "gemma2-softcap", "cohere-logit-scale"],
)


@HEAD_FACTORIES
def test_chunked_head_equals_full_logits_values_and_gradients(tmp_path, tokenizer, toy_dataset, factory):
    model = factory()
    trainer = ORPOTrainer(
        model=model,
        args=config(tmp_path, logprob_chunk_size=7),
        train_dataset=toy_dataset,
        tokenizer=tokenizer,
    )
    batch = batch_for(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the head must be separated
        ours, _ = trainer.scored_logprobs(model, batch)
    assert trainer.head.plan is not None
    ref = reference_logps(model, batch)
    assert torch.allclose(ours, ref, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours.sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            # fp32 rounding of sums over many tokens: the bias model's head gradient reaches ~85, and the two
            # summation orders differ by 2e-5 there on AVX-512 kernels (2.4e-7 of the tensor's scale)
            assert torch.allclose(a, b, atol=1e-5 * max(1.0, b.abs().max().item() / 10))


@HEAD_FACTORIES
@pytest.mark.parametrize("include_prompt", [False, True])
@pytest.mark.parametrize("chunk", ["one-pair-too-big", "several-chunks", None])
def test_fused_head_loss_equals_unfused_loss_and_gradients(
    tmp_path, tokenizer, toy_dataset, factory, include_prompt, chunk, monkeypatch
):
    import orpo.head as head_module

    model = factory()
    params = [p for p in model.parameters() if p.requires_grad]
    probe = ORPOTrainer(
        model=model,
        args=config(tmp_path, nll_include_prompt=include_prompt),
        train_dataset=toy_dataset,
        tokenizer=tokenizer,
    )
    sizes = torch.bincount(batch_for(probe)["score_pair"])
    # The fused path gives a pair up to 4 chunks' worth of tokens before it falls back.
    chunk_size = {
        "one-pair-too-big": (int(sizes.max()) - 1) // 4,
        "several-chunks": int(sizes.max()) + 1,
    }.get(chunk)
    fused_calls = []
    real_fused = head_module.fused_linear_loss
    monkeypatch.setattr(
        head_module,
        "fused_linear_loss",
        lambda *a, **k: fused_calls.append(k["chunks"]) or real_fused(*a, **k),
    )

    def loss_and_grads(fused):
        args = config(
            tmp_path,
            nll_include_prompt=include_prompt,
            orpo_alpha=0.7,
            orpo_beta=0.5,
            logprob_chunk_size=chunk_size,
            fused_head_loss=fused,
        )
        trainer = ORPOTrainer(model=model, args=args, train_dataset=toy_dataset, tokenizer=tokenizer)
        loss = trainer.compute_loss(model, batch_for(trainer))
        sums = {k: float(v) for k, v in trainer._metric_sums["train"].items()}
        return loss, torch.autograd.grad(loss, params, allow_unused=True), sums

    loss_ref, grads_ref, sums_ref = loss_and_grads(False)
    assert not fused_calls
    loss, grads, sums = loss_and_grads(True)
    # The fused path runs exactly when every pair fits in a chunk; "several-chunks" really is several.
    assert len(fused_calls) == (0 if chunk == "one-pair-too-big" else 1)
    if chunk == "several-chunks":
        assert len(fused_calls[0]) > 1
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    for a, b in zip(grads, grads_ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert sums == pytest.approx(sums_ref, rel=1e-5, abs=1e-6)


def test_unknown_logit_transform_falls_back_to_full_logits(tmp_path, tokenizer, toy_dataset):
    model = ScaledLogitsLlama()
    trainer = ORPOTrainer(model=model, args=config(tmp_path), train_dataset=toy_dataset, tokenizer=tokenizer)
    batch = batch_for(trainer)
    with pytest.warns(UserWarning, match="disagrees with the model's own logits"):
        ours, _ = trainer.scored_logprobs(model, batch)
    assert trainer.head.plan is None
    assert torch.allclose(ours, reference_logps(model, batch), atol=1e-6)


def test_non_linear_head_falls_back_with_a_warning(tmp_path, tokenizer, toy_dataset):
    model = make_model(tie_word_embeddings=False)
    model.lm_head = nn.Sequential(nn.Linear(32, 259))
    trainer = ORPOTrainer(model=model, args=config(tmp_path), train_dataset=toy_dataset, tokenizer=tokenizer)
    batch = batch_for(trainer)
    with pytest.warns(UserWarning, match="not a plain nn.Linear"):
        ours, _ = trainer.scored_logprobs(model, batch)
    assert torch.allclose(ours, reference_logps(model, batch), atol=1e-6)


def test_bf16_model_uses_the_chunked_head_and_matches_its_own_logits(tmp_path, tokenizer, toy_dataset):
    model = make_model().to(torch.bfloat16)
    trainer = ORPOTrainer(model=model, args=config(tmp_path), train_dataset=toy_dataset, tokenizer=tokenizer)
    batch = batch_for(trainer)
    ours, _ = trainer.scored_logprobs(model, batch)
    assert trainer.head.plan is not None and ours.dtype == torch.float32
    assert torch.allclose(ours, reference_logps(model, batch), atol=1e-2)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
