"""What a newcomer meets before anything runs: help texts, ``--model``, one-line errors for a
bad ``--http``, ``-o`` or ``--workdir``, offline API docs, where the shipped data is found, and
the demo's process bookkeeping (log tails, its own models folder)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from csi_cloud.cli import app
from csi_edge.cli import MODEL_HELP
from csi_edge.locations import BundleNotFoundError, models_dir, resolve_model, samples_dir

ROOT = Path(__file__).resolve().parents[1]
PCAP = ROOT / "datasets" / "samples" / "fition" / "walking_user1_rm1" / \
    "walking_user1_rm1_10.pcap"
runner = CliRunner()


def _commands() -> Iterator[tuple[list[str], Any]]:
    def walk(path: list[str], command: Any) -> Iterator[tuple[list[str], Any]]:
        yield path, command
        if hasattr(command, "commands"):  # a group (typer carries its own click)
            for name, sub in command.commands.items():
                yield from walk([*path, name], sub)

    yield from walk([], typer.main.get_command(app))


def _help(path: list[str]) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    return result.output


def test_help_has_no_type_noise_and_keeps_bracketed_defaults() -> None:
    paths = [path for path, _ in _commands()]
    assert ["cloud"] in paths and ["demo"] in paths and ["models", "list"] in paths
    for path in paths:
        text = _help(path)
        assert "<bool>" not in text, (path, text)
    cloud = _help(["cloud"])
    # Rich markup took these for tags and printed nothing
    assert "[models]" in cloud and "[sqlite:///csi-cloud.db]" in cloud and "[csi/v1]" in cloud
    assert "--dev / --no-dev" in cloud


def test_model_means_the_same_in_every_command() -> None:
    with_model = [path for path, command in _commands()
                  if any("--model" in p.opts for p in command.params)]
    assert {"edge", "evaluate", "adapt", "demo"} <= {p[-1] for p in with_model if p}
    for path in with_model:
        assert " ".join(MODEL_HELP.split()) in " ".join(_help(path).split()), path


def test_resolve_model_takes_a_folder_or_a_name(tmp_path: Path) -> None:
    assert resolve_model("fition") == models_dir() / "fition"
    assert resolve_model(ROOT / "models" / "wiar") == ROOT / "models" / "wiar"
    assert resolve_model("wiar", ROOT / "models") == ROOT / "models" / "wiar"
    with pytest.raises(BundleNotFoundError, match=r"'nosuch'.*fition, wiar"):
        resolve_model("nosuch", ROOT / "models")
    with pytest.raises(BundleNotFoundError, match="none there"):
        resolve_model("fition", tmp_path)
    assert (samples_dir() / "fition").is_dir()


def test_evaluate_takes_a_bundle_name_and_refuses_an_unknown_one() -> None:
    result = runner.invoke(app, ["evaluate", "--model", "nosuch", "--dataset", "fition",
                                 "--data", str(ROOT / "datasets" / "samples" / "fition")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        next(line for line in result.output.splitlines() if line.startswith("error:"))]
    assert "'nosuch' is neither a bundle folder nor a bundle in" in result.output


@pytest.mark.parametrize(("out", "message"), [
    ("/nonexistent-folder/x.h5", "the folder /nonexistent-folder does not exist"),
    ("/proc/x.h5", "/proc/x.h5: cannot write it"),
    ("/tmp", "/tmp is a folder, not a file"),
])
def test_convert_to_an_unwritable_path_is_one_line(out: str, message: str) -> None:
    result = runner.invoke(app, ["convert", str(PCAP), "-o", out])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("level0", "message"), [
    ("x", "--level0 'x' is not LATENT,PROFILE"),
    ("1,2,3", "--level0 '1,2,3' is not LATENT,PROFILE"),
    ("5,16", "level 0 latent channels 5 not in [0, 4]"),
    ("1,17", "level 0 profile coefficients 17 not in [0, 16]"),
    ("0,0", "level 0 must send latent channels, profile coefficients or both"),
])
def test_train_names_a_bad_level0_layout_before_training(tmp_path: Path, level0: str,
                                                         message: str) -> None:
    result = runner.invoke(app, ["train", "--dataset", "fition", "--data",
                                 str(samples_dir() / "fition"), "--out", str(tmp_path / "b"),
                                 "--level0", level0])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()  # nothing trained


def test_train_refuses_zero_epochs_before_training(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--dataset", "fition", "--data",
                                 str(samples_dir() / "fition"), "--out", str(tmp_path / "b"),
                                 "--epochs", "0"])
    assert result.exit_code == 2, result.output
    assert "--epochs" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_demo_refuses_a_taken_explicit_http_port(taken_port: int) -> None:
    line = _one_line_error(["demo", "--http", f"127.0.0.1:{taken_port}"])
    assert f"port {taken_port} is taken" in line


@pytest.mark.parametrize(("http", "message"), [
    ("127.0.0.1:99999", "is not HOST:PORT"),
    ("localhost", "is not HOST:PORT"),
    ("192.0.2.1:8000", "cannot listen there"),  # TEST-NET: not this machine's address
    ("no-such-host.invalid:8000", "cannot listen there"),
])
def test_demo_bad_http_is_one_line(http: str, message: str) -> None:
    assert message in _one_line_error(["demo", "--http", http])


def test_demo_unwritable_workdir_is_one_line() -> None:
    assert "cannot write there" in _one_line_error(["demo", "--workdir", "/proc/csi-demo"])


def test_cloud_bad_or_taken_http_is_one_line(tmp_path: Path, taken_port: int) -> None:
    base = ["cloud", "--dev", "--broker", "", "--db", f"sqlite:///{tmp_path}/db.sqlite",
            "--recordings", str(tmp_path / "rec")]
    line = _one_line_error([*base, "--http", f"127.0.0.1:{taken_port}"])
    assert f"127.0.0.1:{taken_port}: cannot listen there" in line
    line = _one_line_error([*base, "--http", "127.0.0.1:99999"])
    assert "bad settings: http:" in line and "'127.0.0.1:99999' is not HOST:PORT" in line


def test_api_docs_load_nothing_from_outside(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from csi_cloud.api.app import create_app
    from csi_cloud.settings import CloudSettings

    settings = CloudSettings(broker=None, dev=True, token="t" * 24, models=ROOT / "models",
                             db=f"sqlite:///{tmp_path}/db.sqlite", recordings=tmp_path / "rec",
                             jobs_dir=tmp_path / "jobs")
    client = TestClient(create_app(settings))  # no lifespan: the pages need no service
    for page, needs in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        response = client.get(page)
        assert response.status_code == 200, page
        html = response.text
        assert needs in html
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
        assert urls, html
        for url in urls:
            assert not re.match(r"^(https?:)?//", url), f"{page} loads {url}"
            asset = client.get(url)
            assert asset.status_code == 200 and asset.content, url
        assert "cdn" not in html.lower() and "fonts.googleapis" not in html


def test_a_failing_part_shows_the_end_of_its_log(tmp_path: Path) -> None:
    from csi_cloud.demo import DemoError, _Children

    children = _Children()
    script = "for i in $(seq 1 40); do echo line $i; done; echo 'boom: bad thing'; exit 3"
    children.start("cloud", ["sh", "-c", script], {"PATH": "/usr/bin:/bin"},
                   tmp_path / "cloud.log")
    children.procs[0][1].wait(10)
    with pytest.raises(DemoError) as caught:
        children.check()
    message = str(caught.value)
    assert "cloud exited with code 3" in message and str(tmp_path / "cloud.log") in message
    assert "| boom: bad thing" in message and "| line 40" in message
    assert "| line 10\n" not in message  # the tail only
    assert (tmp_path / "cloud.log").is_file()


def test_demo_jobs_write_into_the_work_folder(tmp_path: Path) -> None:
    from csi_cloud.demo import _demo_models

    served = _demo_models(ROOT / "models", tmp_path / "work")
    assert served == tmp_path / "work" / "models"
    assert sorted(p.name for p in served.iterdir()) == ["fition", "wiar"]
    assert (served / "fition").resolve() == (ROOT / "models" / "fition").resolve()
    (served / "adapted").mkdir()  # what a job's install does (csi_cloud.jobs)
    assert not (ROOT / "models" / "adapted").exists()


def _children_of(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    deadline = time.monotonic() + timeout_s
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    return [p.pid for p in alive]


def test_stop_group_stops_the_grandchildren() -> None:
    from csi_edge.lifetime import stop_group

    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"],
                            start_new_session=True)
    deadline = time.monotonic() + 10
    while len(_children_of(proc.pid)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchildren = _children_of(proc.pid)
    stop_group(proc, timeout_s=0.5, kill_after_s=1.0)  # the shell ignores SIGTERM
    assert proc.returncode is not None
    assert _gone(grandchildren) == []


_ORPHAN = """
import os, subprocess, sys, time
from csi_edge.lifetime import preexec_die_with
mode = sys.argv[1]
if mode == "pdeathsig":
    child = subprocess.Popen(["sleep", "300"], preexec_fn=preexec_die_with(os.getpid()))
else:
    child = subprocess.Popen([sys.executable, "-c",
        "import time; from csi_edge.lifetime import watch_parent; watch_parent(interval_s=0.1);"
        " print('watching', flush=True); time.sleep(300)"], stdout=subprocess.PIPE)
    child.stdout.readline()
print(child.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("mode", ["pdeathsig", "watch"])
def test_a_child_dies_with_a_killed_parent(mode: str) -> None:
    """The parent gets SIGKILL (no chance to stop anything): its child goes anyway."""
    if mode == "pdeathsig" and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux")
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN, mode], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        assert _gone([child], 0.3) == [child]  # it runs
        parent.kill()
        parent.wait(10)
        assert _gone([child], 10) == []
    finally:
        parent.kill()
        parent.wait(10)


def test_calibrate_rewrites_the_calibration_the_id_and_the_report_header(
        tmp_path: Path) -> None:
    import json
    import shutil

    folder = tmp_path / "wiar"
    shutil.copytree(models_dir() / "wiar", folder)
    before = json.loads((folder / "bundle.json").read_text())
    result = runner.invoke(app, ["calibrate", "--model", str(folder), "--dataset", "wiar",
                                 "--data", str(samples_dir() / "wiar" / "height_90"),
                                 "--recordings", "folder"])
    assert result.exit_code == 0, result.output
    activity = json.loads(result.output)
    after = json.loads((folder / "bundle.json").read_text())
    assert after["calibration"]["activity"] == activity
    assert activity["fitted_on"].startswith("every recording of height_90")
    # Each candidate set of lengths scored both ways: the most confident reading and pooled.
    tried = set(activity["contexts_accuracy"])
    assert {"8", "2,8", "1,2,4,8", "1,2,4,8 pooled"} <= {k.split(" (")[0] for k in tried}
    # Other recordings, another calibration: another id; the weights and the test-split
    # figures are the ones measured before, and the report says under which id.
    assert after["id"] != before["id"] and after["files"] == before["files"]
    assert after["metrics"] == before["metrics"]
    header = next(line for line in (folder / "report.md").read_text().splitlines()
                  if line.startswith("Bundle id"))
    assert f"`{after['id']}`" in header
    assert f"measured under id `{before['metrics']['test_split']['model']}`" in header


def test_the_report_header_names_a_second_id_only_where_the_figures_had_one() -> None:
    from csi_cloud.model.report import header_line

    same = {"id": "a1", "created": "today", "metrics": {"test_split": {"model": "a1"}}}
    assert header_line(same) == "Bundle id `a1`, created today."
    assert header_line({**same, "metrics": {}}) == "Bundle id `a1`, created today."
    other = {**same, "metrics": {"test_split": {"model": "b2"}}}
    assert "measured under id `b2`" in header_line(other)
