"""What the two demos share: their messages and tables, their options, the trainer settings both start
from, what a demo model saves beside itself, and greedy answers."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from orpo import run_folder
from orpo.config import ORPOConfig
from orpo.errors import UsageError
from orpo.generation import complete
from orpo.trainer import ORPOTrainer


class BarOnlyProgress(ProgressCallback):
    """Trainer's progress bar without a printed dict per logging step (the table comes at the end)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def say(message: str) -> None:
    print(message, flush=True)


def quiet_libraries() -> None:
    """Errors only from transformers and orpo's loggers: the demo prints its own summary."""
    hf_logging.set_verbosity_error()
    logging.getLogger("orpo").setLevel(logging.ERROR)


def bar_only(trainer: ORPOTrainer) -> None:
    """A progress bar, and no printed dict per logging step (the table comes at the end)."""
    for noisy in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(noisy)
    trainer.add_callback(BarOnlyProgress)


def text_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right; a rule under the
    first row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_options(max_steps, alpha, default_steps: int, default_alpha: float) -> tuple[int, float]:
    """``--max-steps`` and ``--alpha`` of a demo (None: its defaults), checked."""
    max_steps = default_steps if max_steps is None else max_steps
    alpha = default_alpha if alpha is None else alpha
    if max_steps < 1:
        raise UsageError(f"--max-steps must be >= 1, got {max_steps}")
    if alpha <= 0:
        raise UsageError(
            f"--alpha must be > 0 for the ORPO run (the baseline is the alpha=0 run), got {alpha}"
        )
    return max_steps, alpha


def save_run_settings(folder: Path, model: str, datasets: list[str], alpha: float, args: ORPOConfig) -> None:
    """What a demo model was trained with, as ``orpo train`` saves it (:mod:`orpo.run_folder`), with the names of
    its model and data: ``orpo eval`` scores with these by default. ``alpha`` is the run's own (the demos
    score every model under the ORPO run's)."""
    settings = {"model": model, "datasets": datasets, **run_folder.settings_of(args), "orpo_alpha": alpha}
    run_folder.write_settings(folder, settings)


def demo_config(output_dir: Path, *, alpha: float, max_steps: int, seed: int, **settings) -> ORPOConfig:
    """The settings both demos train with (a cosine schedule, logging about 20-30 times a run, nothing saved
    but the final model, a progress bar), plus each demo's own ``settings`` (batch sizes, learning rate,
    lengths, warm-up, logging interval)."""
    return ORPOConfig(
        output_dir=str(output_dir),
        orpo_alpha=alpha,
        max_steps=max_steps,
        lr_scheduler_type="cosine",
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
        seed=seed,
        # small models: their activations are small, and recomputing them costs time, not memory
        activation_checkpointing=False,
        **settings,
    )


def greedy_completions(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int):
    """Greedy completions (token ids) of tokenized prompts, in batches of ``batch_size``."""
    model.eval()
    return complete(
        model,
        prompt_ids,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        do_sample=False,
    )
