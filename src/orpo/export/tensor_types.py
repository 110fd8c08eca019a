"""Which GGUF type each tensor is stored in, for each export type (what llama.cpp's own tools write).

- 1-D tensors (norms, biases, ``rope_freqs``) stay F32 in every file: they are tiny and llama.cpp adds them
  in F32.
- f32 / f16 / bf16 / q8_0: every matrix in that type (llama.cpp's ``convert_hf_to_gguf.py``).
- q4_0 / q4_1 / q5_0 / q5_1: the matrices in that type, except the output projection — ``output.weight``, or
  ``token_embd`` when the head is tied to it — in Q8_0: every generated token goes through it, and a 4-bit
  head costs far more quality than its bytes save. llama.cpp's ``llama-quantize`` keeps it at Q6_K (Q8_0
  when a row is not a multiple of 256, as in SmolLM2); gguf has no Q6_K writer, so Q8_0 here.
- A matrix whose rows do not split into the type's 32-value blocks falls back to F16.
"""

from __future__ import annotations

import gguf

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# export type -> (the matrices' type, general.file_type)
EXPORT_TYPES = {
    "f32": (Q.F32, F.ALL_F32),
    "f16": (Q.F16, F.MOSTLY_F16),
    "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
}
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")


def tensor_type(gguf_name: str, shape: tuple[int, ...], export_type: str, tied: bool):
    """The GGUF type of one tensor (numpy shape, rows last) in an ``export_type`` file."""
    base = EXPORT_TYPES[export_type][0]
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    if export_type in LOW_BIT and (
        gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    ):
        base = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[base][0]
    if shape[-1] % block:
        return Q.F16
    return base


def stored_bytes(shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return rows * (shape[-1] // block) * size
