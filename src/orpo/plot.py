"""Training curves of one or several runs on one figure (headless matplotlib)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from orpo.errors import OrpoError

PANELS = [
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "reward margin"),
    ("logps/chosen", "mean log-prob, chosen"),
    ("logps/rejected", "mean log-prob, rejected"),
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
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise OrpoError(f"{path}: not a readable training log ({err})") from err
            history = data.get("log_history") if isinstance(data, dict) else data
            if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
                raise OrpoError(f"{path}: no log_history list of logged steps in it")
            return history
    raise OrpoError(f"{run}: no trainer_state.json, log_history.json or checkpoint-*/trainer_state.json")


@dataclass
class Curve:
    panel: str  # a key of PANELS
    run: int  # index of the run: its colour
    label: str
    steps: list[int]
    values: list[float]
    evaluation: bool  # drawn dashed with markers, in the run's colour


def curves(runs: list[tuple[str, list[dict]]]) -> list[Curve]:
    """The lines to draw: per run and panel, the training curve and, where the run logged evaluations
    (``eval_*``), the evaluation curve."""
    out = []
    for k, (label, history) in enumerate(runs):
        logged = [h for h in history if "loss" in h and "step" in h]
        if not logged:
            raise OrpoError(f"run '{label}' has no logged training steps")
        evaluated = [h for h in history if "eval_loss" in h and "step" in h]
        for key, _ in PANELS:
            for rows, name, evaluation in ((logged, key, False), (evaluated, f"eval_{key}", True)):
                points = [(h["step"], h[name]) for h in rows if name in h]
                if points:
                    steps, values = zip(*points, strict=True)
                    out.append(
                        Curve(
                            key,
                            k,
                            label + (" (eval)" if evaluation else ""),
                            list(steps),
                            list(values),
                            evaluation,
                        )
                    )
    return out


def plot_runs(runs: list[tuple[str, list[dict]]], path: str | Path) -> None:
    """One panel per curve in :data:`PANELS`, one colour per run: training solid, evaluation dashed with
    markers; writes a PNG to ``path``."""
    if not Path(path).resolve().parent.is_dir():
        raise OrpoError(f"--output {path}: the folder {Path(path).parent} does not exist")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.5 * len(PANELS), 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panel_axes = {key: ax for ax, (key, _) in zip(axes, PANELS, strict=True)}
    for curve in curves(runs):
        style = {"linestyle": "--", "marker": "o", "markersize": 3} if curve.evaluation else {}
        panel_axes[curve.panel].plot(
            curve.steps, curve.values, color=colors[curve.run % len(colors)], label=curve.label, **style
        )
    for ax, (_, title) in zip(axes, PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
