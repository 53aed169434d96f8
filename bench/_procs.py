"""What the benches add to the tests' harness (tests/_harness.py: the broker, the cloud and
edge launchers, waiting on conditions): a monitor of the APs' topics, a cuttable TCP proxy, a
small tmpfs, a disk filler and memory probes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import paho.mqtt.client as mqtt  # noqa: E402
import psutil  # noqa: E402
from _harness import FOLDER as SAMPLES  # noqa: E402
from _harness import (  # noqa: E402
    MODEL,
    PREFIX,
    TOKEN,
    Cloud,
    Edge,
    Mosquitto,
    WaitTimeoutError,
    free_port,
    wait_until,
)
from _tcpproxy import TcpProxy as _Proxy  # noqa: E402

__all__ = ["MODEL", "PREFIX", "SAMPLES", "TOKEN", "Cloud", "Edge", "Monitor", "Mosquitto",
           "TcpProxy", "WaitTimeoutError", "fill", "free_port", "rss_kb", "tmpfs", "tree_rss_kb",
           "wait_until"]


def rss_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss // 1024)
    except psutil.Error:
        return None


def tree_rss_kb(pid: int | None) -> int | None:
    """RSS of a process and everything it started (the parser and recorder workers)."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total // 1024


class Monitor:
    """One MQTT client watching the APs' statuses, the cloud's (live, not retained)
    predictions and a sample of segment payloads; it reconnects by itself."""

    def __init__(self, port: int, keep_payloads: int = 300) -> None:
        self._lock = threading.Lock()
        self.status: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self.preds: list[tuple[float, str]] = []
        self.payloads: list[bytes] = []
        self.keep_payloads = keep_payloads
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"faults-monitor-{os.getpid()}-{time.time_ns()}",
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = lambda c, *a: c.subscribe(
            [(f"{PREFIX}/+/+/status", 0), (f"{PREFIX}/+/+/pred", 0), (f"{PREFIX}/+/+/seg", 0)])
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("monitor did not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: object,
                    msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        parts = msg.topic.split("/")
        name, kind = "/".join(parts[-3:-1]), parts[-1]
        if kind == "seg":
            with self._lock:
                if len(self.payloads) < self.keep_payloads:
                    self.payloads.append(bytes(msg.payload))
            return
        if msg.retain:  # a copy kept from before, not news
            return
        if kind == "pred":
            with self._lock:
                self.preds.append((now, name))
            return
        try:
            status = json.loads(msg.payload)
        except Exception:
            return
        if isinstance(status, dict) and "next_seq" in status:
            with self._lock:
                self.status.setdefault(name, []).append((now, status))

    def first_pred_after(self, t: float, names: Sequence[str]) -> float | None:
        wanted = set(names)
        with self._lock:
            return next((at for at, n in self.preds if at > t and n in wanted), None)

    def first_status_after(self, t: float, names: Sequence[str]) -> float | None:
        """When the first status of ``names`` after ``t`` came (an edge publishes one at
        each connect)."""
        with self._lock:
            return min((at for n in names for at, _ in self.status.get(n, []) if at > t),
                       default=None)

    def preds_between(self, t0: float, t1: float, names: Sequence[str]) -> int:
        wanted = set(names)
        with self._lock:
            return sum(1 for at, n in self.preds if t0 <= at <= t1 and n in wanted)

    def has_pred(self, names: Sequence[str], after: float = 0.0) -> bool:
        with self._lock:
            seen = {n for at, n in self.preds if at > after}
        return set(names) <= seen

    def statuses_since(self, name: str, t: float) -> list[dict[str, Any]]:
        with self._lock:
            return [s for at, s in self.status.get(name, []) if at >= t]

    def last(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            items = self.status.get(name)
            return items[-1][1] if items else None

    def encoded(self, names: Sequence[str]) -> dict[tuple[str, int], int]:
        """(AP, epoch) -> segments encoded, the highest ``next_seq`` any status reported."""
        out: dict[tuple[str, int], int] = {}
        with self._lock:
            for n in names:
                for _, s in self.status.get(n, []):
                    key = (n, int(s["epoch"]))
                    out[key] = max(out.get(key, 0), int(s["next_seq"]))
        return out

    def close(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()


class TcpProxy(_Proxy):
    """The tests' cuttable TCP proxy (tests/_tcpproxy.py) on a free port, listening at once:
    ``cut()`` closes every connection and refuses new ones, ``restore()`` listens again."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target, free_port())
        self.start()

    @property
    def cut_now(self) -> bool:
        return self._listener is None

    def cut(self) -> None:
        self.stop()

    def restore(self) -> None:
        self.start()

    def close(self) -> None:
        self.stop()


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int) -> Iterator[str]:
    """A tmpfs of ``size_kb`` at ``path`` (root only); yields how the limit is made."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs at {path}: {done.stderr.strip()}")
    try:
        yield f"tmpfs of {size_kb} KiB"
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path, leave_kb: int) -> Path:
    """Fill the filesystem of ``folder`` until ``leave_kb`` KiB are free; the filler file."""
    filler = folder / "filler.bin"
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize - leave_kb * 1024
    with filler.open("ab") as fh:
        block = bytes(65536)
        while free > 0:
            try:
                fh.write(block[: min(len(block), free)])
                fh.flush()
            except OSError:
                break
            free -= len(block)
    return filler
