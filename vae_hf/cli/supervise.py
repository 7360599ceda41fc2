"""`vae-hf supervise -- COMMAND ...`: run a training job so that a stop signal always ends in a saved checkpoint.

The problem it solves: `docker stop`, a Kubernetes eviction or a scheduler's preemption sends SIGTERM to one
process, the container's first, which is usually the launcher (`accelerate launch`). One-process launchers die
of it on the spot, and a container ends when its first process does: the trainer, which would have saved on
SIGTERM, is killed before it can. The supervisor is that first process instead. It

- starts COMMAND in a process group of its own;
- forwards SIGTERM and SIGINT to the whole group, so that every trainer process hears the stop itself;
- adopts the processes whose parent died (Linux's child subreaper; a container's first process adopts them
  anyway), and exits only when no process of the job is left, so the trainers finish their checkpoints;
- exits with 128 + the signal's number when it was stopped by a signal (143 for SIGTERM), as the job would
  have, else with COMMAND's own status.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

from vae_hf.errors import UserError

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGTERM, signal.SIGINT)


class SuperviseError(UserError, ValueError):
    """The command to supervise is missing or cannot start."""


def supervise_command(command: list[str]) -> int:
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SuperviseError("supervise: give the command to run, e.g. vae-hf supervise -- accelerate launch ...")
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        try:
            os.killpg(job.pid, signum)
        except ProcessLookupError:  # the group's processes are all gone already
            pass

    try:
        job = subprocess.Popen(command, start_new_session=True)  # its own group (and session): ours to signal
    except OSError as error:
        raise SuperviseError(f"supervise: cannot run {command[0]}: {error.strerror or error}") from None
    for sig in FORWARDED:
        signal.signal(sig, forward)
    status = None
    while True:
        try:
            pid, wait_status = os.wait()  # the job, and any of its processes orphaned to us
        except ChildProcessError:
            break
        if pid == job.pid:
            status = os.waitstatus_to_exitcode(wait_status)
    if received:
        return 128 + received[0]
    return 128 - status if status < 0 else status  # a command killed by a signal: as a shell reports it
