"""Kill-safe checkpoints: a checkpoint directory appears under its final name only once complete.

``transformers.Trainer`` writes ``checkpoint-N/`` in place: a kill while it writes leaves a
half-written newest checkpoint, which ``resume_from_checkpoint=True`` then picks and fails on (or,
worse, loads a model whose optimizer state is missing). :class:`AtomicCheckpoints` makes the
Trainer write into ``<output_dir>/.incomplete/checkpoint-N`` and renames it to
``<output_dir>/checkpoint-N`` when every file (and every process's shard) is written; only then
does it rotate old checkpoints, so ``save_total_limit`` never deletes the last good one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from orpo.errors import OrpoError

STAGING_DIR = ".incomplete"


class AtomicCheckpoints:
    """Mixin for a ``transformers.Trainer`` subclass (put it before ``Trainer`` in the bases)."""

    _staging_root: str | None = None

    def _get_output_dir(self, trial):
        # While a checkpoint is being written, the Trainer's "run dir" is the staging area.
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # leftovers of a save that was killed
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)  # writes staged/, rotates nothing that matters
        except (OSError, RuntimeError) as err:
            if not _out_of_space(err):
                raise
            shutil.rmtree(staged, ignore_errors=True)  # the partial one: nothing may pick it up
            with contextlib.suppress(OSError):
                os.rmdir(staging_root)
            kept = sorted(
                (n for n in os.listdir(run_dir) if n.startswith(f"{PREFIX_CHECKPOINT_DIR}-")),
                key=lambda n: int(n.rsplit("-", 1)[-1]) if n.rsplit("-", 1)[-1].isdigit() else -1,
            )
            intact = f"{kept[-1]} is intact" if kept else "no earlier checkpoint exists"
            raise OrpoError(f"no space left on device while writing {name} in {run_dir}; {intact}") from err
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every process's files are in staged/
        if self.args.should_save:
            _fsync_tree(staged)
            if os.path.exists(final):  # the same step saved again (e.g. interrupted right after a save)
                replaced = os.path.join(staging_root, name + ".replaced")
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
                os.replace(staged, final)
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                os.replace(staged, final)
            _fsync_dir(run_dir)
            with contextlib.suppress(OSError):
                os.rmdir(staging_root)  # only if empty
            best = self.state.best_model_checkpoint
            if best is not None and os.path.dirname(best) == staging_root:
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


def _fsync_tree(root: str) -> None:
    """Flush every file under ``root`` to disk, so the rename publishes complete files."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _out_of_space(err: BaseException) -> bool:
    """A full disk, as the OS says it (ENOSPC) or as torch's zip writer does ("unexpected pos")."""
    text = str(err)
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text or "unexpected pos" in text


def remove_incomplete_checkpoints(output_dir: str | Path) -> None:
    """Leftovers of a save that was killed or ran out of space (``OUTPUT_DIR/.incomplete/``): never resumed
    from, removed when the next run starts."""
    shutil.rmtree(Path(output_dir) / STAGING_DIR, ignore_errors=True)


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """What keeps ``checkpoint`` from restoring a run exactly, or None: a state file missing (a resume without
    the optimizer or scheduler state would silently train elsewhere), or one that is damaged (an unreadable
    trainer_state.json or safetensors header, a .pt that is no torch archive). Engines that save their own
    state (DeepSpeed's global_step*/, FSDP's optimizer_*) count as having the optimizer's."""
    path = Path(checkpoint)
    names = {p.name for p in path.iterdir()}
    if "trainer_state.json" not in names:
        return "trainer_state.json is missing"
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"trainer_state.json is damaged ({err})"
    engine_optimizer = any(n.startswith(("global_step", "optimizer_")) for n in names)
    for required in ("scheduler.pt", *(() if engine_optimizer else ("optimizer.pt",))):
        if required not in names:
            return f"{required} is missing"
        if not zipfile.is_zipfile(path / required):
            return f"{required} is damaged (not a torch archive)"
    weights = [n for n in ("model.safetensors", "adapter_model.safetensors") if n in names]
    if not weights and not any(
        n.endswith(".index.json") or n.startswith("pytorch_model_fsdp") for n in names
    ):
        return "no model weights (model.safetensors) in it"
    for name in weights:
        try:
            from safetensors import safe_open

            with safe_open(str(path / name), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001 - any failure to read the header is damage
            return f"{name} is damaged ({err})"
    return None


def newest_complete_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in ``output_dir`` that :func:`checkpoint_problem` finds nothing wrong with, and
    what was wrong with the newer ones (``checkpoint-N: problem``)."""
    found = sorted(
        (
            p
            for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
            if p.is_dir() and p.name.split("-")[-1].isdigit()
        ),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    skipped = []
    for checkpoint in found:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append(f"{checkpoint.name}: {problem}")
    return None, skipped
