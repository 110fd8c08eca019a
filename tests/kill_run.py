"""``orpo train`` with a fault-injection hook, for the kill tests: when the hook's step comes, it
writes ``MARKER`` and sleeps, so the test can SIGKILL the process at that exact point.

    python tests/kill_run.py after-save:10 MARKER train ...    # after checkpoint-10 is complete
    python tests/kill_run.py during-save:20 MARKER train ...   # checkpoint-20 written, not yet published
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import orpo.checkpoints as checkpoints
from orpo.cli import main


def hang(marker: str) -> None:
    Path(marker).write_text("now")
    while True:
        time.sleep(1)


def install(hook: str, marker: str) -> None:
    where, step = hook.split(":")
    if where == "during-save":
        real_fsync_tree = checkpoints._fsync_tree

        def fsync_then_hang(root):
            real_fsync_tree(root)
            if root.endswith(f"checkpoint-{step}"):
                hang(marker)  # staged and flushed, not yet renamed into place

        checkpoints._fsync_tree = fsync_then_hang
    elif where == "after-save":
        real_save = checkpoints.AtomicCheckpoints._save_checkpoint

        def save_then_hang(self, model, trial):
            real_save(self, model, trial)
            if self.state.global_step == int(step):
                hang(marker)

        checkpoints.AtomicCheckpoints._save_checkpoint = save_then_hang
    else:
        raise SystemExit(f"unknown hook {hook}")


if __name__ == "__main__":
    install(sys.argv[1], sys.argv[2])
    sys.exit(main(sys.argv[3:]))
