"""Child processes that never outlive their parent.

A parent that stops cleanly stops its children itself; these helpers cover the rest: a parent
killed outright (SIGKILL, an OOM kill) and children that started children of their own.

- :func:`die_with_parent` (Linux): ``PR_SET_PDEATHSIG`` through ``prctl``, so the kernel
  signals this process when the thread that started it dies. Used in ``preexec_fn`` of a
  ``Popen``, it covers programs that are not Python (Mosquitto).
- :func:`watch_parent`: a daemon thread that ends this process when its parent process is gone.
  It does not depend on the parent *thread* (a pool worker may be started from any thread of
  the service) and works on every POSIX system.
- :func:`stop_group`: SIGTERM to a child's whole process group, SIGKILL to what lingers, so
  the grandchildren (a worker pool, multiprocessing's resource tracker) go too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

__all__ = ["die_with_parent", "group_alive", "preexec_die_with", "stop_group", "watch_parent"]

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent: int | None = None, sig: int = signal.SIGTERM,
                    prctl: Callable[..., int] | None = None) -> bool:
    """Ask the kernel for ``sig`` when the parent dies (Linux; False elsewhere).

    With ``parent`` given, a parent that is already gone (it died before this call, so no
    signal will come) ends this process at once."""
    prctl = prctl or _prctl()
    armed = prctl is not None and prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return armed


def preexec_die_with(parent: int, sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``Popen(preexec_fn=...)`` that arms :func:`die_with_parent` in the child (the
    library is loaded here, in the parent: the child between fork and exec only calls it)."""
    prctl = _prctl()

    def arm() -> None:
        die_with_parent(parent, sig, prctl)

    return arm


def watch_parent(parent: int | None = None, interval_s: float = 0.5) -> threading.Thread:
    """Start a daemon thread that ends this process (SIGTERM to itself, then exit) once
    ``parent`` (default: the current parent) is no longer its parent."""
    expected = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == expected:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)  # a handler that ignores SIGTERM does not keep an orphan alive
        os._exit(1)

    thread = threading.Thread(target=watch, name="watch-parent", daemon=True)
    thread.start()
    return thread


def group_alive(pgid: int) -> bool:
    """Whether any process of the group ``pgid`` is left (zombies of ours included)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout_s: float = 5.0,
               *, kill_after_s: float = 2.0) -> int | None:
    """Stop a child started with ``start_new_session=True`` and every process of its group.

    SIGTERM to the child (it stops its own children first), then to the group; whatever is
    left after ``timeout_s`` gets SIGKILL. Returns the child's exit code."""
    pgid = proc.pid
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(max(0.1, timeout_s))
    deadline = time.monotonic() + kill_after_s
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    while proc.poll() is None or group_alive(pgid):
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2)
            break
        time.sleep(0.05)
    return proc.returncode
