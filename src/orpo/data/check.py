"""The report ``orpo check-data`` prints: a preference dataset loaded, validated and summarised before training
on it (the same path as training: :func:`orpo.data.read_pairs`, then tokenization)."""

from __future__ import annotations

from orpo import defaults
from orpo.data import read_pairs
from orpo.data.tokenize import ROW_INDEX, TruncationLimits, tokenize_dataset

MEASURE_FACTOR = 64  # token lengths are measured up to this many times max_length

BOUNDARY = "⟦|⟧"  # marks where the prompt ends and the response begins


def _percentiles(lengths: list[int]) -> str:
    ordered = sorted(lengths)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return f"p50 {at(0.5):>6}  p90 {at(0.9):>6}  p99 {at(0.99):>6}  max {ordered[-1]:>6}"


def _multi_turn_rows(dataset) -> list[int]:
    """Rows whose prompt holds an earlier assistant turn: the turns chosen and rejected share went to the prompt."""
    prompts = dataset["prompt"]
    return [
        k
        for k, prompt in enumerate(prompts)
        if isinstance(prompt, list) and any(m["role"] == "assistant" for m in prompt)
    ]


def _describe_split(row: dict) -> str:
    def turns(messages) -> str:
        return ", ".join(m["role"] for m in messages) if isinstance(messages, list) else "text"

    return f"prompt [{turns(row['prompt'])}] | chosen [{turns(row['chosen'])}] | rejected [{turns(row['rejected'])}]"


def check_data(
    source,
    tokenizer=None,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    limits: TruncationLimits | None = None,
    skip_invalid: bool = False,
    split: str = "train",
    subset: str | None = None,
) -> str:
    """The report ``orpo check-data`` prints; raises :class:`orpo.OrpoError` listing the problems
    (file:line: field: what) when rows are invalid and ``skip_invalid`` is off."""
    pairs = read_pairs(
        source, fmt=fmt, columns=columns, skip_invalid=skip_invalid, split=split, subset=subset
    )
    dataset, skipped, source_name = pairs.dataset, pairs.skipped, pairs.name
    lines = [f"source:  {source_name}", f"format:  {pairs.format}", f"rows:    {len(dataset)} valid"]
    for rule, count in sorted(pairs.splits.items()):
        lines.append(f"prompt:  {count} rows split {rule}")
    multi_turn = _multi_turn_rows(dataset)
    if multi_turn:
        lines.append(
            f"multi-turn: {len(multi_turn)} rows; the turns chosen and rejected share are their prompt, the "
            f"turns that differ their responses (row {multi_turn[0] + 1}: {_describe_split(dataset[multi_turn[0]])})"
        )
    if skipped:
        lines.append(f"skipped: {len(skipped)} invalid rows, e.g.")
        lines += [f"  {problem}" for problem in skipped[:10]]
    if tokenizer is None:
        lines.append("(give --tokenizer to see token lengths, truncation and the rendered first row)")
        return "\n".join(lines)

    limits = limits or TruncationLimits()
    # Lengths as the data has them, up to a cap far above any limit: a 50 MB text is not tokenized whole.
    measured = MEASURE_FACTOR * (limits.max_length or defaults.MAX_LENGTH)
    untruncated, _ = tokenize_dataset(
        dataset, tokenizer, TruncationLimits(None, measured, measured), source=source_name
    )
    lines.append(f"token lengths (one over {measured:,} counts as {measured:,}):")
    for name in ("prompt", "chosen", "rejected"):
        lengths = [len(ids) for ids in untruncated[f"{name}_input_ids"]]
        lines.append(f"  {name:<9}{_percentiles(lengths)}")
    truncated, report = tokenize_dataset(dataset, tokenizer, limits, source=source_name)
    lines.append(
        f"at max_length={limits.max_length}, max_prompt_length={limits.max_prompt_length}, "
        f"max_completion_length={limits.max_completion_length}:"
    )
    lines.append(
        f"  {report.prompts_truncated} prompts truncated, {report.responses_truncated} rows with a response "
        f"truncated, {sum(report.dropped.values())} rows dropped"
    )
    for reason, count in report.dropped.items():
        lines.append(f"  dropped {count}: {reason}")
    if report.identical_pairs:
        lines.append(f"  {report.identical_pairs} rows with identical chosen and rejected")
    shown = [("first row", 0)]
    kept = truncated[ROW_INDEX]  # rows dropped while tokenizing are not there
    if multi_turn and multi_turn[0] != kept[0] and multi_turn[0] in kept:
        shown.append((f"first multi-turn row (row {multi_turn[0] + 1})", kept.index(multi_turn[0])))
    for title, k in shown:
        row = truncated[k]
        prompt = tokenizer.decode(row["prompt_input_ids"])
        lines.append(f"{title} as the model sees it ({BOUNDARY} = where the scored response starts):")
        for name in ("chosen", "rejected"):
            lines.append(f"  {name}: {prompt + BOUNDARY + tokenizer.decode(row[f'{name}_input_ids'])!r}")
    return "\n".join(lines)
