"""Training curves of one or several runs on one figure (headless matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

from orpo.errors import OrpoError

PANELS = [
    ("loss", "training loss"),
    ("rewards/accuracies", "reward accuracy (train)"),
    ("rewards/margins", "reward margin (train)"),
    ("logps/chosen", "mean log-prob, chosen (solid) / rejected (dashed)"),
]


def read_log_history(run_dir: str | Path) -> list[dict]:
    """``log_history`` of a run: its ``trainer_state.json``, a ``log_history.json``, or the newest
    ``checkpoint-*/trainer_state.json``."""
    run = Path(run_dir)
    candidates = [run / "trainer_state.json", run / "log_history.json"]
    checkpoints = sorted(
        run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
    )
    candidates += checkpoints[::-1]
    for path in candidates:
        if path.is_file():
            data = json.loads(path.read_text())
            return data["log_history"] if isinstance(data, dict) else data
    raise OrpoError(f"{run}: no trainer_state.json, log_history.json or checkpoint-*/trainer_state.json")


def plot_runs(runs: list[tuple[str, list[dict]]], path: str | Path) -> None:
    """One panel per curve in :data:`PANELS`, one line per run; writes a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, history) in enumerate(runs):
        logged = [h for h in history if "loss" in h and "step" in h]
        if not logged:
            raise OrpoError(f"run '{label}' has no logged training steps")
        steps = [h["step"] for h in logged]
        color = colors[k % len(colors)]
        for ax, (key, title) in zip(axes, PANELS, strict=True):
            if all(key in h for h in logged):
                ax.plot(steps, [h[key] for h in logged], color=color, label=label)
            if key == "logps/chosen" and all("logps/rejected" in h for h in logged):
                ax.plot(steps, [h["logps/rejected"] for h in logged], color=color, linestyle="--")
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
