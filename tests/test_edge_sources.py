"""CSI sources of the edge agent on real data: the committed recordings replayed from files and
folders, Nexmon packets over a real UDP socket, and ESP32-CSI-Tool lines."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from csi_edge import CSIFrames, read_recording
from csi_edge.readers._pcap import read_udp_payloads
from csi_edge.readers.esp32 import Esp32LineParser
from csi_edge.readers.nexmon import read_nexmon_pcap
from csi_edge.sources import (
    EspLineSource,
    FileSource,
    NexmonUdpSource,
    SourceError,
    open_source,
    source_kind,
)

FALLING = "fition/falling_user1_rm1/falling_user1_rm1_1.pcap"
MESSY = "fition/getintobed_user4_rm4/getintobed_user4_rm4_24.pcap"  # other transmitters
WIAR = "wiar/height_90/csi_a1_1.dat"


def collect(source: object, *, max_chunks: int | None = None) -> list[CSIFrames]:
    """Every chunk a source yields (or the first ``max_chunks``), the generator closed."""

    async def run() -> list[CSIFrames]:
        chunks: list[CSIFrames] = []
        frames: AsyncIterator[CSIFrames] = source.frames()  # type: ignore[attr-defined]
        try:
            async for chunk in frames:
                chunks.append(chunk)
                if max_chunks is not None and len(chunks) >= max_chunks:
                    break
        finally:
            await frames.aclose()  # type: ignore[attr-defined]
        return chunks

    return asyncio.run(run())


def joined(chunks: list[CSIFrames]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([c.timestamp for c in chunks]),
            np.concatenate([c.csi for c in chunks]))


# -- URIs ---------------------------------------------------------------------------------------


def test_open_source_by_scheme(samples: Path) -> None:
    udp = open_source("nexmon-udp://127.0.0.1:5599", udp_warmup=7)
    assert isinstance(udp, NexmonUdpSource)
    assert (udp.host, udp.port, udp.filter.warmup, udp.kind) == ("127.0.0.1", 5599, 7, "nexmon")
    assert open_source("nexmon-udp://:5599").host == "0.0.0.0"  # type: ignore[attr-defined]

    path = samples / FALLING
    replay = open_source(f"file://{path}", speed=2.0, loop=False, timestamps="recorded")
    assert isinstance(replay, FileSource)
    assert (replay.path, replay.speed, replay.loop, replay.timestamps) == (
        path, 2.0, False, "recorded")
    assert replay.files == [path]
    assert replay.kind == "nexmon"

    for uri in ("stdin", "-", "stdin://", "esp32-serial:///dev/ttyUSB0?baud=921600"):
        esp = open_source(uri)
        assert isinstance(esp, EspLineSource) and esp.kind == "esp32"
        assert esp.uri == uri


def test_file_uri_options_win_over_arguments(samples: Path) -> None:
    path = samples / FALLING
    src = open_source(f"file://{path}?speed=max&loop=1", speed=1.0, loop=False)
    assert (src.speed, src.loop) == (None, True)  # type: ignore[attr-defined]
    src = open_source(f"file://{path}?speed=real&loop=no", speed=None, loop=True)
    assert (src.speed, src.loop) == (1.0, False)  # type: ignore[attr-defined]
    src = open_source(f"file://{path}?speed=4&loop=true")
    assert (src.speed, src.loop) == (4.0, True)  # type: ignore[attr-defined]
    src = open_source(f"file:{path}", speed=None)  # no authority part
    assert src.files == [path]  # type: ignore[attr-defined]
    src = open_source(f"file://localhost{path}")
    assert src.files == [path]  # type: ignore[attr-defined]


def test_file_uri_percent_escapes_are_decoded(samples: Path, tmp_path: Path) -> None:
    folder = tmp_path / "a folder"
    folder.mkdir()
    shutil.copy(samples / FALLING, folder / "x.pcap")
    src = open_source(f"file://{tmp_path}/a%20folder?speed=max")
    assert src.files == [folder / "x.pcap"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("uri", "message"), [
    ("nexmon-udp://127.0.0.1", "needs a port"),
    ("nexmon-udp://127.0.0.1:70000", "bad port"),
    ("nexmon-udp://127.0.0.1:port", "bad port"),
    ("http://example.com/csi", "unknown scheme 'http'"),
    ("/data/fition", "has no scheme"),
    ("datasets/samples", "has no scheme"),
    ("file:///no/such/recording.pcap", "'/no/such/recording.pcap' does not exist"),
    ("file:///no/such/folder?loop=1", "'/no/such/folder' does not exist"),
])
def test_bad_uris_raise_source_error_naming_the_uri(uri: str, message: str) -> None:
    with pytest.raises(SourceError, match=message) as info:
        open_source(uri)
    assert repr(uri) in str(info.value)


@pytest.mark.parametrize("speed", ["fast", "0", "-1", "nan"])
def test_bad_speed_in_a_file_uri_raises_source_error(samples: Path, speed: str) -> None:
    uri = f"file://{samples / FALLING}?speed={speed}"
    with pytest.raises(SourceError, match="speed") as info:
        open_source(uri)
    assert repr(uri) in str(info.value)


def test_folder_without_recordings(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("no CSI here")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")
    uri = f"file://{tmp_path}"
    with pytest.raises(SourceError, match="no recording file") as info:
        open_source(uri)
    assert repr(uri) in str(info.value)


def test_source_kind() -> None:
    assert source_kind("nexmon-udp://0.0.0.0:5500") == "nexmon"
    assert source_kind("esp32-serial:///dev/ttyUSB0") == "esp32"
    assert source_kind("stdin") == "esp32"
    assert source_kind("file:///data/x.pcap") is None  # known only once a file is read


# -- FileSource ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [FALLING, MESSY, WIAR])
def test_full_speed_replay_gives_every_frame_of_the_file(samples: Path, name: str) -> None:
    path = samples / name
    expected = read_recording(path)
    source = FileSource(f"file://{path}", path, speed=None, timestamps="recorded")
    assert source.kind == expected.info.device
    chunks = collect(source)
    t, csi = joined(chunks)
    assert len(t) == len(expected)
    np.testing.assert_array_equal(csi, expected.csi)
    np.testing.assert_array_equal(t, expected.timestamp)  # "recorded": exactly the file's
    assert all(c.info == expected.info for c in chunks)
    assert all(not c.dropped for c in chunks)
    assert source.dropped == expected.dropped  # the reader's drops, counted once
    assert source.passes == 1


def test_now_timestamps_start_now_with_identical_intervals(samples: Path) -> None:
    path = samples / FALLING
    expected = read_recording(path)
    before = time.time()
    source = FileSource(f"file://{path}", path, speed=None, timestamps="now")
    t, csi = joined(collect(source))
    after = time.time()
    assert before - 1 <= t[0] <= after + 1
    np.testing.assert_allclose(np.diff(t), np.diff(expected.timestamp), rtol=0, atol=1e-5)
    assert t[-1] - t[0] == pytest.approx(expected.duration_s, abs=1e-5)
    np.testing.assert_array_equal(csi, expected.csi)


def test_intel_replay_keeps_all_antennas(samples: Path) -> None:
    path = samples / WIAR
    chunks = collect(FileSource(f"file://{path}", path, speed=None))
    assert {c.csi.shape[1:] for c in chunks} == {(3, 30)}
    assert {c.info.device for c in chunks} == {"intel5300"}


def _check_folder_stream(chunks: list[CSIFrames], files: list[Path]) -> None:
    t, csi = joined(chunks)
    recordings = [read_recording(p) for p in files]
    assert len(t) == sum(len(r) for r in recordings)
    np.testing.assert_array_equal(csi, np.concatenate([r.csi for r in recordings]))
    assert np.all(np.diff(t) > 0)
    # Within each file the recorded intervals are kept; files follow each other directly.
    start = 0
    for r in recordings:
        part = t[start:start + len(r)]
        np.testing.assert_allclose(np.diff(part), np.diff(r.timestamp), rtol=0, atol=1e-5)
        start += len(r)


def test_folder_plays_every_file_in_sorted_order(samples: Path) -> None:
    folder = samples / "fition"
    files = sorted(folder.rglob("*.pcap"))
    assert any(len(p.relative_to(folder).parts) > 2 for p in files)  # a nested one
    source = FileSource(f"file://{folder}", folder, speed=None, timestamps="recorded")
    assert source.files == files
    chunks = collect(source)
    _check_folder_stream(chunks, files)
    t = chunks[0].timestamp
    np.testing.assert_array_equal(t[:5], read_recording(files[0]).timestamp[:5])


def test_folder_of_intel_recordings(samples: Path) -> None:
    folder = samples / "wiar"
    files = sorted(folder.rglob("*.dat"))
    source = open_source(f"file://{folder}?speed=max")
    _check_folder_stream(collect(source), files)


def test_loop_repeats_with_continuous_timestamps(samples: Path) -> None:
    path = samples / FALLING
    expected = read_recording(path)
    source = FileSource(f"file://{path}", path, speed=None, loop=True)
    # speed=None hands on ~5 s chunks: a 10 s file is 3 chunks per pass.
    chunks = collect(source, max_chunks=10)
    t, csi = joined(chunks)
    assert source.passes >= 3
    assert np.all(np.diff(t) > 0)
    n = len(expected)
    assert len(t) > 3 * n
    for p in range(3):
        np.testing.assert_array_equal(csi[p * n:(p + 1) * n], expected.csi)
        part = t[p * n:(p + 1) * n]
        np.testing.assert_allclose(np.diff(part), np.diff(expected.timestamp), atol=1e-5)
    # The next pass starts one median frame interval after the previous one ended.
    step = float(np.median(np.diff(expected.timestamp)))
    assert t[n] - t[n - 1] == pytest.approx(step, abs=1e-5)
    # Each pass reads the file again and counts its drops again.
    passes_begun = -(-len(t) // n)
    assert source.dropped["other_transmitter"] == expected.dropped["other_transmitter"] * (
        passes_begun)


def test_plays_counts_each_recording_started_after_the_first(samples: Path) -> None:
    # The agent's loop_new_epoch starts an epoch where this count changes: at each file of a
    # folder, and where a loop starts over.
    folder = samples / "wiar"
    source = FileSource(f"file://{folder}", folder, speed=None, loop=True)
    lengths = [len(read_recording(p)) for p in source.files]
    seen: list[tuple[int, int]] = []  # (plays while the chunk was handed on, its frames)

    async def run() -> None:
        frames = source.frames()
        try:
            async for chunk in frames:
                seen.append((source.plays, len(chunk)))
                if sum(n for _, n in seen) >= sum(lengths) + lengths[0]:
                    break
        finally:
            await frames.aclose()

    asyncio.run(run())
    # Each file's frames under one value, one more than the file before; the second pass's
    # first file under one more again.
    expected: list[int] = []
    for play, n in enumerate([*lengths, lengths[0]]):
        expected += [play] * n
    got = [play for play, n in seen for _ in range(n)]
    assert got == expected[: len(got)]
    assert got[-1] == len(lengths)


def test_loop_over_a_folder(samples: Path) -> None:
    folder = samples / "wiar"
    source = FileSource(f"file://{folder}", folder, speed=None, loop=True)
    total = sum(len(read_recording(p)) for p in source.files)
    t, _ = joined(collect(source, max_chunks=60))
    assert source.passes >= 1 and len(t) > total
    assert np.all(np.diff(t) > 0)


def test_real_time_pacing(samples: Path) -> None:
    path = samples / FALLING  # ~10.1 s
    duration = read_recording(path).duration_s
    source = FileSource(f"file://{path}", path, speed=10.0)
    arrivals: list[float] = []

    async def run() -> list[CSIFrames]:
        chunks = []
        start = time.monotonic()
        async for chunk in source.frames():
            arrivals.append(time.monotonic() - start)
            chunks.append(chunk)
        return chunks

    chunks = asyncio.run(run())
    elapsed = arrivals[-1]
    assert 0.5 < elapsed < 3.0, elapsed
    assert elapsed >= 0.8 * duration / 10.0
    assert len(chunks) > 10  # ~0.1 s of stream time per chunk
    # A chunk is handed on no earlier than its last frame is due.
    t0 = chunks[0].timestamp[0]
    for chunk, at in zip(chunks, arrivals, strict=True):
        assert at >= (chunk.timestamp[-1] - t0) / 10.0 - 0.05


def _folder_with_bad_file(samples: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    folder = tmp_path / "mixed"
    folder.mkdir()
    good_a = folder / "a_good.pcap"
    good_c = folder / "c_good.pcap"
    shutil.copy(samples / FALLING, good_a)
    shutil.copy(samples / MESSY, good_c)
    (folder / "b_corrupt.pcap").write_bytes(bytes(range(256)) * 20)
    return folder, [good_a, good_c]


def test_corrupt_file_in_a_folder_is_counted_and_skipped(samples: Path, tmp_path: Path) -> None:
    folder, good = _folder_with_bad_file(samples, tmp_path)
    source = FileSource(f"file://{folder}", folder, speed=None)
    assert len(source.files) == 3
    _check_folder_stream(collect(source), good)
    assert source.dropped["bad_file"] == 1
    assert "b_corrupt.pcap" in source.problems.first["bad_file"]


def test_corrupt_first_file_is_skipped_at_start(samples: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "0_empty.pcap").write_bytes(b"")
    (folder / "1_garbage.dat").write_bytes(b"\x00" * 500)
    shutil.copy(samples / WIAR, folder / "2_good.dat")
    source = FileSource(f"file://{folder}", folder, speed=None)
    assert source.kind == "intel5300"
    assert source.dropped["bad_file"] == 2
    _check_folder_stream(collect(source), [folder / "2_good.dat"])
    assert source.dropped["bad_file"] == 2  # not read again in the first pass


def test_corrupt_hdf5_file_is_counted_not_raised(samples: Path, tmp_path: Path) -> None:
    """A file with the HDF5 signature but a broken superblock: h5py raises RuntimeError."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(samples / FALLING, folder / "a.pcap")
    (folder / "b.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 200)
    source = FileSource(f"file://{folder}", folder, speed=None)
    _check_folder_stream(collect(source), [folder / "a.pcap"])
    assert source.dropped["bad_file"] == 1
    assert "b.h5" in source.problems.first["bad_file"]


def test_folder_of_only_bad_files_cannot_start(tmp_path: Path) -> None:
    (tmp_path / "a.pcap").write_bytes(b"garbage" * 100)
    (tmp_path / "b.dat").write_bytes(b"\x00" * 300)
    (tmp_path / "c.pcap").write_bytes(b"")
    uri = f"file://{tmp_path}"
    source = open_source(uri, speed=None)
    with pytest.raises(SourceError, match="none of 3 file") as info:
        source.kind  # noqa: B018 - reading the first file is what fails
    assert repr(uri) in str(info.value)
    assert "a.pcap" in str(info.value)  # the problems found are in the message
    with pytest.raises(SourceError, match="none of 3 file"):
        collect(open_source(uri, speed=None))


# -- NexmonUdpSource ----------------------------------------------------------------------------


def test_udp_source_yields_the_kept_stream_and_counts_garbage(samples: Path) -> None:
    capture = read_udp_payloads(samples / MESSY)
    expected = read_nexmon_pcap(samples / MESSY)
    garbage = {10: b"\x11\x11 short", 200: b"\x00" * 1042, 400: b"", 401: b"x" * 1043}
    source = open_source("nexmon-udp://127.0.0.1:0", udp_warmup=100)
    assert isinstance(source, NexmonUdpSource)

    async def run() -> list[CSIFrames]:
        chunks: list[CSIFrames] = []
        frames = source.frames()

        async def consume() -> None:
            async for chunk in frames:
                chunks.append(chunk)

        task = asyncio.create_task(consume())
        while source.bound is None:
            await asyncio.sleep(0.01)
        host, port = source.bound
        assert host == "127.0.0.1" and port > 0
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sender:
            for i, payload in enumerate(capture.payloads):
                if i in garbage:
                    sender.sendto(garbage[i], (host, port))
                sender.sendto(payload, (host, port))
                if i % 16 == 0:
                    await asyncio.sleep(0.002)  # let the loop drain the socket
        deadline = time.monotonic() + 10
        while sum(len(c) for c in chunks) < len(expected) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # nothing more should come
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await frames.aclose()
        return chunks

    chunks = asyncio.run(run())
    assert source.packets == len(capture.payloads) + len(garbage)
    _, csi = joined(chunks)
    np.testing.assert_array_equal(csi, expected.csi)
    assert {c.format for c in chunks} == {"nexmon-udp"}
    assert chunks[0].info.transmitter == expected.info.transmitter
    t, _ = joined(chunks)
    assert np.all(np.diff(t) >= 0)
    assert abs(t[-1] - time.time()) < 60  # arrival times
    assert source.dropped["bad_length"] == 3
    assert source.dropped["bad_magic"] == 1
    for reason in ("other_transmitter", "other_chanspec", "retransmission"):
        assert source.dropped[reason] == expected.dropped[reason], reason
    # The first offending value of each reason is kept.
    assert source.problems.first["bad_length"] == "8 bytes is not 18 + 4*(64|128|256)"
    assert source.problems.first["bad_magic"] == "magic 0x0000 is not 0x1111"
    assert "stream kept" in source.problems.first["other_transmitter"]


def test_udp_port_in_use_raises_source_error() -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        uri = f"nexmon-udp://127.0.0.1:{port}"
        with pytest.raises(SourceError, match="cannot listen") as info:
            collect(open_source(uri))
        assert repr(uri) in str(info.value)
        assert f"127.0.0.1:{port}" in str(info.value)


# -- EspLineSource ------------------------------------------------------------------------------

MAC_A = "3C:71:BF:6D:2A:78"
MAC_B = "24:0A:C4:00:11:22"


def esp_line(csi: np.ndarray, *, mac: str = MAC_A, local_us: int = 1_000_000,
             channel: int = 6) -> str:
    """One CSI_DATA line in the ESP32-CSI-Tool layout (buffer = imag, real per subcarrier)."""
    pairs = np.stack([csi.imag, csi.real], axis=-1).astype(np.int64).reshape(-1)
    head = ["CSI_DATA", "STA", mac, -60, 11, 1, 0, 0, 0, 0, 0, 0, 0, 0, -93, 0,
            channel, 0, local_us, 0, 101, 0, 0, "1.0", len(pairs)]
    return ",".join(str(v) for v in head) + ",[" + "".join(f"{v} " for v in pairs) + "]"


def known_csi(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.integers(-128, 128, (n, 64)) + 1j * rng.integers(-128, 128, (n, 64))).astype(
        np.complex64)


def test_esp_frames_waits_for_warmup_then_keeps_the_majority_transmitter() -> None:
    csi = known_csi(30)
    macs = [MAC_B if i % 5 == 0 else MAC_A for i in range(30)]
    parser = Esp32LineParser()
    records = [parser.parse(esp_line(c, mac=m, local_us=1_000_000 + 10_000 * i))
               for i, (c, m) in enumerate(zip(csi, macs, strict=True))]
    source = EspLineSource("stdin", warmup=20)
    pending = records[:10]
    assert source._frames(pending) is None  # below warmup: held
    assert len(pending) == 10 and source.mac is None
    pending = records[:25]
    frames = source._frames(pending)
    assert frames is not None and pending == []
    assert source.mac == MAC_A.lower()
    keep = [i for i in range(25) if macs[i] == MAC_A]
    np.testing.assert_array_equal(frames.csi[:, 0, :], csi[keep])
    np.testing.assert_allclose(np.diff(frames.timestamp), 0.01 * np.diff(keep), atol=1e-9)
    assert frames.format == "esp32-serial" and frames.info.transmitter == MAC_A.lower()
    assert source.dropped["other_transmitter"] == 5
    assert MAC_A.lower() in source.problems.first["other_transmitter"]
    # After warmup a chunk goes out whatever its size.
    pending = records[26:28]
    frames = source._frames(pending)
    assert frames is not None and len(frames) == 2 and pending == []
    assert source._frames([]) is None


def test_esp_frames_of_only_another_transmitter_are_counted() -> None:
    parser = Esp32LineParser()
    records = [parser.parse(esp_line(c, mac=MAC_A, local_us=10_000 * i))
               for i, c in enumerate(known_csi(5))]
    source = EspLineSource("stdin", warmup=3)
    assert source._frames(records[:4]) is not None
    strangers = [parser.parse(esp_line(c, mac=MAC_B)) for c in known_csi(3, seed=1)]
    assert source._frames(strangers) is None
    assert strangers == []
    assert source.dropped["no_frame_of_stream"] == 3
    assert MAC_B.lower() in source.problems.first["no_frame_of_stream"]


def test_esp_final_chunk_below_warmup_is_still_handed_on() -> None:
    parser = Esp32LineParser()
    records = [parser.parse(esp_line(c, local_us=10_000 * i)) for i, c in enumerate(known_csi(4))]
    source = EspLineSource("stdin", warmup=20)
    assert source._frames(list(records)) is None
    frames = source._frames(list(records), final=True)
    assert frames is not None and len(frames) == 4


def test_esp_source_reads_stdin_lines_to_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    csi = known_csi(40, seed=3)
    lines = ["type,role,mac,rssi,...", ""]
    lines += [esp_line(c, local_us=2_000_000 + 10_000 * i) for i, c in enumerate(csi)]
    lines.insert(12, "I (1234) wifi: a log line")
    lines.insert(20, esp_line(csi[0])[:50])  # cut short
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    source = open_source("stdin")
    chunks = collect(source)
    _, got = joined(chunks)
    np.testing.assert_array_equal(got[:, 0, :], csi)
    assert source.dropped["not_csi_line"] == 1
    assert source.dropped["truncated"] == 1
    assert "a log line" in source.problems.first["not_csi_line"]
