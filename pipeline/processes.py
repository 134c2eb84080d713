"""Child processes that do not outlive the run that started them.

When a run is killed (SIGKILL, the OOM killer), its torchrun and the training ranks must stop
too: a rank left running would keep writing into a scratch directory that the next run resumes.
torchrun starts its ranks in sessions of their own, so killing the run's process group does not
reach them; each link of the chain is tied to its parent instead.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For ``Popen(preexec_fn=...)``: the kernel sends this child SIGKILL when its parent dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the watchdog below still applies to the ranks
        pass


def exit_when_orphaned(launcher: tuple[str, ...] = ("torch.distributed.run", "torchrun"), interval: float = 1.0) -> None:
    """End this process as soon as its parent is gone: now, when the parent is no longer the
    ``launcher`` (it died while this process was starting, and this one was re-parented), and
    later from a daemon thread that watches the parent pid."""
    parent = os.getppid()
    try:
        cmdline = open(f"/proc/{parent}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        cmdline = ""
    if not any(name in cmdline for name in launcher):
        os._exit(1)

    def watch():
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="exit-when-orphaned", daemon=True).start()
