"""Preference data, from where it lives to the tensors of a batch.

One path for the trainer, ``orpo check-data`` and ``orpo eval``: :func:`load_pairs` =
sources (:mod:`.sources`: files, folders, hub, in-memory, ``demo:``) → formats (:mod:`.formats`: detect,
normalise, the only row checker) → tokenize (:mod:`.tokenize`: truncation, cache). Batches are laid out by
:mod:`.collator` and grouped into token budgets by :mod:`.batching`; :mod:`.check` is the report
``orpo check-data`` prints.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict

from orpo.data.formats import normalize_source
from orpo.data.sources import load_source
from orpo.data.tokenize import (
    TOKENIZED_COLUMNS,
    TokenizeReport,
    TruncationLimits,
    default_cache_dir,
    split_off_eval,
    tokenize_dataset,
)
from orpo.errors import OrpoError

logger = logging.getLogger("orpo")

__all__ = ["Pairs", "TruncationLimits", "TokenizeReport", "load_pairs", "load_run_pairs", "read_pairs"]


@dataclass
class Pairs:
    """Normalised preference rows (``prompt`` / ``chosen`` / ``rejected``) and where they came from."""

    dataset: Dataset
    format: str  # standard, conversational or implicit (as detected or given)
    name: str  # the sources, for messages
    skipped: list[str] = field(default_factory=list)  # problems of rows left out (skip_invalid)
    splits: Counter = field(default_factory=Counter)  # implicit-prompt text rows by the rule that split them


def check_weight(source, value) -> float:
    """A source's weight: a finite number above 0 (0 would keep none of its rows)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise OrpoError(
            f"dataset {source}: weight must be a number above 0 (a fraction or a repeat count), got {value!r}"
        )
    return float(value)


def _source_weight_split(spec) -> tuple[object, float, str | None]:
    """A source, its weight and its own split (None: the caller's), from any way of writing one."""
    if isinstance(spec, dict) and "path" in spec:
        return spec["path"], spec.get("weight", 1.0), spec.get("split")
    if isinstance(spec, tuple | list) and len(spec) == 2 and isinstance(spec[1], int | float):
        return spec[0], spec[1], None
    return spec, 1.0, None


def _take(dataset: Dataset, weight: float, seed: int) -> Dataset:
    """``weight`` times the rows: whole copies, then a seeded random fraction of one more."""
    import random

    whole = int(weight)
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    indices = list(range(len(dataset))) * whole + order[: round((weight - whole) * len(dataset))]
    return dataset.select(indices)


def read_pairs(
    spec,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    skip_invalid: bool = False,
    split: str = "train",
    seed: int = 0,
    subset: str | None = None,
) -> Pairs:
    """Sources → formats: load, validate and normalise one source or a weighted mix of sources.

    ``spec`` is a source (path, hub name, ``demo:train``, ``Dataset``...) or a list of sources, each
    optionally with a weight: ``[{"path": "a.jsonl", "weight": 0.5}, ("b.jsonl", 2.0), "c.jsonl"]``. A
    weight below 1 keeps that fraction of the source's rows (a seeded random subset), above 1 repeats them.
    A ``{"path", "split"}`` source takes that split of a hub dataset or ``DatasetDict`` instead of ``split``.
    """
    from datasets import concatenate_datasets

    specs = spec if isinstance(spec, list) else [spec]
    parts, formats, names, skipped, splits = [], set(), [], [], Counter()
    for k, item in enumerate(specs):
        source, weight, own_split = _source_weight_split(item)
        weight = check_weight(source, weight)
        loaded = load_source(source, split=own_split or split, subset=subset)
        dataset, detected, problems = normalize_source(
            loaded, fmt=fmt, columns=columns, skip_invalid=skip_invalid, splits=splits
        )
        parts.append(_take(dataset, weight, seed + k) if weight != 1.0 else dataset)
        formats.add("standard" if isinstance(dataset[0]["prompt"], str) else "conversational")
        names.append(loaded.name if weight == 1.0 else f"{loaded.name} x{weight:g}")
        skipped += problems
        last_format = detected
    if len(formats) > 1:
        raise OrpoError(
            f"the sources mix plain-text and conversational rows ({', '.join(names)}); convert one side so all "
            "rows are rendered the same way"
        )
    dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    fmt = last_format if len(parts) == 1 else formats.pop()
    return Pairs(dataset, fmt, " + ".join(names), skipped, splits)


def load_pairs(
    spec,
    tokenizer,
    limits: TruncationLimits,
    *,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    skip_invalid: bool = False,
    split: str = "train",
    seed: int = 0,
    subset: str | None = None,
    num_proc: int | None = None,
    name: str | None = None,
) -> tuple[Dataset, TokenizeReport]:
    """The one way data reaches training and evaluation: :func:`read_pairs`, then tokenization and
    truncation (:func:`orpo.data.tokenize.tokenize_dataset`, cached under ``$ORPO_CACHE_DIR``). An already
    tokenized ``Dataset`` (``prompt_input_ids`` ...) is taken as it is. ``name`` names an in-memory
    source in messages (e.g. ``train_dataset``)."""
    if isinstance(spec, Dataset) and all(column in spec.column_names for column in TOKENIZED_COLUMNS):
        return spec.select_columns(list(TOKENIZED_COLUMNS)), TokenizeReport(
            source=name or "dataset", rows_in=len(spec)
        )
    pairs = read_pairs(spec, fmt, columns, skip_invalid, split, seed, subset)
    source = name if name and pairs.name == "dataset" else pairs.name
    tokenized, report = tokenize_dataset(
        pairs.dataset, tokenizer, limits, source=source, num_proc=num_proc, cache_dir=default_cache_dir()
    )
    report.chat_template = len(pairs.dataset) > 0 and isinstance(pairs.dataset[0]["prompt"], list)
    return tokenized, report


def load_run_pairs(
    train, evaluation, tokenizer, args
) -> tuple[Dataset | None, object, dict[str, TokenizeReport]]:
    """The trainer's datasets: each through :func:`load_pairs` with the options of ``args`` (an
    ``ORPOConfig``; the first process tokenizes, the others read its cache), ``evaluation`` possibly a dict
    of named sets; then ``val_set_size`` holds out part of the training pairs. Returns ``(train,
    evaluation, reports)``, the reports by dataset name."""
    limits = TruncationLimits(args.max_length, args.max_prompt_length, args.max_completion_length)
    reports = {}

    def load(dataset, name: str, split: str):
        if dataset is None:
            return None
        options = dict(
            fmt=args.dataset_format, columns=args.dataset_columns, skip_invalid=args.skip_invalid_rows
        )
        tokenized, reports[name] = load_pairs(
            dataset,
            tokenizer,
            limits,
            **options,
            split=split,
            seed=args.seed,
            subset=args.dataset_subset,
            num_proc=args.dataset_num_proc,
            name=name,
        )
        return tokenized

    with args.main_process_first(desc="tokenizing datasets"):
        train = load(train, "train_dataset", "train")
        if isinstance(evaluation, dict | DatasetDict):
            evaluation = {key: load(ds, f"eval_dataset[{key}]", "test") for key, ds in evaluation.items()}
        else:
            evaluation = load(evaluation, "eval_dataset", "test")
    if args.val_set_size and train is not None:
        if evaluation is not None:
            raise OrpoError("give val_set_size or an eval_dataset, not both")
        total = len(train)
        train, evaluation = split_off_eval(train, args.val_set_size, args.seed)
        logger.warning(
            f"val_set_size {args.val_set_size:g}: {len(evaluation)} of {total} training pairs held out "
            f"for evaluation (seed {args.seed})"
        )
    return train, evaluation, reports
