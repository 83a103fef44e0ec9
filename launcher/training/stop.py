"""Stopping a run on a signal: a checkpoint first, then exit, on every rank together.

SIGUSR1 and SIGTERM (Slurm's warning and its preemption) and SIGINT (Ctrl-C) set a flag; every
rank agrees on it at the next step boundary, or before the next batch of an eval under way (the
eval is dropped: launcher/evaluation/evaluate.py EvalInterrupted), and the run saves a checkpoint
of the last finished step and leaves. A save under way when the signal comes runs to its end:
that is what the grace period is for, and a half-written checkpoint is no use (saves are atomic,
so a kill during one leaves the previous checkpoint). A second Ctrl-C stops at once (exit 130),
for a user who will not wait for the checkpoint.
"""
from __future__ import annotations

import signal
import sys

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


class StopRequest:
    """A signal handler that records the first stop signal; a second SIGINT raises SystemExit(130)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None
        for number in self.SIGNALS:
            signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        if number == signal.SIGINT and self.signal == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            print("\nstopped at once (a second Ctrl-C): the last checkpoint written is kept", file=sys.stderr, flush=True)
            raise SystemExit(INTERRUPTED)
        if number == signal.SIGINT and self.signal is None:
            print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        self.signal = self.signal or number

    def agreed(self, accelerator) -> bool:
        import torch
        flag = torch.tensor([1.0 if self.signal else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())

    def exit_status(self) -> int:
        """130 after Ctrl-C, as a shell expects; 0 after SIGTERM/SIGUSR1 (a preempted job that checkpointed ended well)."""
        return INTERRUPTED if self.signal == signal.SIGINT else 0
