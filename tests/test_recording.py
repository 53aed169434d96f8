"""Project recordings (HDF5): exact round trips on real samples, labels, streaming, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from csi_edge._errors import EmptyRecordingError, FormatError, SpecMismatchError
from csi_edge.convert import convert
from csi_edge.frames import CSIFrames
from csi_edge.readers import read_recording
from csi_edge.recording import (
    FORMAT_NAME,
    Label,
    RecordingWriter,
    frame_labels,
    label_at,
    read_labels,
    read_recording_file,
    read_recording_meta,
)

ROOT = Path(__file__).resolve().parents[1]
PCAP = ROOT / "datasets/samples/fition/walking_user1_rm1/walking_user1_rm1_10.pcap"
DAT = ROOT / "datasets/samples/wiar/height_90/csi_a1_1.dat"
SAMPLES = [pytest.param(PCAP, id="nexmon-pcap"), pytest.param(DAT, id="intel5300-dat")]


@pytest.fixture(scope="module")
def pcap_frames() -> CSIFrames:
    return read_recording(PCAP)


def _assert_same_frames(got: CSIFrames, want: CSIFrames) -> None:
    """Exact equality of everything but the complex CSI (amplitude compared bit for bit)."""
    assert len(got) == len(want)
    assert got.format == "hdf5"
    np.testing.assert_array_equal(got.timestamp, want.timestamp)
    assert got.timestamp.dtype == np.float64
    np.testing.assert_array_equal(got.amplitude(), want.amplitude())
    assert got.info == want.info
    assert got.dropped.as_dict() == want.dropped.as_dict()
    for name in ("rssi", "seq"):
        mine, theirs = getattr(got, name), getattr(want, name)
        assert (mine is None) == (theirs is None), name
        if theirs is not None:
            np.testing.assert_array_equal(mine, theirs)


# -- round trips on real recordings --


@pytest.mark.parametrize("src", SAMPLES)
def test_convert_round_trip_is_exact(src: Path, tmp_path: Path) -> None:
    original = read_recording(src)
    dst = tmp_path / "rec.h5"
    summary = convert(src, dst)
    assert summary == {
        "path": str(dst), "frames": len(original), "labels": 0, "phase": False,
        "dropped": original.dropped.as_dict(),
    }
    back = read_recording_file(dst)
    _assert_same_frames(back, original)
    assert back.csi.dtype == np.float32 and not back.is_complex
    assert back.source == str(dst)
    # The dispatcher recognises the file by its HDF5 signature and gets the same frames.
    _assert_same_frames(read_recording(dst), original)
    meta = read_recording_meta(dst)
    assert (meta.source, meta.source_format, meta.frames, meta.version) == (
        str(src), original.format, len(original), 1
    )
    assert meta.created.endswith("+00:00")
    with h5py.File(dst, "r") as f:
        assert f.attrs["format"] == FORMAT_NAME
        assert set(f) == {"timestamp", "amplitude", "labels", "committed"} | (
            {"rssi"} if original.rssi is not None else set()
        ) | ({"seq"} if original.seq is not None else set())
        amp = f["amplitude"]
        assert amp.dtype == np.float32 and amp.maxshape == (None, *original.csi.shape[1:])
        assert amp.compression == "gzip" and amp.compression_opts == 4 and amp.shuffle
        assert amp.chunks[0] == 256
        assert "phase" not in f


@pytest.mark.parametrize("src", SAMPLES)
def test_phase_round_trip_when_kept(src: Path, tmp_path: Path) -> None:
    original = read_recording(src)
    dst = tmp_path / "rec.h5"
    assert convert(src, dst, keep_phase=True)["phase"] is True
    with h5py.File(dst, "r") as f:
        # What is stored is exactly |CSI| and angle(CSI) in float32.
        np.testing.assert_array_equal(f["amplitude"][()], np.abs(original.csi))
        np.testing.assert_array_equal(f["phase"][()], np.angle(original.csi).astype(np.float32))
    back = read_recording_file(dst)
    assert back.csi.dtype == np.complex64
    scale = float(np.abs(original.csi).max())
    np.testing.assert_allclose(back.csi, original.csi, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_array_equal(back.timestamp, original.timestamp)
    assert back.info == original.info


def test_keep_phase_on_amplitude_only_frames_stores_no_phase(
    pcap_frames: CSIFrames, tmp_path: Path
) -> None:
    amplitude_only = replace(pcap_frames, csi=pcap_frames.amplitude())
    dst = tmp_path / "amp.h5"
    with RecordingWriter(
        dst, amplitude_only.info, keep_phase=True, dropped=amplitude_only.dropped
    ) as w:
        w.append(amplitude_only)
    with h5py.File(dst, "r") as f:
        assert "phase" not in f
    _assert_same_frames(read_recording_file(dst), pcap_frames)


def test_many_small_appends_equal_one_append(pcap_frames: CSIFrames, tmp_path: Path) -> None:
    one, many = tmp_path / "one.h5", tmp_path / "many.h5"
    with RecordingWriter(one, pcap_frames.info, keep_phase=True) as w:
        w.append(pcap_frames)
    rng = np.random.default_rng(7)
    cuts = np.sort(rng.choice(np.arange(1, len(pcap_frames)), size=60, replace=False))
    with RecordingWriter(many, pcap_frames.info, keep_phase=True, flush_every_frames=17) as w:
        for idx in np.split(np.arange(len(pcap_frames)), cuts):
            w.append(pcap_frames.take(idx))
        w.append(pcap_frames.take(np.arange(0)))  # an empty batch is a no-op
    a, b = read_recording_file(one), read_recording_file(many)
    np.testing.assert_array_equal(a.csi, b.csi)
    np.testing.assert_array_equal(a.timestamp, b.timestamp)
    np.testing.assert_array_equal(a.seq, b.seq)
    assert a.info == b.info
    with h5py.File(one, "r") as f, h5py.File(many, "r") as g:
        for name in ("timestamp", "amplitude", "phase", "seq"):
            np.testing.assert_array_equal(f[name][()], g[name][()])


# -- labels --


def test_labels_appended_while_streaming_are_read_back(
    pcap_frames: CSIFrames, tmp_path: Path
) -> None:
    t0, t_end = float(pcap_frames.timestamp[0]), float(pcap_frames.timestamp[-1])
    mid = (t0 + t_end) / 2
    dst = tmp_path / "labelled.h5"
    half = len(pcap_frames) // 2
    with RecordingWriter(dst, pcap_frames.info, flush_every_frames=50) as w:
        w.add_label(t0, mid, activity="walking", identity="user1")  # before any frame
        w.append(pcap_frames.take(np.arange(half)))
        w.flush()
        w.add_label(mid, t_end + 1, activity="standing")
        w.append(pcap_frames.take(np.arange(half, len(pcap_frames))))
        w.add_label(t0 + 0.1, t0 + 0.2, identity="user2 — ünïcode")
    labels = read_labels(dst)
    assert labels == [
        Label(t0, mid, "walking", "user1"),
        Label(mid, t_end + 1, "standing", None),
        Label(t0 + 0.1, t0 + 0.2, None, "user2 — ünïcode"),
    ]
    assert label_at(labels, t0) == labels[0]
    assert label_at(labels, mid) == labels[1]  # ranges are half-open
    assert label_at(labels, t0 + 0.15) == labels[2]  # the later label wins where they overlap
    assert label_at(labels, t0 - 1) is None
    ts = read_recording_file(dst).timestamp
    activity = frame_labels(labels, ts, "activity")
    assert set(activity[ts < mid]) == {"walking"} and set(activity[ts >= mid]) == {"standing"}
    identity = frame_labels(labels, ts, "identity")
    assert set(identity[ts >= mid]) == {""}
    assert "user2 — ünïcode" in set(identity[(ts >= t0 + 0.1) & (ts < t0 + 0.2)])


def test_convert_writes_labels(tmp_path: Path) -> None:
    dst = tmp_path / "rec.h5"
    summary = convert(PCAP, dst, labels=[(0.0, 1e12, "walking", "user1"), Label(1.0, 2.0, "x")])
    assert summary["labels"] == 2
    assert read_labels(dst) == [Label(0.0, 1e12, "walking", "user1"), Label(1.0, 2.0, "x")]


def test_bad_labels_are_rejected_naming_the_values(
    pcap_frames: CSIFrames, tmp_path: Path
) -> None:
    with RecordingWriter(tmp_path / "r.h5", pcap_frames.info) as w:
        with pytest.raises(ValueError, match=r"start=5\.0 end=5\.0"):
            w.add_label(5.0, 5.0, "walking")
        with pytest.raises(ValueError, match=r"start=6\.0 end=2\.0"):
            w.add_label(6.0, 2.0, "walking")
        with pytest.raises(ValueError, match="finite"):
            w.add_label(float("nan"), 2.0, "walking")
        with pytest.raises(ValueError, match="neither an activity nor an identity"):
            w.add_label(1.0, 2.0)
        w.append(pcap_frames)
    assert read_labels(tmp_path / "r.h5") == []


# -- streaming rules --


def test_mismatched_shape_is_rejected_naming_both_shapes(
    pcap_frames: CSIFrames, tmp_path: Path
) -> None:
    dst = tmp_path / "r.h5"
    fewer_columns = pcap_frames.select_subcarriers(np.arange(128))
    two_antennas = replace(pcap_frames, csi=np.concatenate([pcap_frames.csi] * 2, axis=1))
    with RecordingWriter(dst, pcap_frames.info) as w:
        w.append(pcap_frames.take(np.arange(10)))
        with pytest.raises(SpecMismatchError, match=r"\(1, 128\).*\(1, 256\)"):
            w.append(fewer_columns)
        with pytest.raises(SpecMismatchError, match=r"\(2, 256\).*\(1, 256\)"):
            w.append(two_antennas)
        w.append(pcap_frames.take(np.arange(10, 20)))  # the writer goes on after a rejection
    np.testing.assert_array_equal(
        read_recording_file(dst).csi, pcap_frames.amplitude()[:20]
    )


def test_writer_does_not_clobber_and_reports_drops_at_close(
    pcap_frames: CSIFrames, tmp_path: Path
) -> None:
    dst = tmp_path / "r.h5"
    with RecordingWriter(dst, pcap_frames.info, dropped={"bad_magic": 2}) as w:
        w.append(pcap_frames)
        w.dropped["retransmission"] += 3  # counted while streaming
    assert read_recording_file(dst).dropped.as_dict() == {"bad_magic": 2, "retransmission": 3}
    with pytest.raises(FileExistsError):
        RecordingWriter(dst, pcap_frames.info)
    with pytest.raises(ValueError, match="closed"):
        w.append(pcap_frames)
    with RecordingWriter(dst, pcap_frames.info, overwrite=True) as w:
        w.append(pcap_frames.take(np.arange(5)))
    assert len(read_recording_file(dst)) == 5


# -- bad files --


def test_not_hdf5_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "capture.h5"
    bad.write_bytes(PCAP.read_bytes())
    with pytest.raises(FormatError, match=r"capture\.h5: not an HDF5 file .*starts with d4c3b2a1"):
        read_recording_file(bad)


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty.h5"
    empty.touch()
    with pytest.raises(FormatError, match=r"empty\.h5: empty file \(0 bytes\)"):
        read_recording_file(empty)
    with pytest.raises(FormatError, match="no such file"):
        read_recording_file(tmp_path / "missing.h5")


def test_hdf5_without_format_attribute_is_rejected(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["timestamp"] = np.zeros(3)
    with pytest.raises(FormatError, match=r"other\.h5: HDF5 file without a 'format' attribute"):
        read_recording_file(other)
    with h5py.File(other, "a") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(FormatError, match=r"format attribute is 'something-else', expected"):
        read_recording_file(other)
    with pytest.raises(FormatError, match="format attribute"):
        read_labels(other)


def test_missing_dataset_and_mismatched_lengths_are_rejected(
    pcap_frames: CSIFrames, tmp_path: Path
) -> None:
    dst = tmp_path / "r.h5"
    convert(PCAP, dst)
    with h5py.File(dst, "a") as f:
        f["amplitude"].resize(100, axis=0)
    with pytest.raises(
        FormatError, match=rf"r\.h5: dataset 'amplitude' has 100 frames .* has {len(pcap_frames)}"
    ):
        read_recording_file(dst)
    with h5py.File(dst, "a") as f:
        del f["timestamp"]
    with pytest.raises(FormatError, match=r"r\.h5: missing dataset 'timestamp'"):
        read_recording_file(dst)


def test_recording_without_frames_is_empty(pcap_frames: CSIFrames, tmp_path: Path) -> None:
    dst = tmp_path / "r.h5"
    with RecordingWriter(dst, pcap_frames.info) as w:
        w.add_label(0.0, 1.0, "walking")
    assert read_labels(dst) == [Label(0.0, 1.0, "walking")]
    with pytest.raises(EmptyRecordingError, match=r"r\.h5: no frame was written"):
        read_recording_file(dst)


# -- crash safety --

_WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from csi_edge.readers import read_recording
    from csi_edge.recording import RecordingWriter

    src = read_recording(sys.argv[1])
    n = len(src)
    # Only explicit flushes, so "FLUSHED n" is exactly what the file must hold at least.
    with RecordingWriter(sys.argv[2], src.info, keep_phase=True,
                         flush_every_frames=10**9, flush_every_s=3600.0) as writer:
        i = 0
        while True:  # until killed; cycles over the source once it runs out
            writer.append(src.take(np.arange(i, i + 8) % n))
            i += 8
            if i % 40 == 0:
                writer.add_label(float(i), float(i + 1), activity=f"a{i}")
                writer.flush()
                print("FLUSHED", writer.frames_committed, flush=True)
    """
)


def test_killed_writer_leaves_a_readable_file_up_to_the_last_flush(
    pcap_frames: CSIFrames, tmp_path: Path
) -> None:
    dst = tmp_path / "live.h5"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT, str(PCAP), str(dst)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )
    try:
        flushed: list[int] = []
        while len(flushed) < 3:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, f"writer exited early: {proc.stderr.read()}"  # type: ignore[union-attr]
            if line.startswith("FLUSHED "):
                flushed.append(int(line.split()[1]))
            if len(flushed) == 1:
                # A reader may open the file while the writer is still running (SWMR).
                assert len(read_recording_file(dst)) >= flushed[0]
        proc.send_signal(signal.SIGKILL)  # mid-append or mid-flush, never a clean close
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n = flushed[-1]
    with pytest.raises(OSError):
        h5py.File(dst, "r").close()  # the superblock still says "open for write"
    back = read_recording_file(dst)
    assert len(back) >= n
    idx = np.arange(len(back)) % len(pcap_frames)
    np.testing.assert_array_equal(back.timestamp, pcap_frames.timestamp[idx])
    with h5py.File(dst, "r", swmr=True) as f:
        stored = f["amplitude"][: len(back)]
        dropped = json.loads(f.attrs["dropped"])
    np.testing.assert_array_equal(stored, np.abs(pcap_frames.csi[idx]))
    np.testing.assert_array_equal(back.seq, pcap_frames.seq[idx])
    assert back.info == pcap_frames.info
    scale = float(np.abs(pcap_frames.csi).max())
    np.testing.assert_allclose(back.csi, pcap_frames.csi[idx], rtol=1e-5, atol=1e-6 * scale)
    labels = read_labels(dst)
    assert len(labels) >= len(flushed)
    assert labels[: len(flushed)] == [Label(float(k), float(k + 1), f"a{k}") for k in (40, 80, 120)]
    assert dropped == {}
