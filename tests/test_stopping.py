"""Nothing is left behind: ``csi demo`` and ``csi cloud`` stopped by SIGINT, SIGTERM, SIGHUP
(a closed terminal), a closed stdout (``csi demo | head``) or, for the cloud, SIGKILL take
every process they started with them: broker, edge, cloud, the upload parser worker and
multiprocessing's resource tracker, the recorder. Real processes, listed with psutil before
and checked after. Also: a demo part that fails shows its log and keeps it, and a wheel of
the project installed with ``pip install`` (not editable) runs the demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import psutil
import pytest
from _broker import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
PCAP = ROOT / "datasets" / "samples" / "fition" / "walking_user1_rm1" / \
    "walking_user1_rm1_10.pcap"
TOKEN = "stop-test-token-0123456789"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return out


def _left(procs: list[psutil.Process], timeout_s: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    alive = procs
    while True:
        alive = [p for p in alive if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return _describe(alive)
        time.sleep(0.1)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _upload(base: str, token: str = TOKEN) -> None:
    """A recording through POST /predict: starts the parser worker and its resource tracker."""
    boundary = "csi-stop-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{PCAP.name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + PCAP.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"{base}/api/v1/predict", data=body, method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                 "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200


def _wait_url(url: str, proc: subprocess.Popen[Any], timeout_s: float = 90) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the process ended early"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} not ready in {timeout_s} s")


def _kinds(procs: list[psutil.Process]) -> set[str]:
    kinds = set()
    for line in _describe(procs):
        for kind, pattern in (("broker", r"mosquitto|embedded_broker"), ("edge", r"csi_edge.cli"),
                              ("cloud", r"csi_cloud.cli cloud"),
                              ("tracker", r"resource_tracker"),
                              ("spawned", r"multiprocessing.spawn")):
            if re.search(pattern, line):
                kinds.add(kind)
    return kinds


def _wait_kinds(pid: int, wanted: set[str], timeout_s: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while True:
        procs = _descendants(pid)
        if wanted <= _kinds(procs) or time.monotonic() >= deadline:
            assert wanted <= _kinds(procs), _describe(procs)
            return procs
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGHUP", "closed-stdout"])
def test_demo_stops_every_process(tmp_path: Path, how: str) -> None:
    port = free_port()
    work = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "csi_cloud.cli", "demo", "--http", f"127.0.0.1:{port}",
         "--aps", "1", "--workdir", str(work)],
        # stderr to a file: a process left behind would hold a pipe open and hang the test
        stdout=subprocess.PIPE, stderr=(tmp_path / "stderr").open("wb"), cwd=tmp_path,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    stdout: IO[bytes] = proc.stdout  # type: ignore[assignment]
    try:
        token = None
        while token is None:
            line = stdout.readline().decode()
            assert line, (tmp_path / "stderr").read_text()
            token = re.search(r"token: (\S+)", line)
        base = f"http://127.0.0.1:{port}"
        _wait_url(f"{base}/readyz", proc)
        _upload(base, token.group(1))  # the demo draws its own token
        procs = _wait_kinds(proc.pid, {"broker", "edge", "cloud", "tracker", "spawned"})
        cloud = next(p for p in procs if "csi_cloud.cli cloud" in " ".join(p.cmdline()))
        assert f"--models {work / 'models'}" in " ".join(cloud.cmdline())
        if how == "closed-stdout":
            stdout.close()  # like `head` after its lines: the demo's next line hits EPIPE
        else:
            proc.send_signal(getattr(signal, how))
        code = proc.wait(40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert _left(procs) == []
    stderr = (tmp_path / "stderr").read_text()
    assert code == 0, stderr
    assert "Traceback" not in stderr


def _cloud(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "csi_cloud.cli", "cloud", "--broker", "", "--http",
         f"127.0.0.1:{port}", "--db", f"sqlite:///{tmp_path}/db.sqlite", "--recordings",
         str(tmp_path / "rec"), "--models", str(ROOT / "models"), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr").open("wb"), cwd=tmp_path,
        env=dict(os.environ, CSI_CLOUD_TOKEN=TOKEN, CSI_CLOUD_JOBS_DIR=str(tmp_path / "jobs")))


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGHUP", "SIGKILL"])
def test_cloud_stops_its_workers(tmp_path: Path, how: str) -> None:
    """The upload worker, its resource tracker and the recorder end with the service, even
    when the service is killed outright (SIGKILL: no shutdown code runs)."""
    port = free_port()
    proc = _cloud(tmp_path, port)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_url(f"{base}/readyz", proc)
        _upload(base)
        procs = _wait_kinds(proc.pid, {"tracker", "spawned"})
        assert len([p for p in _describe(procs) if "multiprocessing.spawn" in p]) >= 2, \
            _describe(procs)  # the parser worker and the recorder
        proc.send_signal(getattr(signal, how))
        code = proc.wait(40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert _left(procs) == []
    stderr = (tmp_path / "stderr").read_text()
    # uvicorn ends by the signal it caught, after its shutdown (130 for SIGINT, -15 SIGTERM)
    assert code in {"SIGINT": (0, 130), "SIGTERM": (0, -15), "SIGHUP": (0,),
                    "SIGKILL": (-9,)}[how], stderr
    assert "Traceback" not in stderr


def test_a_failing_demo_part_shows_and_keeps_its_log(tmp_path: Path) -> None:
    """The cloud refuses its settings: the demo says which part, shows the end of its log,
    stops the rest and keeps the (temporary) work folder with the logs."""
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "csi_cloud.cli", "demo", "--http", f"127.0.0.1:{port}",
         "--aps", "1"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env=dict(os.environ, CSI_CLOUD_MAX_REQUEST_BYTES="lots"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cloud exited with code 2" in result.stderr
    assert "| error: bad settings: max_request_bytes:" in result.stderr
    kept = re.search(r"the logs are kept in (\S+)", result.stdout)
    assert kept, result.stdout
    work = Path(kept.group(1))
    try:
        assert str(work / "cloud.log") in result.stderr
        assert "bad settings" in (work / "cloud.log").read_text()
        assert (work / "broker.log").is_file()
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def test_installed_wheel_runs_the_demo(tmp_path: Path) -> None:
    """``pip install`` of the built wheel (not editable) into a fresh venv, then from a folder
    without models/: ``csi demo --help`` and a short demo that finds the shipped bundle and
    samples and prints predictions. The venv sees this one's dependencies through a .pth file
    (nothing is downloaded) but not its editable install of the project."""
    import sysconfig

    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(source), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((tmp_path / "dist").glob("csi_pipeline-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--ignore-installed", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    run = tmp_path / "elsewhere"
    run.mkdir()
    where = subprocess.run([str(python), "-c", "import csi_cloud; print(csi_cloud.__file__)"],
                           capture_output=True, text=True, check=True, cwd=run).stdout
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    csi = str(venv / "bin" / "csi")
    help_text = subprocess.run([csi, "demo", "--help"], capture_output=True, text=True,
                               check=True, cwd=run).stdout
    assert "--model" in help_text
    result = subprocess.run([csi, "demo", "--aps", "1", "--duration", "20", "--http",
                             f"127.0.0.1:{free_port()}"], capture_output=True, text=True,
                            cwd=run, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/_bundled/samples/fition" in result.stdout
    assert re.search(r"demo/ap1 +seq +\d+", result.stdout), result.stdout
    assert not (run / "models").exists()
