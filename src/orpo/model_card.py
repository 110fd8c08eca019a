"""The ``README.md`` model card written beside every model and checkpoint the trainer saves, and by
``push_to_hub`` (as TRL's trainers do): the hub metadata (base model, datasets, tags ``trl`` / ``orpo``),
how the model was trained (the objective's settings, the batch layout, the data), the final held-out metrics
when there was an evaluation, the framework versions and the ORPO citation."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import yaml

CARD_FILE = "README.md"
ORPO_CITATION = """@article{hong2024orpo,
    title        = {{ORPO: Monolithic Preference Optimization without Reference Model}},
    author       = {Jiwoo Hong and Noah Lee and James Thorne},
    year         = 2024,
    eprint       = {arXiv:2403.07691}
}"""
FRAMEWORKS = ("orpo", "transformers", "torch", "datasets", "tokenizers", "peft")


def hub_name(name_or_path: str | None) -> str | None:
    """``name_or_path`` if it names a hub repository (``ORG/NAME``), not a local folder or file."""
    if not name_or_path or os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")):
        return None
    return name_or_path if name_or_path.count("/") == 1 else None


def _versions() -> list[str]:
    found = []
    for package in FRAMEWORKS:
        try:
            found.append(f"- {package}: {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def final_eval_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last evaluation's ``eval_*`` metrics in ``log_history`` (empty when there was none)."""
    for entry in reversed(log_history):
        if "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, int | float)}
    return {}


def model_card(
    *,
    model_name: str,
    base_model: str | None,
    datasets: list[str],
    tags: list[str],
    settings: dict,
    data: list[str],
    metrics: dict[str, float],
    hub_model_id: str | None,
    library_name: str = "transformers",
    language=None,
    license: str | None = None,
) -> str:
    """The card's text: YAML metadata the hub reads, then the description."""
    metadata = {
        "base_model": base_model,
        "datasets": datasets or None,
        "language": language,
        "library_name": library_name,
        "license": license,
        "model_name": model_name,
        "tags": tags,
    }
    header = yaml.safe_dump({k: v for k, v in metadata.items() if v is not None}, sort_keys=False)
    origin = (
        f"a fine-tuned version of [{base_model}](https://huggingface.co/{base_model})"
        if base_model
        else "a model"
    )
    on = "".join(f" on [{d}](https://huggingface.co/datasets/{d})" for d in datasets[:1])
    lines = [
        f"---\n{header}---",
        "",
        f"# {model_name}",
        "",
        f"This model is {origin}{on}, trained with ORPO (odds ratio preference optimization, "
        "[Hong, Lee and Thorne 2024](https://huggingface.co/papers/2403.07691)) by "
        "[orpo](https://pypi.org/project/orpo/), on transformers' Trainer: one stage, no reference model.",
        "",
        "## Quick start",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'generator = pipeline("text-generation", model="{hub_model_id or "PATH_TO_THIS_FOLDER"}")',
        'print(generator([{"role": "user", "content": "Hello!"}], max_new_tokens=64)[0]["generated_text"])',
        "```",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| `{key}` | {value} |" for key, value in settings.items()),
    ]
    if data:
        lines += ["", "Training data:", "", *(f"- {line}" for line in data)]
    if metrics:
        lines += ["", "## Held-out metrics (last evaluation)", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{key}` | {value:.4f} |" for key, value in metrics.items()]
    lines += [
        "",
        "## Framework versions",
        "",
        *_versions(),
        "",
        "## Citation",
        "",
        "```bibtex",
        ORPO_CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(trainer, output_dir: str | None = None, **card_kwargs) -> Path | None:
    """Write the card of ``trainer``'s model to ``output_dir/README.md`` (the first process only).
    ``card_kwargs``: TRL's ``create_model_card`` arguments (``model_name``, ``dataset_name``, ``tags``) and
    transformers' (``language``, ``license``, ``finetuned_from``, ``dataset`` / ``dataset_tags``, ...)."""
    if not trainer.is_world_process_zero():
        return None
    args = trainer.args
    folder = Path(output_dir or args.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = getattr(model, "get_base_model", lambda: model)()
    config = getattr(base, "config", None)
    model_name = card_kwargs.get("model_name") or (
        args.hub_model_id.split("/")[-1] if args.hub_model_id else Path(args.output_dir).name
    )
    datasets = [
        name
        for value in (
            card_kwargs.get("dataset_name"),
            card_kwargs.get("dataset_tags"),
            card_kwargs.get("dataset"),
        )
        for name in ([value] if isinstance(value, str) else value or [])
    ]
    tags = card_kwargs.get("tags") or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    tags = list(
        dict.fromkeys(
            ["generated_from_trainer", *tags, *(getattr(model, "model_tags", None) or []), "trl", "orpo"]
        )
    )
    settings = {
        "orpo_alpha (λ)": args.orpo_alpha,
        "orpo_beta": args.orpo_beta,
        "nll_include_prompt": args.nll_include_prompt,
        "max_length / max_prompt_length": f"{args.max_length} / {args.max_prompt_length}",
        "learning_rate": args.learning_rate,
        "effective batch": f"{args.per_device_train_batch_size} × {args.gradient_accumulation_steps} accumulation"
        f" × {args.world_size} processes",
        "steps": trainer.state.global_step,
        "batch layout": getattr(getattr(trainer, "layout", None), "description", "the given collator"),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
    }
    data = [report.summary() for report in getattr(trainer, "tokenize_reports", {}).values()]
    text = model_card(
        model_name=model_name,
        base_model=card_kwargs.get("finetuned_from") or hub_name(getattr(config, "_name_or_path", None)),
        datasets=datasets,
        tags=tags,
        settings=settings,
        data=data,
        metrics=final_eval_metrics(trainer.state.log_history),
        hub_model_id=getattr(trainer, "hub_model_id", None) or args.hub_model_id,
        library_name="peft" if base is not model else "transformers",
        language=card_kwargs.get("language"),
        license=card_kwargs.get("license"),
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CARD_FILE).write_text(text, encoding="utf-8")
    return folder / CARD_FILE
