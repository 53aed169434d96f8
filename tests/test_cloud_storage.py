"""The cloud's recordings: real payloads from the edge encoder, decoded by the real ingest,
written by RecordingStore, read back with the project's recording reader; labels through the
HTTP API; a writer killed mid-stream."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _harness import wait_until

from csi_cloud.ingest import Ingestor
from csi_cloud.recorder import RecorderProcess
from csi_cloud.records import DecodedRecord
from csi_cloud.registry import ModelRegistry
from csi_cloud.storage import (
    RecordingStore,
    decode_stored,
    read_segments,
    recover,
    unlabelled_ranges,
)
from csi_edge import read_recording
from csi_edge.bundle import EdgeEncoder
from csi_edge.preprocess import Preprocessor, SegmentBatch
from csi_edge.recording import read_labels, read_recording_file, read_recording_meta

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SAMPLES = ROOT / "datasets" / "samples" / "fition"
WALK = SAMPLES / "walking_user1_rm1" / "walking_user1_rm1_10.pcap"
FALL = SAMPLES / "falling_user1_rm1" / "falling_user1_rm1_1.pcap"
TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(MODELS)


@pytest.fixture(scope="module")
def encoder() -> EdgeEncoder:
    return EdgeEncoder(MODELS / "fition")


_BATCHES: dict[Path, SegmentBatch] = {}


def _batch(encoder: EdgeEncoder, path: Path) -> SegmentBatch:
    if path not in _BATCHES:
        _BATCHES[path] = Preprocessor(encoder.spec).process(read_recording(path))
    return _BATCHES[path]


def payloads(encoder: EdgeEncoder, path: Path, site: str, ap: str, *, level: int = 2,
             epoch: int = 1, shift_ms: int = 0, per_message: int = 1
             ) -> list[tuple[str, str, bytes, float]]:
    """Wire payloads of a recording exactly as an edge sends them."""
    b = _batch(encoder, path)
    out = []
    for i in range(0, len(b), per_message):
        j = min(i + per_message, len(b))
        out.append((site, ap, encoder.compress(
            b.data[i:j], level=level, first_seq=int(b.index[i]), epoch=epoch,
            timestamp_ms=round(b.start_time[i] * 1000) + shift_ms,
            quality=[float(q) for q in b.quality[i:j]]), time.time()))
    return out


def decoded(registry: ModelRegistry, items: list[tuple[str, str, bytes, float]]
            ) -> list[DecodedRecord]:
    result = Ingestor(registry, reconstruct=True).process(items)
    assert not result.rejected
    return result.segments


def test_codes_round_trip_and_reconstruction(tmp_path: Path, registry: ModelRegistry,
                                              encoder: EdgeEncoder) -> None:
    records = decoded(registry, payloads(encoder, WALK, "home", "ap-1", per_message=2))
    assert len(records) == 9
    store = RecordingStore(tmp_path, reconstruction=True, max_bytes=2**30, max_s=3600)
    store.append(records[:4])  # two ingest batches into one file
    store.append(records[4:])
    (info,) = store.files("home", "ap-1")
    assert info.open and info.segments == 9 and info.frames == 9 * 50
    store.close()
    path = info.path
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(records[0].timestamp_ms // 1000))
    assert path == tmp_path / "home" / "ap-1" / f"home_ap-1_{stamp}.h5"
    assert not list(path.parent.glob(".*")), "the writer lock is removed at close"

    # The codes: every field, and the bytes decode to the codes the ingest decoded.
    stored = read_segments(path)
    assert len(stored) == 9
    assert stored.seq.tolist() == [r.seq for r in records]
    assert stored.epoch.tolist() == [1] * 9
    assert stored.timestamp_ms.tolist() == [r.timestamp_ms for r in records]
    assert stored.level.tolist() == [2] * 9
    assert np.allclose(stored.quality, [r.quality for r in records])
    assert stored.model == [records[0].model.id] * 9 and len(stored.model[0]) == 64
    assert stored.codes == [r.code_bytes for r in records]
    model = registry.get(stored.model[0])
    for codes, record in zip(decode_stored(stored, model), records, strict=True):
        assert np.array_equal(codes.latent, record.codes.latent)
        assert np.array_equal(codes.profile, record.codes.profile)
        assert codes.level == record.codes.level

    # The reconstruction, as the project's reader sees it.
    frames = read_recording_file(path)
    spec = model.manifest.input_spec
    assert frames.csi.shape == (9 * 50, spec.antennas, len(spec.subcarriers))
    assert frames.csi.dtype == np.float32 and (frames.csi >= 0).all()
    assert frames.info.device == spec.source_kind == "nexmon"
    assert frames.info.subcarriers == tuple(spec.subcarriers)
    assert frames.info.extra["model"] == model.id and frames.info.extra["ap"] == "ap-1"
    expected_t = np.concatenate([r.timestamp_ms / 1000 + np.arange(50) / 50 for r in records])
    assert np.allclose(frames.timestamp, expected_t, rtol=0, atol=1e-6)
    assert np.all(np.diff(frames.timestamp) > 0)
    # Amplitude = expm1(reconstruction * scale + mean), per subcarrier.
    enc = model.net.encoder
    recon = records[3].reconstruction.reshape(50, -1)
    amp = np.expm1(recon * enc.scale.numpy() + enc.mean.numpy()).reshape(50, 1, -1)
    assert np.allclose(frames.csi[150:200], amp, rtol=1e-4, atol=1e-4)
    # ... and close to what the AP measured (the edge's preprocessed segments).
    original = np.expm1(_batch(encoder, WALK).data).reshape(-1)
    assert np.corrcoef(original, frames.csi.reshape(-1))[0, 1] > 0.9
    assert read_recording_meta(path).source == "csi-cloud://home/ap-1"


def test_codes_only_and_mixed_aps(tmp_path: Path, registry: ModelRegistry,
                                  encoder: EdgeEncoder) -> None:
    a = payloads(encoder, WALK, "home", "ap-1")
    b = payloads(encoder, FALL, "home", "ap-2", level=0, per_message=4)
    mixed = [item for pair in zip(a, b, strict=False) for item in pair] + a[len(b):]
    records = decoded(registry, mixed)
    store = RecordingStore(tmp_path, reconstruction=False, max_bytes=2**30, max_s=3600)
    store.append(records)
    store.close()
    (f1,) = store.files("home", "ap-1")
    (f2,) = store.files("home", "ap-2")
    assert f1.segments == len(a) and f1.frames == 0
    assert f2.segments == len(_batch(encoder, FALL)) and set(read_segments(f2.path).level) == {0}
    assert read_segments(f1.path).codes == [r.code_bytes for r in records if r.ap == "ap-1"]
    with pytest.raises(Exception, match="no frame"):
        read_recording_file(f1.path)  # a codes-only file has no frames


def test_rotation_by_size_and_time(tmp_path: Path, registry: ModelRegistry,
                                   encoder: EdgeEncoder) -> None:
    records = decoded(registry, payloads(encoder, WALK, "s", "a"))
    by_size = RecordingStore(tmp_path / "size", max_bytes=2**16, max_s=3600)
    for r in records:  # one segment per ingest batch
        by_size.append([r])
    by_size.close()
    files = by_size.files("s", "a")
    assert len(files) > 1
    assert sum(f.segments for f in files) == 9
    for f in files[:-1]:
        assert f.bytes >= 2**16 and f.segments >= 1
    seqs = np.concatenate([read_segments(f.path).seq for f in files])
    assert seqs.tolist() == [r.seq for r in records]  # each segment once, in order
    frames = [read_recording_file(f.path) for f in files]
    assert sum(len(f) for f in frames) == 9 * 50

    by_time = RecordingStore(tmp_path / "time", max_bytes=2**30, max_s=3.5)
    by_time.append(records)
    # A restarted edge (new epoch) whose clock went back starts a new file too.
    again = decoded(registry, payloads(encoder, WALK, "s", "a", epoch=2, shift_ms=-60_000))
    by_time.append(again[:2])
    by_time.close()
    files = by_time.files("s", "a")
    assert [f.segments for f in files] == [2, 3, 3, 3]  # by name: by start time
    assert len({f.path for f in files}) == 4
    for f in files:
        assert f.end - f.start <= 3.5
        assert re.fullmatch(r"s_a_\d{8}T\d{6}Z(-\d+)?\.h5", f.path.name)
    assert read_segments(files[0].path).epoch.tolist() == [2, 2]


def test_labels_on_closed_open_and_future_files(tmp_path: Path, registry: ModelRegistry,
                                                encoder: EdgeEncoder) -> None:
    from csi_cloud.datasets import index_dataset

    records = decoded(registry, payloads(encoder, WALK, "s", "a"))
    t0 = records[0].timestamp_ms / 1000
    store = RecordingStore(tmp_path, max_bytes=2**30, max_s=2.5)  # two segments per file
    store.append(records[:5])  # files [t0, t0+2), [t0+2, t0+4) closed, [t0+4, ..) open
    # Overlaps the two closed files only.
    done = store.label_range("s", "a", t0 + 1, t0 + 3, "walking", "user1")
    assert len(done.files) == 2 and not done.failed and not done.pending
    # Starts in the open file and reaches into the future: open file now, later files too.
    later = store.label_range("s", "a", t0 + 4.5, t0 + 20, "sitdown", None)
    assert later.pending and len(later.files) == 1
    # A range nobody streamed: no file.
    assert not store.label_range("s", "a", t0 - 100, t0 - 50, "nm").files
    with pytest.raises(ValueError):
        store.label_range("s", "a", t0 + 5, t0 + 5, "walking")
    with pytest.raises(ValueError):
        store.label_range("s", "a", t0, t0 + 1)
    store.append(records[5:])  # two more files, opened later: they get the pending label
    store.close()
    files = store.files("s", "a")
    assert [f.segments for f in files] == [2, 2, 2, 2, 1]
    labels = [read_labels(f.path) for f in files]
    for found in labels[:2]:
        assert [(lab.activity, lab.identity, lab.start, lab.end) for lab in found] == [
            ("walking", "user1", t0 + 1, t0 + 3)]
    for found in labels[2:]:
        assert [(lab.activity, lab.identity, lab.start) for lab in found] == [
            ("sitdown", None, t0 + 4.5)]
    # The recordings dataset (what retraining reads) sees them.
    examples = index_dataset("recordings", tmp_path).examples
    assert sorted(e.activity for e in examples) == ["sitdown"] * 3 + ["walking"] * 2


def test_unlabelled_ranges_are_the_stream_outside_every_label(
        tmp_path: Path, registry: ModelRegistry, encoder: EdgeEncoder) -> None:
    records = decoded(registry, payloads(encoder, WALK, "s", "a"))  # 9 segments, 1 s apart
    t0 = records[0].timestamp_ms / 1000
    store = RecordingStore(tmp_path, max_bytes=2**30, max_s=1e9)
    store.append(records[:7])
    store.append(records[8:])  # the segment at t0 + 7 never arrived: a gap of 2 s
    store.label_range("s", "a", t0 + 2, t0 + 4, "walking")
    store.close()
    (info,) = store.files("s", "a")
    path = info.path
    # Unlabelled: t0, t0+1 | t0+4, t0+5, t0+6 | (gap) t0+8. In pieces of 2 s, each at least
    # 1 s long; a run's remainder starts a piece of its own.
    assert unlabelled_ranges([path], 2.0, 100) == [
        (path, t0, t0 + 2), (path, t0 + 4, t0 + 6), (path, t0 + 6, t0 + 7),
        (path, t0 + 8, t0 + 9)]
    assert unlabelled_ranges([path], 3.0, 100) == [
        (path, t0, t0 + 2), (path, t0 + 4, t0 + 7)]  # the 1 s at t0+8 is under half of 3 s
    assert unlabelled_ranges([path], 2.0, 2) == [(path, t0 + 6, t0 + 7), (path, t0 + 8, t0 + 9)]
    # A file that is no recording is passed over; a bad argument is refused by name.
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    assert unlabelled_ranges([junk, path], 3.0, 100) == [(path, t0, t0 + 2),
                                                          (path, t0 + 4, t0 + 7)]
    with pytest.raises(ValueError, match="chunk_s must be > 0"):
        unlabelled_ranges([path], 0.0, 10)


def test_a_file_without_a_commit_record_counts_its_datasets(
        tmp_path: Path, registry: ModelRegistry, encoder: EdgeEncoder) -> None:
    """The recording reader takes the dataset lengths of a file without ``committed`` (a tool
    that keeps no commit record wrote it); the store's listing, recovery and labels agree."""
    import h5py

    records = decoded(registry, payloads(encoder, WALK, "s", "a"))
    t0 = records[0].timestamp_ms / 1000
    store = RecordingStore(tmp_path, max_bytes=2**30, max_s=1e9)
    store.append(records)
    store.label_range("s", "a", t0, t0 + 1, "walking")
    store.close()
    (path,) = sorted(tmp_path.glob("s/a/*.h5"))
    with h5py.File(path, "r+") as f:
        del f["committed"]
    frames = len(read_recording_file(path))
    assert frames == 9 * 50 and len(read_labels(path)) == 1
    store = RecordingStore(tmp_path, max_bytes=2**30, max_s=1e9)
    (info,) = store.files("s", "a")
    assert (info.segments, info.frames, info.labels) == (9, frames, 1)
    recover(path)
    assert len(read_recording_file(path)) == frames and len(read_labels(path)) == 1
    result = store.label_range("s", "a", t0 + 1, t0 + 2, "sitdown")
    assert result.files == [path] and not result.failed
    assert [lab.activity for lab in read_labels(path)] == ["walking", "sitdown"]
    assert len(read_recording_file(path)) == frames
    store.close()


_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_cloud_storage import decoded, payloads
    from csi_cloud.registry import ModelRegistry
    from csi_cloud.storage import RecordingStore
    from csi_edge.bundle import EdgeEncoder
    from pathlib import Path
    registry = ModelRegistry(Path({models!r}))
    encoder = EdgeEncoder(Path({models!r}) / "fition")
    store = RecordingStore(Path({folder!r}), max_bytes=2**30, max_s=1e9, fsync_s=0.0)
    epoch = 0
    while True:
        epoch += 1
        records = decoded(registry, payloads(encoder, Path({sample!r}), "s", "a",
                                             epoch=epoch, shift_ms=epoch * 10_000))
        for r in records:
            store.append([r])
            if epoch == 1 and r is records[-1]:
                print("ready", flush=True)
""")


@pytest.mark.e2e
def test_killed_writer_leaves_a_readable_file(tmp_path: Path, registry: ModelRegistry) -> None:
    folder = tmp_path / "rec"
    code = _CHILD.format(tests=str(Path(__file__).parent), models=str(MODELS),
                         folder=str(folder), sample=str(WALK))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        # Killed somewhere inside a later append: the moment is the point, not a condition.
        time.sleep(0.7)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    (path,) = sorted(folder.glob("s/a/*.h5"))
    stored = read_segments(path)
    frames = read_recording_file(path)  # opens the "still open for write" file SWMR
    assert len(stored) >= 9
    # Both committed counts are complete data; a kill inside the last flush may leave one
    # of them a batch (here one segment) behind the other.
    assert abs(len(frames) - 50 * len(stored)) <= 50
    model = registry.get(stored.model[0])
    assert len(decode_stored(stored, model)) == len(stored)
    assert np.all(np.diff(frames.timestamp) > 0)
    # A new store labels it: the dead writer's lock is free, so the file is recovered first.
    t0 = stored.timestamp_ms[0] / 1000
    store = RecordingStore(folder, max_bytes=2**30, max_s=1e9)
    result = store.label_range("s", "a", t0, t0 + 2, "walking")
    assert result.files == [path] and not result.failed
    assert [lab.activity for lab in read_labels(path)] == ["walking"]
    assert len(read_segments(path)) == len(stored)
    assert len(read_recording_file(path)) == len(frames)
    store.close()


def test_labels_api_reaches_the_recordings(tmp_path: Path, encoder: EdgeEncoder) -> None:
    """Payloads through the running service land in its RecordingStore; POST /labels adds
    the label to that file and to the database."""
    import shutil

    from fastapi.testclient import TestClient

    from csi_cloud.api import create_app
    from csi_cloud.settings import CloudSettings

    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(MODELS / "fition", models / "fition")
    settings = CloudSettings(broker=None, dev=False, token=TOKEN, models=models,
                             db=f"sqlite:///{tmp_path / 'cloud.db'}",
                             recordings=tmp_path / "recordings", jobs_dir=tmp_path / "jobs")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    items = payloads(encoder, WALK, "home", "ap-1")
    t0 = float(_batch(encoder, WALK).start_time[0])
    with TestClient(create_app(settings)) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        assert isinstance(service.recorder, RecorderProcess)
        for site, ap, data, received in items:
            client.portal.call(service.submit, site, ap, data, received)  # type: ignore[union-attr]
        wait_until(lambda: client.get("/api/v1/aps/home/ap-1").status_code == 200, 20,
                   "the AP in the API", every_s=0.05)
        wait_until(lambda: sum(f.segments for f in service.recorder.files("home", "ap-1")) >= 9,
                   20, "9 segments in the AP's recordings", every_s=0.05)
        body = {"site": "home", "ap": "ap-1", "start": t0, "end": t0 + 4, "activity": "walking",
                "identity": "user1"}
        assert client.post("/api/v1/labels", json=body).status_code == 401
        r = client.post("/api/v1/labels", json=body, headers=auth)
        assert r.status_code == 201, r.text
        label = r.json()
        assert label["id"] >= 1 and label["known"] is True and label["recordings"] == 1
        r = client.post("/api/v1/labels", headers=auth, json={**body, "activity": "dancing",
                                                              "identity": None})
        assert r.status_code == 201 and r.json()["known"] is False  # a new name, for retraining
        for bad in ({"end": t0}, {"end": float("nan")}, {"activity": None, "identity": None},
                    {"activity": ""}, {"activity": "x" * 65}, {"start": -1.0}):
            r = client.post("/api/v1/labels", content=_json({**body, **bad}),
                            headers={**auth, "Content-Type": "application/json"})
            assert r.status_code == 422, (bad, r.text)
        r = client.post("/api/v1/labels", headers=auth, json={**body, "ap": "nope"})
        assert r.status_code == 404
        page = client.get("/api/v1/labels", params={"site": "home", "ap": "ap-1"}).json()
        assert page["count"] == 2 and [x["activity"] for x in page["data"]] == ["dancing",
                                                                               "walking"]
        assert client.get("/api/v1/labels", params={"ap": "other"}).json()["count"] == 0
    (path,) = sorted((tmp_path / "recordings" / "home" / "ap-1").glob("*.h5"))
    assert [(lab.activity, lab.identity) for lab in read_labels(path)] == [
        ("walking", "user1"), ("dancing", None)]
    assert len(read_recording_file(path)) == 9 * 50


def _json(value: object) -> bytes:
    import json

    return json.dumps(value, allow_nan=True).encode()
