"""GGUF export: a trained model as one file for llama.cpp, Ollama and LM Studio (``orpo export``,
:func:`export_gguf`). Knows nothing of training: it reads a saved model folder (or a model in memory, saved
to a temporary folder first), and a LoRA adapter folder is merged into its base model first.

Rooms: :mod:`.architectures` (what llama.cpp needs per architecture), :mod:`.tensor_types` (each tensor's
GGUF type per export type), :mod:`.vocab` with :mod:`.pre_tokenizers` (the tokenizer), :mod:`.writer`
(planning and streaming the file)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from orpo.errors import OrpoError

if TYPE_CHECKING:  # the writer imports gguf, which only an export needs
    from orpo.export.writer import ExportSummary

# The types gguf can write, best first. q8_0 by default: about a quarter of the fp32 size at next to no loss
# (8 bits and a scale per 32 weights); the 4- and 5-bit types cost small models, like the ones trained here,
# noticeably more quality than they save.
TYPES = ("q8_0", "f16", "bf16", "f32", "q5_1", "q5_0", "q4_1", "q4_0")
DEFAULT_TYPE = "q8_0"

__all__ = ["DEFAULT_TYPE", "TYPES", "export_gguf"]


def export_gguf(
    model_or_dir,
    path: str | Path,
    type: str = DEFAULT_TYPE,
    *,
    tokenizer=None,
    tokenizer_pre: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> ExportSummary:
    """Write ``model_or_dir`` as a GGUF file at ``path``.

    ``model_or_dir``: a folder saved by ``save_pretrained`` (``orpo train``'s output), a LoRA adapter folder
    (merged into its base first), or a transformers / peft model in memory (then ``tokenizer`` is needed).
    ``type``: one of ``f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0`` (default q8_0: a quarter of the fp32
    size at next to no loss). ``tokenizer_pre``: llama.cpp's pre-tokenizer name, for a tokenizer orpo does
    not recognise. The file appears only when complete (it is written under ``<path>.partial``)."""
    import importlib.util

    if type not in TYPES:
        raise OrpoError(f"unknown GGUF type {type!r}; choose one of {', '.join(TYPES)}")
    if importlib.util.find_spec("gguf") is None:
        raise OrpoError("GGUF export needs the gguf package: pip install 'orpo[gguf]'")
    from orpo.export.writer import export_folder

    path = Path(path)
    options = {"tokenizer_pre": tokenizer_pre, "trust_remote_code": trust_remote_code, "progress": progress}
    if isinstance(model_or_dir, (str, Path)):
        folder = Path(model_or_dir)
        if not folder.is_dir():
            raise OrpoError(f"{folder}: not a model folder (export a folder saved by save_pretrained)")
        if not (folder / "adapter_config.json").is_file():
            return export_folder(folder, path, type, **options)
        from orpo.models import merge_adapter

        model, saved_tokenizer = merge_adapter(folder, trust_remote_code)
        return _export_in_memory(model, tokenizer or saved_tokenizer, path, type, str(folder), options)
    if tokenizer is None:
        raise OrpoError("export_gguf(model, ...) needs tokenizer=: the GGUF file carries the tokenizer")
    model = model_or_dir
    if hasattr(model, "merge_and_unload"):  # a peft model: its adapter folded into a copy of the weights
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    return _export_in_memory(
        model, tokenizer, path, type, f"the {model.__class__.__name__} in memory", options
    )


def _export_in_memory(model, tokenizer, path: Path, type: str, source: str, options: dict):
    from orpo.export.writer import export_folder

    if tokenizer is None:
        raise OrpoError(f"{source}: no tokenizer saved with it; pass tokenizer= (or --tokenizer)")
    with tempfile.TemporaryDirectory(prefix="orpo-export-") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return export_folder(Path(folder), path, type, source=source, **options)
