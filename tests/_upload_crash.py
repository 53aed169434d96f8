"""Stand-ins for the upload parser's worker function, imported by its worker process."""

from __future__ import annotations

import ctypes
import time
from typing import Any


def segfault(*args: Any) -> dict[str, Any]:
    """Die the way csiread does on a corrupt log: SIGSEGV (reading address 0)."""
    ctypes.string_at(0)
    raise AssertionError("unreachable")


def hang(*args: Any) -> dict[str, Any]:
    time.sleep(3600)
    raise AssertionError("unreachable")
