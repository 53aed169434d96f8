"""Real processes for the benches: the cloud service, edge agents, a monitor, a cuttable TCP
proxy and a small tmpfs, each stoppable whatever happens.

The broker is tests/_broker.py's :class:`Mosquitto` (the deployment's persistence and queue
settings). Every process is started in its own session so that stopping it also stops what
it started (the cloud's recorder and upload parser workers).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
import psutil  # noqa: E402
from _broker import Mosquitto, free_port  # noqa: E402
from _tcpproxy import TcpProxy as _Proxy  # noqa: E402

__all__ = ["MODEL", "PREFIX", "SAMPLES", "TOKEN", "Cloud", "Edge", "Monitor", "Mosquitto",
           "TcpProxy", "WaitTimeoutError", "fill", "free_port", "rss_kb", "tmpfs", "tree_rss_kb",
           "wait_for"]

MODEL = ROOT / "models" / "fition"
SAMPLES = ROOT / "datasets" / "samples" / "fition"
PREFIX = "csi/v1"
TOKEN = "faults-bench-token-0123456789"


class WaitTimeoutError(AssertionError):
    """A condition the bench waited for did not come in time."""


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str,
             check: Callable[[], None] | None = None, every_s: float = 0.25) -> float:
    """Wait until ``predicate()``; the monotonic time it held. ``check`` may raise."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check is not None:
            check()
        try:
            if predicate():
                return time.monotonic()
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise WaitTimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


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


def _stop_group(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
                wait_s: float = 30.0) -> int | None:
    """Stop ``proc`` with ``sig`` (SIGKILL after ``wait_s``), then whatever is left of its
    process group (workers it started). Its exit code."""
    if proc is None:
        return None
    code = proc.poll()
    if code is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a frozen process cannot handle SIGTERM
            proc.send_signal(sig)
        try:
            code = proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return code


class Cloud:
    """``csi cloud`` as a subprocess; its own session (process group)."""

    def __init__(self, folder: Path, broker: Mosquitto, db: str, *, client_id: str = "csi-cloud-1",
                 env: dict[str, str] | None = None, recordings: Path | None = None,
                 address_space_gib: float | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = client_id
        self.command = [sys.executable, "-m", "csi_cloud.cli", "cloud", "--models",
                        str(ROOT / "models"), "--broker", broker.url, "--http",
                        f"127.0.0.1:{self.port}", "--db", db, "--recordings",
                        str(recordings or folder / "recordings"), "--client-id", client_id,
                        "--log-level", "INFO"]
        self.env = dict(os.environ, CSI_CLOUD_TOKEN=TOKEN, CSI_CLOUD_JOBS_DIR=str(folder / "jobs"),
                        PYTHONUNBUFFERED="1", **(env or {}))
        self.address_space_gib = address_space_gib
        self.log = folder / "cloud.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _limits(self) -> None:
        if self.address_space_gib:
            limit = int(self.address_space_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def start(self, timeout_s: float = 120.0) -> float:
        """Start and wait for ``/readyz``; the seconds it took."""
        t0 = time.monotonic()
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=ROOT, start_new_session=True,
                                         preexec_fn=self._limits)
        wait_for(self.ready, timeout_s, "the cloud's /readyz", self.check)
        return time.monotonic() - t0

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"cloud exited with {self.proc.returncode}: "
                                 f"{self.log.read_text(errors='replace')[-1500:]}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def freeze(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> list[int]:
        """SIGKILL the service process only, as a crash does; the pids of workers it left."""
        if self.proc is None:
            return []
        pid = self.proc.pid
        _stop_group_leader_only(self.proc)
        left = [p.pid for p in psutil.process_iter(["pid"])
                if _pgid(p.pid) == pid and p.pid != pid]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self.proc = None
        return left

    def stop(self) -> int | None:
        code = _stop_group(self.proc)
        self.proc = None
        return code


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _stop_group_leader_only(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


class Edge:
    """One ``csi edge`` process replaying the committed samples for some APs in real time."""

    def __init__(self, folder: Path, broker: Mosquitto, streams: Sequence[tuple[str, Path]],
                 *, spool: Path | None = None, name: str = "edge",
                 broker_url: str | None = None) -> None:
        self.folder = folder
        self.names = [n for n, _ in streams]
        self.spool = spool or folder / f"{name}-spool"
        self.command = [sys.executable, "-m", "csi_edge.cli", "edge", "--model", str(MODEL),
                        "--broker", broker_url or broker.url, "--spool-dir", str(self.spool),
                        "--status-interval", "1", "--speed", "real", "--loop", "--level", "1",
                        "--log-level", "WARNING",
                        *[a for n, path in streams for a in ("--stream", f"{n}=file://{path}")]]
        # Idle markers off: every segment is coded and gets its own prediction row.
        self.env = dict(os.environ, CSI_EDGE_MODELS_DIR=str(folder / f"{name}-fetched"),
                        CSI_EDGE_DRAIN_TIMEOUT_S="30", CSI_EDGE_IDLE="false",
                        PYTHONUNBUFFERED="1")
        self.log = folder / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int | None] = []

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=ROOT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        self.exit_codes.append(_stop_group(self.proc, signal.SIGKILL, 10))
        self.proc = None

    def stop(self) -> int | None:
        """SIGTERM: the edge drains its spool (up to CSI_EDGE_DRAIN_TIMEOUT_S)."""
        code = _stop_group(self.proc, signal.SIGTERM, 60)
        if self.proc is not None:
            self.exit_codes.append(code)
        self.proc = None
        return code


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
