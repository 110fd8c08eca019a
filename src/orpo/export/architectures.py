"""What llama.cpp needs to know about a model's architecture: its GGUF name, the ``{arch}.*`` hyper-parameters,
the tensors' GGUF names, and the weight layouts that differ from Hugging Face's.

Supported: the Llama family (``LlamaForCausalLM`` — SmolLM, SmolLM2, Llama 2/3 — and ``MistralForCausalLM``,
which llama.cpp runs as ``llama``) and ``Qwen2ForCausalLM``. Everything else is refused before a byte is
written: a converter that guesses writes files llama.cpp loads and then computes wrong answers with."""

from __future__ import annotations

import math

import numpy as np

from orpo.errors import OrpoError

# Hugging Face class -> llama.cpp architecture.
SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
# RoPE variants llama.cpp runs for these architectures, and how each is written.
ROPE_TYPES = ("default", "linear", "llama3")


def gguf_architecture(config) -> str:
    """The llama.cpp architecture for a transformers config, or an error naming the supported ones."""
    classes = list(getattr(config, "architectures", None) or [])
    for name in classes:
        if name in SUPPORTED:
            _check_supported_options(config, name)
            return SUPPORTED[name]
    found = ", ".join(classes) or f"model_type {getattr(config, 'model_type', '?')!r}"
    raise OrpoError(
        f"GGUF export supports {', '.join(SUPPORTED)}; this model is {found}. Nothing was written"
    )


def _check_supported_options(config, class_name: str) -> None:
    """Options of a supported class that llama.cpp would silently compute differently."""
    problems = []
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=true (llama.cpp's llama has no MLP biases)")
    if getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=true (llama.cpp's qwen2 attends to the whole context)")
    rope_type = rope_parameters(config).get("rope_type") or "default"
    if rope_type not in ROPE_TYPES:
        problems.append(f"RoPE type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    if problems:
        raise OrpoError(f"{class_name} with " + "; ".join(problems) + " cannot be exported to GGUF")


def rope_parameters(config) -> dict:
    """RoPE settings in one shape: transformers 5 keeps them in ``rope_parameters``, 4.x in ``rope_theta`` and
    ``rope_scaling`` (whose ``type`` is the older spelling of ``rope_type``)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hyperparameters(writer, config, arch: str) -> None:
    """The ``{arch}.*`` keys llama.cpp reads to build the graph."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    rope = rope_parameters(config)
    if rope.get("rope_type") == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    # llama.cpp takes the head size as hidden / heads unless told; some configs set it apart (Mistral Nemo).
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim(config))


def rope_frequency_factors(config) -> np.ndarray | None:
    """Llama 3's RoPE scaling as llama.cpp takes it: a ``rope_freqs`` tensor [head_dim / 2] that divides each
    rotary frequency (1 for the high frequencies, ``factor`` for the low, a smooth blend between); None for
    other RoPE types."""
    rope = rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim = head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def to_llama_cpp_layout(hf_name: str, array: np.ndarray, config, arch: str) -> np.ndarray:
    """A weight in the layout llama.cpp computes with. Its ``llama`` rotates interleaved pairs of each head's
    dimensions where transformers rotates its two halves, so the Q and K rows (and biases) are reordered per
    head: row ``2i`` of the GGUF head is HF row ``i``, row ``2i+1`` is HF row ``i + head_dim / 2``. Qwen2
    rotates halves in llama.cpp too (its NEOX RoPE) and is written as it is."""
    if arch != "llama":
        return array
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        heads = config.num_attention_heads
    elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    else:
        return array
    rows = array.shape[0]
    return array.reshape(heads, 2, rows // heads // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def gguf_tensor_name(hf_name: str, arch: str, blocks: int) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (gguf's own name table)."""
    names = _name_map(arch, blocks)
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


_NAME_MAPS: dict = {}


def _name_map(arch: str, blocks: int):
    import gguf

    key = (arch, blocks)
    if key not in _NAME_MAPS:
        enum = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
        _NAME_MAPS[key] = gguf.get_tensor_name_map(enum, blocks)
    return _NAME_MAPS[key]


# Buffers some checkpoints carry that are recomputed by any runtime.
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
