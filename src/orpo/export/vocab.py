"""The tokenizer as llama.cpp reads it: ``tokenizer.ggml.*`` keys for a byte-level BPE tokenizer (llama.cpp's
``gpt2`` model), the chat template and the special tokens, taken from the transformers tokenizer the model
was trained with so that llama.cpp tokenizes and stops as orpo does."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from orpo.errors import OrpoError
from orpo.export.pre_tokenizers import FINGERPRINT_TEXT, KNOWN_FINGERPRINTS, LLAMA_CPP_NAMES

# Added tokens llama.cpp should treat as control tokens even when the tokenizer does not mark them special.
_LOOKS_SPECIAL = (("<|", "|>"), ("<｜", "｜>"), ("<unused", ">"))


def check_byte_level_bpe(tokenizer, source: str) -> dict:
    """The tokenizer's ``tokenizer.json`` content, or an error for kinds llama.cpp's ``gpt2`` model cannot run
    (SentencePiece, WordPiece, BPE with byte fallback: Llama 2, Mistral 7B)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise OrpoError(
            f"{source}: the tokenizer has no fast (tokenizer.json) form; GGUF export needs a byte-level BPE "
            "tokenizer (SmolLM, Llama 3, Qwen2)"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = (
            "SentencePiece-style BPE with byte fallback" if model.get("byte_fallback") else model.get("type")
        )
        raise OrpoError(
            f"{source}: the tokenizer is {kind}; GGUF export supports byte-level BPE tokenizers (SmolLM, "
            "Llama 3, Qwen2). SentencePiece tokenizers (Llama 2, Mistral 7B) are not supported: convert "
            "the saved model with llama.cpp's convert_hf_to_gguf.py"
        )
    if "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder")):
        raise OrpoError(
            f"{source}: the tokenizer is BPE but not byte-level (no ByteLevel pre-tokenizer or decoder); "
            "llama.cpp's gpt2 tokenizer would split its text differently"
        )
    return spec


def pre_tokenizer_name(tokenizer, spec: dict, given: str | None, source: str) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE: recognised from its encoding of
    llama.cpp's fingerprint text, or ``given``."""
    if given is not None:
        if given not in LLAMA_CPP_NAMES:
            raise OrpoError(
                f"--tokenizer-pre {given!r} is not a pre-tokenizer llama.cpp knows; known: "
                + ", ".join(sorted(LLAMA_CPP_NAMES))
            )
        return given
    if not (spec.get("model") or {}).get("merges"):
        # Without merges every byte is its own token however the text is split (the embedded demo tokenizer).
        return "default"
    ids = tokenizer.encode(FINGERPRINT_TEXT)
    fingerprint = hashlib.sha256(str(list(ids)).encode()).hexdigest()
    if fingerprint in KNOWN_FINGERPRINTS:
        return KNOWN_FINGERPRINTS[fingerprint]
    raise OrpoError(
        f"{source}: could not tell which llama.cpp pre-tokenizer this tokenizer needs (fingerprint "
        f"{fingerprint} is not one of the {len(KNOWN_FINGERPRINTS)} orpo knows: "
        f"{', '.join(sorted(set(KNOWN_FINGERPRINTS.values())))}). A wrong one makes llama.cpp split text "
        "differently from training. If you know the tokenizer's family, pass it: orpo export ... "
        "--tokenizer-pre NAME (llama.cpp's convert_hf_to_gguf_update.py lists which model uses which name)"
    )


def tokens_and_types(tokenizer, spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's string and llama.cpp token type, up to the model's ``vocab_size`` (ids the tokenizer does
    not use become ``[PAD<id>]`` UNUSED tokens, so the list matches the embedding's rows)."""
    from gguf import TokenType

    by_id = {i: token for token, i in spec["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    for i, entry in added.items():
        by_id[i] = entry["content"]
    if by_id and max(by_id) >= vocab_size:
        raise OrpoError(
            f"the tokenizer has ids up to {max(by_id)} but the model's vocab_size is {vocab_size}: "
            "resize the embeddings (model.resize_token_embeddings) before exporting"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        token = by_id[i]
        tokens.append(token)
        if i not in added:
            types.append(int(TokenType.NORMAL))
        elif added[i].get("special") or any(
            token.startswith(a) and token.endswith(b) for a, b in _LOOKS_SPECIAL
        ):
            types.append(int(TokenType.CONTROL))
        else:
            types.append(int(TokenType.USER_DEFINED))
    return tokens, types


def write_vocab(writer, tokenizer, folder: Path, vocab_size: int, pre: str | None, source: str) -> str:
    """All ``tokenizer.*`` keys; returns the pre-tokenizer name written. ``folder`` holds the tokenizer's
    saved files (gguf's SpecialVocab reads the merges from its tokenizer.json)."""
    import gguf

    spec = check_byte_level_bpe(tokenizer, source)
    pre_name = pre_tokenizer_name(tokenizer, spec, pre, source)
    tokens, types = tokens_and_types(tokenizer, spec, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        # llama.cpp refuses a gpt2 tokenizer without a merges list, and gguf writes no empty list: one merge
        # that can never apply (its left side is a multi-character token, which only an earlier merge could
        # produce) keeps the byte-by-byte tokenization exact.
        longest = max((token for token in tokens if " " not in token), key=len)
        special.merges = [f"{longest} {longest}"]
    # The ids and add-BOS/EOS behaviour transformers uses, not a guess from the files.
    special.special_token_ids = {
        kind: tid
        for kind in ("bos", "eos", "unk", "pad")
        if isinstance(tid := getattr(tokenizer, f"{kind}_token_id", None), int)
    }
    special.add_special_token = adds_special_tokens(tokenizer)
    special.chat_template = tokenizer.chat_template or None
    special.add_to_gguf(writer, quiet=True)
    return pre_name


def adds_special_tokens(tokenizer) -> dict[str, bool]:
    """Whether encoding a text adds BOS in front and EOS at the end, as this tokenizer does it."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "bos": bos is not None and len(full) > len(plain) and full[0] == bos,
        "eos": eos is not None and len(full) > len(plain) and full[-1] == eos,
    }
