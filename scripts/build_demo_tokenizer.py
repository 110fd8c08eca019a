"""Build the embedded demo tokenizer (src/orpo/demo/tokenizer/): byte-level, one token per byte.

One token per byte keeps the vocabulary tiny (259 ids) and makes arithmetic and string tasks easy
for a tiny model; any UTF-8 text still encodes. The chat template is ChatML, as in Qwen2.
Run from the repository root: ``python scripts/build_demo_tokenizer.py``; the output is committed
and must not change when rebuilt (a test checks).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build(out_dir: Path) -> None:
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: c.encode("utf-8"))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in byte_chars:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("src/orpo/demo/tokenizer")
    build(target)
    print(f"wrote {target}")
