"""bench/faults.py without processes: arguments, judging, the report, the bombs it sends."""

from __future__ import annotations

import random
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import scipy.io
from _bench import bench_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def faults() -> Iterator[ModuleType]:
    with bench_module("faults") as module:
        yield module


def test_arguments(faults: ModuleType) -> None:
    args = faults.parse_args(["--quick", "--only", "fuzz", "--only", "cloud_kill"])
    assert args.quick and args.only == ["fuzz", "cloud_kill"]
    assert faults.parse_args([]).only is None
    with pytest.raises(SystemExit):
        faults.parse_args(["--only", "no_such_fault"])


def test_judging_and_report(faults: ModuleType) -> None:
    ok = faults.CaseResult("cloud_kill", sent=100, predicted=100, recovery_s=2.5,
                           cloud_alive_at_end=True)
    faults.judge(ok, faults.CASES["cloud_kill"])
    assert ok.passed and ok.failures == []
    bad = faults.CaseResult("broker_kill", sent=100, predicted=90, lost=10, duplicated=2,
                            recovery_s=12.0, cloud_alive_at_end=False)
    faults.judge(bad, faults.CASES["broker_kill"])
    assert not bad.passed
    assert bad.failures == ["10 lost", "2 duplicated", "recovery 12.0 s > 10 s",
                            "the cloud process died"]
    # A full spool may drop segments, if the edge counts every one of them.
    spool = faults.CaseResult("disk_full_spool", sent=50, predicted=45, lost=5,
                              lost_accounted=5, recovery_s=1.0, cloud_alive_at_end=True)
    faults.judge(spool, faults.CASES["disk_full_spool"])
    assert spool.passed
    never = faults.CaseResult("status_bomb", sent=10, predicted=3, lost=7)
    faults.judge(never, faults.CASES["status_bomb"])
    assert "no prediction after the fault cleared" in never.failures
    report = {"mode": "quick", "commit": "abc1234", "command": "python bench/faults.py --quick",
              "host": {"machine": "x86_64"}, "aps": 4, "wall_s": 60.0,
              "cases": {"cloud_kill": ok.as_dict(), "broker_kill": bad.as_dict(),
                        "disk_full_spool": spool.as_dict()}}
    text = faults.render_markdown(report)
    assert "commit abc1234" in text
    assert "| cloud_kill | 100 | 100 | 0 | 0 | 2.5 | pass |  |" in text
    assert ("| broker_kill | 100 | 90 | 10 | 2 | 12.0 | FAIL | 10 lost; 2 duplicated; "
            "recovery 12.0 s > 10 s; the cloud process died |") in text
    assert "| disk_full_spool | 50 | 45 | 5 (5 counted) |" in text


def test_mat_bomb_claims_what_it_says(faults: ModuleType, tmp_path: Path) -> None:
    path = faults.mat_zlib_bomb(tmp_path / "bomb.mat", columns=5000)
    assert path.stat().st_size < 20_000  # 342 x 5000 doubles = 13.7 MB once inflated
    assert scipy.io.whosmat(path) == [("CSIamp", (342, 5000), "double")]


def test_fuzz_payloads_are_deterministic_and_varied(faults: ModuleType) -> None:
    seeds = [bytes(range(40)), bytes(60)]
    a = faults.fuzz_payloads(seeds, 300, random.Random(1))
    assert a == faults.fuzz_payloads(seeds, 300, random.Random(1))
    assert len(a) == 300 and len(set(a)) > 250
    assert sum(p in seeds for p in a) < 10  # nearly every one is changed


def test_proxy_cut_and_restore() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from _procs import TcpProxy
    finally:
        sys.path.remove(str(ROOT / "bench"))
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(conn.recv(100))

    threading.Thread(target=echo, daemon=True).start()
    proxy = TcpProxy(("127.0.0.1", port))
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(b"ping")
            assert s.recv(100) == b"ping"
        proxy.cut()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        proxy.restore()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(b"pong")
            assert s.recv(100) == b"pong"
    finally:
        proxy.close()
        server.close()
