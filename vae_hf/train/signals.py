"""Stopping at a step boundary on SIGTERM (a cluster preemption) or SIGINT (Ctrl-C)."""

from __future__ import annotations

import contextlib
import signal

import torch
from accelerate import Accelerator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records a stop signal instead of dying on it, so the trainer can save first."""

    def __init__(self):
        self.signal_name: str | None = None

    @contextlib.contextmanager
    def listening(self):
        def record(signum, _frame):
            self.signal_name = signal.Signals(signum).name

        previous = {sig: signal.signal(sig, record) for sig in SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def synchronize(self, accelerator: Accelerator) -> None:
        """Share the news: once any process was signalled, every process records a stop, so that all stop at
        the same step and save together."""
        if accelerator.num_processes == 1:
            return
        flag = torch.tensor(float(self.signal_name is not None), device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() > 0:  # a host sync, in multi-process runs only
            self.signal_name = self.signal_name or "SIGTERM"

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + int(getattr(signal, self.signal_name or "SIGTERM"))
