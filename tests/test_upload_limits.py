"""Uploads under memory and time limits: files declaring more than the parser may allocate are
413 before anything is allocated, the worker's address space is bounded, and the worker (and
the multiprocessing resource tracker) end when the service is killed."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _bombs
import _upload_crash
import httpx
import pytest
from _broker import free_port
from fastapi.testclient import TestClient

from csi_cloud.api.app import create_app
from csi_cloud.api.routes.predict import PARSER
from csi_cloud.settings import CloudSettings
from csi_cloud.upload import DEFAULT_MAX_DECODED_BYTES

ROOT = Path(__file__).resolve().parents[1]
PCAP = ROOT / "datasets/samples/fition/walking_user1_rm1/walking_user1_rm1_10.pcap"
TOKEN = "test-token-0123456789abcdef"
MiB = 2**20


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("cloud")
    settings = CloudSettings(broker=None, dev=True, token=TOKEN, db=f"sqlite:///{tmp}/db.sqlite",
                             models=ROOT / "models", recordings=tmp / "rec", jobs_dir=tmp / "jobs")
    with TestClient(create_app(settings)) as c:
        yield c


def upload(client: TestClient, path: Path, name: str | None = None) -> Any:
    return client.post("/api/v1/predict",
                       files={"file": (name or path.name, path.read_bytes())})


def still_serving(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    r = upload(client, PCAP)
    assert r.status_code == 200, r.text
    assert r.json()["segments"] > 8


def test_hdf5_claiming_40_million_frames_is_413(client: TestClient, tmp_path: Path) -> None:
    bomb = _bombs.hdf5_claiming_frames(PCAP, tmp_path / "bomb.h5", 40_000_000)
    assert bomb.stat().st_size < 2 * MiB
    r = upload(client, bomb, "forty-million.h5")
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert detail.startswith("forty-million.h5: 40,000,000 frames")
    assert f"over the limit of {DEFAULT_MAX_DECODED_BYTES:,} bytes" in detail
    assert str(tmp_path) not in detail and "csi-upload-" not in detail
    still_serving(client)


def test_mat_zlib_bomb_is_413(client: TestClient, tmp_path: Path) -> None:
    bomb = _bombs.mat_zlib_bomb(tmp_path / "bomb.mat", 600_000)  # ~1.6 GB inflated
    assert bomb.stat().st_size < 2 * MiB
    r = upload(client, bomb)
    assert r.status_code == 413, r.text
    assert (f"bomb.mat: the MAT file's compressed variables decompress to more than the "
            f"limit of {DEFAULT_MAX_DECODED_BYTES:,} bytes") in r.json()["detail"]
    still_serving(client)


@pytest.fixture
def fresh_worker() -> Iterator[None]:
    """The parser's next job starts a new worker (with whatever limits the test sets), and the
    tests after this one get a worker with the defaults again."""
    PARSER.close()
    try:
        yield
    finally:
        PARSER.close()


def test_the_worker_cannot_allocate_past_its_memory_limit(
        client: TestClient, monkeypatch: pytest.MonkeyPatch, fresh_worker: None) -> None:
    """Whatever no size check foresaw: the worker's address space (RLIMIT_AS) is bounded, so
    the allocation fails in the worker instead of the host running out of memory. (Nothing
    is touched: without the limit, the stand-in 'allocates' 4 GiB of untouched pages.)"""
    monkeypatch.setattr(PARSER, "memory_bytes", 256 * MiB)
    monkeypatch.setattr(PARSER, "worker", functools.partial(_upload_crash.allocate, 4 * 2**30))
    r = upload(client, PCAP)
    assert r.status_code == 413, r.text
    assert "needs more memory than the parser may use" in r.json()["detail"]
    monkeypatch.undo()
    PARSER.close()
    still_serving(client)


# -- the worker dies with the service (real processes) -------------------------------------


def _children(pid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _gone(pid: int) -> bool:
    """Exited (reaped, or a zombie waiting for a parent that does not reap)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _await(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s")
        time.sleep(0.05)


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("worker", [
    "hang",  # idle in a syscall
    "spin",  # holding the GIL in C: no thread of its own could end it
])
def test_the_parser_worker_and_resource_tracker_die_with_the_service(
        tmp_path: Path, worker: str) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "UPLOAD_TEST_STARTED": str(started := tmp_path / "started")}
    service = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_upload_service.py"),
                                str(port), str(tmp_path), worker, "3"], env=env)
    base = f"http://127.0.0.1:{port}"
    found: dict[str, int] = {}
    try:
        def ready() -> bool:
            assert service.poll() is None, f"the service exited ({service.returncode})"
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _await(ready, 120, "the service did not start")
        # An upload in the background: its job occupies the worker until the service dies.
        threading.Thread(target=_post_quietly, args=(f"{base}/api/v1/predict",),
                         daemon=True).start()
        _await(lambda: started.exists() and started.read_text(), 60,
               f"the worker did not start its job ({worker})")
        found = {"worker": int(started.read_text())}
        assert found["worker"] in _children(service.pid)
        found["tracker"] = next(pid for pid in _children(service.pid)
                                if "resource_tracker" in _cmdline(pid))
        service.send_signal(signal.SIGKILL)
        service.wait(10)
        t0 = time.monotonic()
        _await(lambda: _gone(found["worker"]), 5, "the worker did not exit")
        worker_s = time.monotonic() - t0
        # The tracker ends once every process holding its pipe has (other children too).
        _await(lambda: _gone(found["tracker"]), 20, "the resource tracker did not exit")
        print(f"{worker}: worker gone {worker_s:.2f} s, tracker {time.monotonic() - t0:.2f} s "
              "after the service")
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(10)
        for pid in found.values():
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def _post_quietly(url: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(url, files={"file": (PCAP.name, PCAP.read_bytes())}, timeout=60)


class _ReapedElsewhere:
    """A dead worker whose exit code another thread has reaped: ``join`` returns before the
    code shows (our ``waitpid`` got ECHILD), and it appears a few joins later."""

    def __init__(self, code: int, after_joins: int) -> None:
        self._code, self._left, self.joins = code, after_joins, 0
        self.exitcode: int | None = None

    def join(self, timeout: float | None = None) -> None:
        self.joins += 1
        self._left -= 1
        if self._left <= 0:
            self.exitcode = self._code


def test_a_crash_reports_its_exit_code_when_the_pool_reaped_the_worker_first() -> None:
    from csi_cloud.upload import _exit_codes
    late, never = _ReapedElsewhere(-11, after_joins=3), _ReapedElsewhere(-9, after_joins=10**6)
    assert _exit_codes([late], 2.0) == [-11]
    assert late.joins == 3
    assert _exit_codes([never], 0.2) == []  # gives up at its deadline, says nothing false
