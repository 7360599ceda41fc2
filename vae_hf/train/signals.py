"""Stopping at a step boundary on SIGTERM (a cluster preemption) or SIGINT (Ctrl-C)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records a stop signal instead of dying on it, so the trainer can save first.

    `received` is this process's own news; `signal_name` is set only by `agree`, when the processes have
    shared their news at a step boundary. The loop acts on `signal_name` alone, so every process stops at the
    same step, however late one of them was signalled.
    """

    def __init__(self):
        self.received: str | None = None
        self.signal_name: str | None = None

    @contextlib.contextmanager
    def listening(self):
        def record(signum, _frame):
            self.received = self.received or signal.Signals(signum).name

        previous = {sig: signal.signal(sig, record) for sig in SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def agree(self, anyone_signalled: bool) -> None:
        """Take the agreed news: once any process was signalled, every process records a stop (a process
        that was not signalled itself records SIGTERM, the usual news of a preemption)."""
        if anyone_signalled and self.signal_name is None:
            self.signal_name = self.received or "SIGTERM"

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + int(getattr(signal, self.signal_name or "SIGTERM"))


def die_with_parent() -> bool:
    """Ask Linux to send this process SIGTERM when its parent dies; True when set.

    Only under a launcher (`accelerate launch`, torchrun): a launcher that is killed takes no care of its
    trainer, which would otherwise train on, orphaned, until the machine is taken away, and lose what it did
    since its last checkpoint. The trainer treats the signal as any stop: it saves, then exits with 143. A
    process started from a shell is left alone, so `nohup` keeps working.
    """
    launched = any(name in os.environ for name in LAUNCHER_VARIABLES)
    if not launched or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
    return True


PR_SET_PDEATHSIG = 1
LAUNCHER_VARIABLES = ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")
"""Set by `accelerate launch` (every launcher it has) and by torchrun in the processes they start."""
