"""orpo.models: the one path from a model or tokenizer name to what the trainer trains (Python API and every
command), and the model adjustments made before training."""

import torch

from orpo import ORPOConfig
from orpo.demo import demo_tokenizer, tiny_model
from orpo.models import add_special_tokens, load_model_and_tokenizer, prepare_model, runs_in_low_precision


def test_special_tokens_are_added_and_new_ones_get_embedding_rows():
    model, tokenizer = tiny_model(), demo_tokenizer()
    rows = model.get_input_embeddings().weight.shape[0]
    assert add_special_tokens(model, tokenizer, {"pad_token": tokenizer.eos_token}) == 0  # already known
    assert tokenizer.pad_token == tokenizer.eos_token and model.get_input_embeddings().weight.shape[0] == rows
    assert add_special_tokens(model, tokenizer, {"additional_special_tokens": ["<|new|>"]}) == 1
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) > rows
    assert tokenizer.convert_tokens_to_ids("<|new|>") == len(tokenizer) - 1


def test_demo_is_a_model_name_like_any_other(tmp_path):
    """``demo`` reaches the embedded model and tokenizer through the same loader as a hub name or folder,
    so ``ORPOTrainer(model="demo")`` works as ``orpo train --model demo`` does."""
    model, tokenizer = load_model_and_tokenizer("demo", seed=3)
    reference = tiny_model(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    assert tokenizer.get_vocab() == demo_tokenizer().get_vocab()
    args = ORPOConfig(output_dir=str(tmp_path), seed=3)
    prepared = prepare_model("demo", args)
    assert all(torch.equal(a, b) for a, b in zip(prepared.parameters(), reference.parameters(), strict=True))


def test_dropout_is_disabled_and_low_precision_is_seen(tmp_path):
    model = tiny_model()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    args = ORPOConfig(output_dir=str(tmp_path))
    prepared = prepare_model(model, args)
    assert all(m.p == 0.0 for m in prepared.modules() if isinstance(m, torch.nn.Dropout))
    assert not runs_in_low_precision(prepared, args)
    assert runs_in_low_precision(prepared.to(torch.bfloat16), args)
