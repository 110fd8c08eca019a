"""Write a saved model as one GGUF file: plan every tensor first (so an unsupported model fails before a byte
is written), then stream them one at a time from the safetensors files (peak memory: one tensor), into a
temporary name that is renamed only when the file is complete."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import orpo.export.architectures as architectures
from orpo.errors import OrpoError
from orpo.export.tensor_types import EXPORT_TYPES, stored_bytes, tensor_type
from orpo.export.vocab import write_vocab


@dataclass
class TensorPlan:
    gguf_name: str
    hf_name: str | None  # None: computed here (rope_freqs), its values in ``values``
    shape: tuple[int, ...]
    qtype: object
    file: Path | None = None
    values: np.ndarray | None = None


@dataclass
class ExportSummary:
    """What :func:`export_gguf` wrote."""

    path: Path
    type: str
    architecture: str
    pre_tokenizer: str
    bytes: int
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGUF type name -> number of tensors

    def describe(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        return (
            f"wrote {self.path}: {self.type}, {self.bytes / 2**20:.1f} MiB, {sum(self.tensor_types.values())} "
            f"tensors ({types}); architecture {self.architecture}, pre-tokenizer {self.pre_tokenizer}"
        )


def export_folder(
    folder: Path,
    path: Path,
    export_type: str,
    tokenizer_pre: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    source: str | None = None,
) -> ExportSummary:
    """A saved model folder (config.json, safetensors, tokenizer) as a GGUF file at ``path``."""
    import tempfile

    import gguf
    from transformers import AutoConfig

    from orpo.models import load_tokenizer

    source = source or str(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    arch = architectures.gguf_architecture(config)
    plan = _plan(folder, config, arch, export_type, source)
    tokenizer = load_tokenizer(str(folder), trust_remote_code)
    file_type = EXPORT_TYPES[export_type][1]

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(_model_name(config, folder))
        architectures.write_hyperparameters(writer, config, arch)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        with tempfile.TemporaryDirectory() as saved:
            # The tokenizer as transformers saves it (tokenizer.json with its merges), whatever files it came from.
            tokenizer.save_pretrained(saved)
            pre = write_vocab(writer, tokenizer, Path(saved), config.vocab_size, tokenizer_pre, source)
        for item in plan:
            writer.add_tensor_info(
                item.gguf_name,
                item.shape,
                np.dtype(np.float32),
                stored_bytes(item.shape, item.qtype),
                item.qtype,
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, plan, config, arch, progress)
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    counts = Counter(gguf.GGMLQuantizationType(item.qtype).name for item in plan)
    return ExportSummary(path, export_type, arch, pre, path.stat().st_size, dict(counts))


def _model_name(config, folder: Path) -> str:
    name = getattr(config, "_name_or_path", "") or ""
    return Path(name).name if name and not Path(name).is_absolute() else folder.resolve().name


def _weight_files(folder: Path, source: str) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise OrpoError(
        f"{source}: no model.safetensors (or its index); GGUF export reads safetensors weights only "
        "(save the model with save_pretrained)"
    )


def _plan(folder: Path, config, arch: str, export_type: str, source: str) -> list[TensorPlan]:
    """Every tensor's GGUF name, shape and type, checked before anything is written."""
    from safetensors import safe_open

    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in _weight_files(folder, source):
        with safe_open(file, framework="np") as handle:
            for name in handle.keys():
                shapes[name] = (tuple(handle.get_slice(name).get_shape()), file)
    # A tied head is the embedding itself: llama.cpp reuses token_embd when there is no output.weight.
    tied = bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in shapes
    blocks = config.num_hidden_layers
    plan, unknown = [], []
    factors = architectures.rope_frequency_factors(config)
    if factors is not None:
        plan.append(
            TensorPlan(
                "rope_freqs.weight",
                None,
                factors.shape,
                tensor_type("rope_freqs.weight", factors.shape, export_type, tied),
                values=factors,
            )
        )
    for hf_name, (shape, file) in sorted(shapes.items()):
        if hf_name.endswith(architectures.SKIPPED_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = architectures.gguf_tensor_name(hf_name, arch, blocks)
        if gguf_name is None:
            unknown.append(hf_name)
            continue
        plan.append(
            TensorPlan(gguf_name, hf_name, shape, tensor_type(gguf_name, shape, export_type, tied), file)
        )
    if unknown:
        listed = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise OrpoError(
            f"{source}: tensors llama.cpp's {arch} has no place for: {listed}. Nothing was written"
        )
    embedding = next((item for item in plan if item.gguf_name == "token_embd.weight"), None)
    if embedding is None:
        raise OrpoError(f"{source}: no token embedding (model.embed_tokens.weight) among the weights")
    return plan


def _write_tensors(writer, plan: list[TensorPlan], config, arch: str, progress: bool) -> None:
    """Convert and write each planned tensor in order, holding one at a time."""
    import gguf.quants
    from safetensors import safe_open
    from tqdm.auto import tqdm

    total = sum(stored_bytes(item.shape, item.qtype) for item in plan)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing GGUF", disable=not progress)
    handles: dict[Path, object] = {}
    try:
        for item in plan:
            if item.values is not None:
                array = item.values
            else:
                if item.file not in handles:
                    handles[item.file] = safe_open(item.file, framework="pt").__enter__()
                array = handles[item.file].get_tensor(item.hf_name).float().numpy()
                array = architectures.to_llama_cpp_layout(item.hf_name, array, config, arch)
            data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), item.qtype)
            writer.write_tensor_data(data)
            bar.update(stored_bytes(item.shape, item.qtype))
            del array, data
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
        bar.close()
