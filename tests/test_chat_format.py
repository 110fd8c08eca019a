"""``setup_chat_format`` (TRL ≤ 0.25's behaviour) and ``clone_chat_template`` (TRL 0.26+'s) from ``orpo``: the
smol-course notebook's ``from trl import ORPOConfig, ORPOTrainer, setup_chat_format`` needs only its import
changed (issue 27 item 1)."""

import pytest
from transformers import AutoTokenizer

from conftest import make_model
from orpo import clone_chat_template, setup_chat_format
from orpo.demo import TOKENIZER_DIR, demo_tokenizer, tiny_model


def base_tokenizer():
    """The demo tokenizer as a base model's: no chat template, no pad, <|endoftext|> as bos and eos."""
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tokenizer.chat_template = None
    tokenizer.bos_token = tokenizer.eos_token = "<|endoftext|>"
    tokenizer.pad_token = None
    return tokenizer


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
]


def test_setup_chat_format_gives_trls_chatml_tokens_ids_and_embeddings():
    model, tokenizer = tiny_model(), base_tokenizer()
    vocabulary = len(tokenizer.get_vocab())
    model, tokenizer = setup_chat_format(model, tokenizer, resize_to_multiple_of=64)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert {"<|im_start|>", "<|im_end|>"} <= set(tokenizer.all_special_tokens)
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= vocabulary
    for config in (model.config, model.generation_config):
        assert config.bos_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert config.eos_token_id == config.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_setup_chat_format_adds_missing_tokens_and_refuses_an_existing_template():
    model = make_model()
    tokenizer = base_tokenizer()  # its vocabulary has ChatML's tokens already, as SmolLM2's has
    before = len(tokenizer.get_vocab())
    setup_chat_format(model, tokenizer)
    assert len(tokenizer.get_vocab()) == before  # nothing added twice
    with pytest.raises(ValueError, match="Chat template is already added to the tokenizer"):
        setup_chat_format(model, tokenizer)
    with pytest.raises(ValueError, match="Format zephyr not available"):
        setup_chat_format(model, base_tokenizer(), format="zephyr")


def test_clone_chat_template_does_what_trls_does(tmp_path):
    """The same template, tokens, EOS, embedding size and returned ids as TRL 1.16's own function."""
    trl = pytest.importorskip("trl")
    source = tmp_path / "source"
    donor = demo_tokenizer()
    donor.add_tokens(["<tool>", "</tool>"])
    donor.save_pretrained(source)
    results = []
    for clone in (trl.clone_chat_template, clone_chat_template):
        model, tokenizer = tiny_model(), base_tokenizer()
        model, tokenizer, added = clone(model, tokenizer, str(source))
        results.append(
            (
                tokenizer.chat_template,
                tokenizer.eos_token,
                model.config.eos_token_id,
                model.generation_config.eos_token_id,
                model.get_input_embeddings().weight.shape[0],
                len(tokenizer.get_vocab()),
                added,
            )
        )
    assert results[0] == results[1]
    assert results[1][4] % 64 == 0 and len(results[1][6]) > 2  # the two tool tokens, then placeholders
