"""Stand-ins for the upload parser's worker function, imported by its worker process."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any


def _started() -> None:
    """Tell a test that the job runs: touch the file named by UPLOAD_TEST_STARTED, if set."""
    mark = os.environ.get("UPLOAD_TEST_STARTED")
    if mark:
        Path(mark).write_text(str(os.getpid()))


def segfault(*args: Any) -> dict[str, Any]:
    """Die the way csiread does on a corrupt log: SIGSEGV (reading address 0)."""
    ctypes.string_at(0)
    raise AssertionError("unreachable")


def hang(*args: Any) -> dict[str, Any]:
    _started()
    time.sleep(3600)
    raise AssertionError("unreachable")


def spin(*args: Any) -> dict[str, Any]:
    """Busy in native code that never lets another thread run: a C loop holding the GIL."""
    _started()
    sum(range(10**15))
    raise AssertionError("unreachable")


def allocate(nbytes: int, *args: Any) -> dict[str, Any]:
    """Ask for ``nbytes`` of address space (never touched: no real memory is used)."""
    import numpy as np

    block = np.empty(nbytes, dtype=np.uint8)
    return {"ok": False, "error": "format", "message": f"allocated {block.nbytes} bytes"}
