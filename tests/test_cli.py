"""The `csi` command as a user runs it: a real subprocess of the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CSI = shutil.which("csi") or ""


def csi(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [CSI, *args] if CSI else [sys.executable, "-m", "csi_cloud.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_inspect_fition_sample(samples: Path) -> None:
    run = csi("inspect", str(samples / "fition/walking_user1_rm1/walking_user1_rm1_10.pcap"))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["format"] == "nexmon-pcap"
    assert out["subcarriers"] == 56 and out["data_subcarriers"] == 52 and out["pilots_included"]
    assert out["subcarriers_reported"] == 256
    assert 47 < out["rate_hz"] < 51
    assert out["band"]["layout"] == "ht-20" and out["occupied_channel"] == 36
    assert out["dropped"] == {"other_transmitter": 21, "retransmission": 7}
    for key in ("frames", "duration_s", "antennas", "band", "max_gap_s", "dropped"):
        assert key in out


def test_inspect_wiar_sample(samples: Path) -> None:
    run = csi("inspect", str(samples / "wiar/height_90/csi_a1_1.dat"))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert (out["format"], out["antennas"], out["subcarriers"]) == ("intel5300-dat", 3, 30)
    assert 29 < out["rate_hz"] < 31


def test_inspect_folder_lists_every_recording(samples: Path) -> None:
    run = csi("inspect", str(samples))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out) == len(list(samples.rglob("*.pcap"))) + len(list(samples.rglob("*.dat")))
    assert {o["subcarriers"] for o in out if o["format"] == "nexmon-pcap"} == {56}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.pcap", b"", "empty file"),
        ("picture.pcap", b"\x89PNG\r\n\x1a\n" + bytes(100), "content does not"),
        ("notes.txt", b"just some notes\n", "unrecognised format"),
        ("cut.dat", b"\x00\xd5\xbb" + bytes(50), "no valid Intel 5300"),
    ],
)
def test_inspect_bad_files_fail_clearly(tmp_path: Path, name: str, content: bytes,
                                        message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    run = csi("inspect", str(path))
    assert run.returncode == 2
    assert str(path) in run.stderr and message in run.stderr
    assert "Traceback" not in run.stderr


def test_inspect_folder_without_recordings(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    run = csi("inspect", str(tmp_path))
    assert run.returncode == 2
    assert str(tmp_path) in run.stderr and "no recording found" in run.stderr


def test_inspect_folder_reports_bad_files_and_keeps_going(samples: Path, tmp_path: Path) -> None:
    shutil.copy(samples / "wiar/height_90/csi_a1_1.dat", tmp_path / "good.dat")
    (tmp_path / "bad.pcap").write_bytes(b"")
    run = csi("inspect", str(tmp_path))
    assert run.returncode == 1
    out = {Path(o["path"]).name: o for o in json.loads(run.stdout)}
    assert out["good.dat"]["frames"] > 200 and "empty file" in out["bad.pcap"]["error"]


def test_convert_then_inspect_hdf5(samples: Path, tmp_path: Path) -> None:
    target = tmp_path / "walk.h5"
    src = samples / "fition/walking_user1_rm1/walking_user1_rm1_10.pcap"
    run = csi("convert", str(src), "-o", str(target))
    assert run.returncode == 0, run.stderr
    again = csi("convert", str(src), "-o", str(target))
    assert again.returncode == 2 and "exists" in again.stderr
    original = json.loads(csi("inspect", str(src)).stdout)
    converted = json.loads(csi("inspect", str(target)).stdout)
    assert converted["format"] == "hdf5"
    for key in ("frames", "duration_s", "rate_hz", "antennas", "subcarriers", "max_gap_s"):
        assert converted[key] == original[key], key


@pytest.mark.shared_data
def test_inspect_every_file_of_the_issue_folder(shared_fition: Path) -> None:
    run = csi("inspect", str(shared_fition / "walking_user1_rm1"))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out) == len(list((shared_fition / "walking_user1_rm1").glob("*.pcap")))
    for item in out:
        assert item["subcarriers"] == 56, item["path"]
        assert 47 < item["rate_hz"] < 51, item["path"]
        assert isinstance(item["dropped"], dict)


@pytest.mark.shared_data
def test_inspect_a_wiar_file(shared_wiar: Path) -> None:
    out = json.loads(csi("inspect", str(shared_wiar / "csi_a5_7.dat")).stdout)
    assert (out["antennas"], out["subcarriers"]) == (3, 30) and 29 < out["rate_hz"] < 31


def test_datasets_list_and_summary(samples: Path) -> None:
    listed = csi("datasets", "list")
    assert listed.returncode == 0, listed.stderr
    for name in ("fition", "wiar", "ntu-fi-har", "ntu-fi-humanid", "recordings"):
        assert name in listed.stdout
    specs = json.loads(csi("datasets", "list", "--json").stdout)
    assert {s["name"] for s in specs} >= {"fition", "wiar"} and all(s["license"] for s in specs)
    run = csi("datasets", "summary", "fition", "--data", str(samples / "fition"), "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["dataset"] == "fition" and out["total"] == 8
    assert sum(out["classes"].values()) == 8
    assert sum(sum(s.values()) for s in out["splits"].values()) == 8
    table = csi("datasets", "summary", "wiar", "--data", str(samples / "wiar"))
    assert table.returncode == 0 and "16 recordings" in table.stdout


def test_datasets_summary_bad_input(tmp_path: Path) -> None:
    unknown = csi("datasets", "summary", "nope", "--data", str(tmp_path))
    assert unknown.returncode == 2 and "nope" in unknown.stderr and "fition" in unknown.stderr
    empty = csi("datasets", "summary", "fition", "--data", str(tmp_path))
    assert empty.returncode == 2 and str(tmp_path) in empty.stderr
    assert "Traceback" not in empty.stderr + unknown.stderr


@pytest.mark.shared_data
def test_datasets_summary_full_data(shared_fition: Path, shared_wiar: Path) -> None:
    fition = json.loads(csi("datasets", "summary", "fition", "--data", str(shared_fition),
                            "--json").stdout)
    assert fition["total"] == 420 == sum(fition["classes"].values())
    wiar = json.loads(csi("datasets", "summary", "wiar", "--data", str(shared_wiar),
                          "--json").stdout)
    assert wiar["total"] == 480 == sum(wiar["classes"].values()) and len(wiar["classes"]) == 16
