"""Ctrl-C and SIGTERM stop training at the next optimizer-step boundary, with a checkpoint.

Clusters send SIGTERM some time before they kill a job; people press Ctrl-C. Raising from the
signal handler could land between ``optimizer.step()`` and the step counter's increment and save a
checkpoint whose weights and step disagree. Instead the handler only records the signal; at the end
of the current optimizer step :class:`StopOnSignal` asks the Trainer to save a checkpoint and stop.
A second signal stops at once (``KeyboardInterrupt``), without a new checkpoint.
"""

from __future__ import annotations

import signal
import sys

from transformers import TrainerCallback


class StopOnSignal(TrainerCallback):
    """Use as a context manager around ``trainer.train()``; ``received`` is the signal number, if any."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this optimizer step, then saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + int(self.received or signal.SIGINT)
