"""Process pools whose workers end with the process that started them, even when it is SIGKILLed."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor


def die_with_parent(parent_pid: int, use_prctl: bool = True) -> None:
    """Pool-worker initializer: end this process when the one that started it dies.

    A parent killed with SIGKILL cannot shut its pool down, and its workers would stay blocked on
    the job queue. On Linux the kernel is asked to send SIGTERM then (``PR_SET_PDEATHSIG``);
    elsewhere, or when that fails, a thread checks every 0.5 s whether the parent changed.

    Args:
        parent_pid: pid of the process creating the pool.
        use_prctl: False forces the watchdog thread.
    """
    watched = os.getppid()
    if watched != parent_pid and not _alive(parent_pid):
        os._exit(1)  # it died before this worker got here
    if use_prctl and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != watched:
                os._exit(1)  # the parent died between fork and prctl
            return

    def watch() -> None:
        while os.getppid() == watched:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="her2lab-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_pool(num_workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers end when this process dies, even by SIGKILL."""
    return ProcessPoolExecutor(num_workers, initializer=die_with_parent, initargs=(os.getpid(),))
