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
import os
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

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
