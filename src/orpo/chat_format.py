"""Give a base model and its tokenizer a chat format: TRL's ``setup_chat_format`` (TRL ≤ 0.25) and
``clone_chat_template`` (TRL 0.26+), so notebooks written for either run with only the import changed
(the smol-course ORPO notebook calls ``setup_chat_format`` on SmolLM2-135M, a base model without one)."""

from __future__ import annotations

import logging

logger = logging.getLogger("orpo")

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
# TRL's ChatML: each message as <|im_start|>role\ncontent<|im_end|>\n; the generation prompt opens an assistant
# turn. No default system message (unlike Qwen's or SmolLM2's own templates).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'" + CHATML_START + "' + message['role'] + '\n' + message['content'] + '" + CHATML_END + "' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '" + CHATML_START + "assistant\n' }}"
    "{% endif %}"
)
FORMATS = {"chatml": CHATML_TEMPLATE}


def setup_chat_format(
    model, tokenizer, format: str | None = "chatml", resize_to_multiple_of: int | None = None
):
    """ChatML for a model without a chat format, as TRL ≤ 0.25 did it: ``<|im_start|>`` becomes the BOS token,
    ``<|im_end|>`` the EOS and pad token (both added as special tokens where the vocabulary lacks them), the
    tokenizer gets the ChatML template, the embeddings grow to the vocabulary (rounded up to
    ``resize_to_multiple_of``) and the model's config and generation config take the new ids.

    Returns ``(model, tokenizer)``, both changed in place. A tokenizer that already has a chat template is an
    error, as in TRL (set ``tokenizer.chat_template = None`` first to replace it)."""
    if tokenizer.chat_template is not None:
        raise ValueError(
            "Chat template is already added to the tokenizer. If you want to overwrite it, please set it to None"
        )
    if format not in FORMATS:
        raise ValueError(f"Format {format} not available. Please use one of {list(FORMATS)}")
    tokenizer.eos_token = CHATML_END
    tokenizer.pad_token = CHATML_END
    tokenizer.bos_token = CHATML_START
    tokenizer.add_special_tokens({"additional_special_tokens": [CHATML_START, CHATML_END]})
    tokenizer.chat_template = FORMATS[format]
    _resize_embeddings(model, tokenizer, resize_to_multiple_of)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if config is not None:
            for name, token_id in ids.items():
                setattr(config, f"{name}_token_id", token_id)
    return model, tokenizer


def clone_chat_template(model, tokenizer, source_tokenizer_path: str, resize_to_multiple_of: int | None = 64):
    """The chat template of another tokenizer (a name, folder, or ``demo``), as TRL 0.26+ does it: the template
    is copied, the source's added tokens the vocabulary lacks are added, its EOS becomes the EOS of the
    tokenizer, the model's config and generation config; the embeddings grow to the vocabulary rounded up to
    ``resize_to_multiple_of``, and placeholder tokens (``<extra_id_N>``) fill the rows past the vocabulary so
    the two sizes agree.

    Returns ``(model, tokenizer, added_token_ids)``."""
    from orpo.models import load_tokenizer

    source = load_tokenizer(source_tokenizer_path)
    tokenizer.chat_template = source.get_chat_template()
    vocabulary = tokenizer.get_vocab()
    added = [token for token in source.added_tokens_decoder.values() if token.content not in vocabulary]
    tokenizer.add_tokens(added)
    tokenizer.eos_token = source.eos_token
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    rows = _resize_embeddings(model, tokenizer, resize_to_multiple_of)
    names = [token.content for token in added]
    index = 0
    while len(tokenizer.get_vocab()) < rows:
        name = f"<extra_id_{index}>"
        if tokenizer.add_tokens(name) == 1:
            names.append(name)
        index += 1
    return model, tokenizer, tokenizer.convert_tokens_to_ids(names)


def _resize_embeddings(model, tokenizer, multiple: int | None) -> int:
    """Embedding rows for the whole vocabulary (``len(get_vocab())`` counts added tokens however a tokenizer
    keeps them), rounded up to ``multiple``; returns the new row count."""
    before = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(new_num_tokens=len(tokenizer.get_vocab()), pad_to_multiple_of=multiple)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != before:
        logger.info(f"token embeddings resized from {before} to {rows} rows")
    return rows
