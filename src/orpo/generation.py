"""Completions of tokenized prompts, and the samples ``generate_during_eval`` logs at each evaluation.

Prompts go in left-padded batches (so every row's completion starts at the same column) and come
back as the new tokens of each row up to and including its first EOS.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from orpo import defaults

TABLE_COLUMNS = ["Prompt", "Policy"]  # TRL's column names for its "game_log" table


def complete(
    model,
    prompts: list[list[int]],
    *,
    pad_token_id: int,
    eos_token_id: int | None,
    max_new_tokens: int,
    batch_size: int = 64,
    do_sample: bool | None = None,
) -> list[list[int]]:
    """The new token ids the model generates after each prompt, cut after the first EOS.

    ``do_sample=None`` decodes as the model's ``generation_config`` says (chat models often sample);
    False is greedy. The caller puts the model in eval mode; gradients are off here."""
    options = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_token_id, "eos_token_id": eos_token_id}
    if do_sample is not None:
        options["do_sample"] = do_sample
    device = next(model.parameters()).device
    completions = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options
            )
        for row in out[:, width:].tolist():
            if eos_token_id is not None and eos_token_id in row:
                row = row[: row.index(eos_token_id) + 1]
            completions.append(row)
    return completions


def sample_indices(num_rows: int, count: int, seed: int) -> list[int]:
    """``count`` row indices drawn once from ``seed``: the same prompts at every evaluation, so their
    completions show how the model changes."""
    return sorted(random.Random(seed).sample(range(num_rows), min(count, num_rows)))


def publish_generations(rows: list[dict], output_dir: str, report_to: list[str], table: str) -> None:
    """Append ``rows`` (``step``, ``dataset``, ``prompt``, ``completion``) to
    ``output_dir/eval_generations.jsonl`` and log them as a ``table`` to W&B and Comet when the run
    reports there and a run / experiment is active (as TRL does)."""
    path = Path(output_dir) / "eval_generations.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    data = [[row["prompt"], row["completion"]] for row in rows]
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.log({table: wandb.Table(columns=TABLE_COLUMNS, data=data)})
    if "comet_ml" in report_to:
        import comet_ml

        experiment = comet_ml.get_running_experiment()
        if experiment is not None:
            experiment.log_table(f"{table}.csv", tabular_data=data, headers=TABLE_COLUMNS)


def eval_samples(model, dataset, tokenizer, args, pad_token_id: int, autocast) -> list[dict]:
    """``generate_during_eval``: completions for ``per_device_eval_batch_size`` prompts of a tokenized
    evaluation ``dataset``, the same ones at every evaluation (``args.seed``), as rows of ``prompt`` and
    ``completion`` text. New tokens: ``max_completion_length``, else what ``max_length`` leaves after the
    longest prompt. ``model`` is unwrapped; it is put in eval mode for the call (``autocast``: the run's
    mixed precision context) and back after."""
    rows = sample_indices(len(dataset), args.per_device_eval_batch_size, args.seed)
    prompts = [list(ids) for ids in dataset.select(rows)["prompt_input_ids"]]
    new_tokens = args.max_completion_length or max(
        1, (args.max_length or defaults.MAX_LENGTH) - max(len(ids) for ids in prompts)
    )
    was_training = model.training
    model.eval()
    try:
        with autocast():
            completions = complete(
                model,
                prompts,
                pad_token_id=pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                max_new_tokens=new_tokens,
                batch_size=args.per_device_eval_batch_size,
            )
    finally:
        model.train(was_training)
    return [
        {
            "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
            "completion": tokenizer.decode(completion, skip_special_tokens=True),
        }
        for prompt, completion in zip(prompts, completions, strict=True)
    ]
