"""The cloud's side of presence: motion scores from the wire into every prediction, presence-only
payloads without a model, the fields over the HTTP API and in the database."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from csi_cloud.api.app import create_app
from csi_cloud.ingest import Ingestor
from csi_cloud.registry import ModelRegistry
from csi_cloud.settings import CloudSettings
from csi_edge import read_recording
from csi_edge.bundle import EdgeEncoder
from csi_edge.codec import (
    NO_MODEL_ID,
    Payload,
    SegmentRecord,
    crc16,
    encode_payload,
)
from csi_edge.preprocess import Preprocessor
from csi_edge.presence import PresenceConfig

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
PCAP = ROOT / "datasets" / "samples" / "fition" / "walking_user1_rm1" / \
    "walking_user1_rm1_10.pcap"
T0 = 1_700_000_000_000
TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(MODELS)


def presence_message(first_seq: int, scores: list[float | None], epoch: int = 7) -> bytes:
    return encode_payload(Payload(
        level=0, model_id=NO_MODEL_ID, epoch=epoch, first_seq=first_seq,
        timestamp_ms=T0 + first_seq * 1000,
        segments=tuple(SegmentRecord(1.0, b"", s) for s in scores), motion=True))


def test_presence_only_messages_need_no_model(registry: ModelRegistry) -> None:
    ingestor = Ingestor(registry, presence=PresenceConfig(threshold=1.5, hold_s=3.0))
    scores: list[float | None] = [None, None, 0.25, -0.5, 3.0, 2.0, 0.5, 0.0, 0.25, 0.0]
    batch = [("home", "hall", presence_message(i, [s]), 100.0 + i)
             for i, s in enumerate(scores)]
    batch.append(("home", "hall", presence_message(3, [-0.5]), 200.0))  # a duplicate
    result = ingestor.process(batch)
    assert result.rejected == [] and result.segments == []  # nothing to decode or record
    predictions = result.predictions
    assert [p.seq for p in predictions] == list(range(10))
    assert [p.motion_score for p in predictions] == scores
    assert [p.motion for p in predictions] == [None, None, False, False, True, True, False,
                                               False, False, False]
    # Occupied from the first motion segment until 3 s passed without one.
    assert [p.presence for p in predictions] == [None, None, False, False, True, True, True,
                                                 True, False, False]
    first = predictions[4]
    assert first.model is None and first.model_name is None and first.activity is None
    assert first.activity_confidence is None and first.probabilities == {}
    assert first.timestamp == (T0 + 4000) / 1000 and first.rate_level == 0
    state = ingestor.aps[("home", "hall")]
    assert state.counters["duplicates"] == 1 and state.counters["segments"] == 10
    assert state.model is None and state.last_prediction == predictions[-1]
    assert first.as_dict()["presence"] is True
    # A gap is counted as with any other AP.
    ingestor.process([("home", "hall", presence_message(12, [0.0]), 300.0)])
    assert state.counters["gaps"] == 1 and state.counters["missing_segments"] == 2


def test_malformed_presence_only_messages_are_rejected(registry: ModelRegistry) -> None:
    good = presence_message(0, [1.0])
    body = bytearray(good[:-2])
    body[0] &= ~0x02  # MOTION cleared: no model and no motion byte cannot be
    body = body[:18] + body[19:]  # drop the motion byte accordingly
    bad = bytes(body) + crc16(bytes(body)).to_bytes(2, "big")
    ingestor = Ingestor(registry)
    result = ingestor.process([("home", "hall", bad, 1.0), ("home", "hall", good, 1.0)])
    assert [r[2] for r in result.rejected] == ["bad_no_model"]
    assert ingestor.rejected["bad_no_model"] == 1
    assert len(result.predictions) == 1


def test_model_payloads_carry_motion_into_predictions(registry: ModelRegistry) -> None:
    edge = EdgeEncoder(MODELS / "fition")
    batch = Preprocessor(edge.spec).process(read_recording(PCAP))
    blobs = edge.compress_codes(batch.data, 1)
    scores = [None, 0.0, 0.5, 4.0, 1.0, 0.25, 0.0, 2.5, 0.0, 0.0][:len(blobs)]
    messages = [("home", "lab", encode_payload(Payload(
        level=1, model_id=edge.model_id, epoch=1, first_seq=i, timestamp_ms=T0 + i * 1000,
        segments=(SegmentRecord(1.0, motion=s),), motion=True, codes=blobs[i])), float(i))
        for i, s in enumerate(scores)]
    ingestor = Ingestor(registry, presence=PresenceConfig(hold_s=30.0))
    result = ingestor.process(messages)
    assert result.rejected == []
    predictions = result.predictions
    assert len(predictions) == len(scores) and all(p.activity for p in predictions)
    assert [p.motion_score for p in predictions] == scores
    assert [p.motion for p in predictions][:5] == [None, False, False, True, False]
    assert [p.presence for p in predictions][:5] == [None, False, False, True, True]
    assert [r.motion for r in result.segments] == scores
    # Without the flag (an older edge): no score, no presence.
    plain = encode_payload(Payload(level=1, model_id=edge.model_id, epoch=1,
                                   first_seq=len(scores), timestamp_ms=T0 + 20_000,
                                   segments=(SegmentRecord(1.0),), codes=blobs[0]))
    p = ingestor.process([("home", "lab2", plain, 1.0)]).predictions[0]
    assert (p.motion_score, p.motion, p.presence) == (None, None, None)


def test_presence_over_the_api(tmp_path: Path) -> None:
    settings = CloudSettings(broker=None, dev=True, token=SecretStr(TOKEN),
                             db=f"sqlite:///{tmp_path}/db.sqlite", models=MODELS,
                             recordings=tmp_path / "rec", jobs_dir=tmp_path / "jobs",
                             presence_hold_s=2.0)
    with TestClient(create_app(settings)) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        messages = [("home", "hall", presence_message(i, [s]), time.time(), None)
                    for i, s in enumerate([None, 0.0, 0.25, 3.5, 0.0, 0.0, 0.0])]
        with client.websocket_connect("/api/v1/predictions/ws?site=home") as ws:
            client.portal.call(service._process, messages)  # type: ignore[union-attr]
            live = [ws.receive_json() for _ in messages]
        # The live stream carries the same fields (SSE sends these very events).
        assert [e["seq"] for e in live] == list(range(7))
        assert [e["presence"] for e in live] == [None, False, False, True, True, False, False]
        assert [e["motion_score"] for e in live][:4] == [None, 0.0, 0.25, 3.5]
        assert all(e["activity"] is None and e["model"] is None for e in live)
        deadline = time.monotonic() + 20
        while True:
            ap = client.get("/api/v1/aps/home/hall")
            if ap.status_code == 200 and (ap.json()["prediction"] or {}).get("seq") == 6:
                break
            assert time.monotonic() < deadline, ap.text
            time.sleep(0.1)
        latest = ap.json()["prediction"]
        assert latest["model"] is None and latest["activity"] is None
        assert latest["motion_score"] == 0.0 and latest["motion"] is False
        assert latest["presence"] is False  # 3 s after the motion, hold 2 s
        assert ap.json()["model"] is None
        page = client.get("/api/v1/predictions", params={"site": "home", "limit": 10}).json()
        stored = {p["seq"]: p for p in page["data"]}
        assert len(stored) == 7
        assert stored[3]["motion"] is True and stored[3]["presence"] is True
        assert stored[3]["motion_score"] == 3.5 and stored[0]["motion_score"] is None
        assert stored[0]["presence"] is None and stored[4]["presence"] is True
        one = client.get("/api/v1/aps/home/hall/prediction").json()
        assert one["seq"] == 6 and one["presence"] is False
        schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictionOut"]
        assert {"motion_score", "motion", "presence"} <= set(schema["properties"])


def test_an_aps_motion_threshold_fitted_on_its_labels(tmp_path: Path) -> None:
    """Walking that moves the channel little (scores 0.75-1.4, under the site's 1.5) becomes
    motion once the AP's threshold is fitted on labelled still and moving seconds; the
    threshold is kept in the database across a restart, and can be set or cleared."""
    settings = CloudSettings(broker=None, dev=True, token=SecretStr(TOKEN),
                             db=f"sqlite:///{tmp_path}/db.sqlite", models=MODELS,
                             recordings=tmp_path / "rec", jobs_dir=tmp_path / "jobs",
                             presence_hold_s=2.0)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    still = [(-0.5 + 0.05 * i) for i in range(20)]  # -0.5 .. 0.45
    moving = [0.75 + 0.03 * i for i in range(20)]  # 0.75 .. 1.32
    t0 = T0 / 1000
    fit_path = "/api/v1/aps/home/hall/presence/threshold/fit"
    with TestClient(create_app(settings)) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        messages = [("home", "hall", presence_message(i, [s]), time.time(), None)
                    for i, s in enumerate(still + moving)]
        client.portal.call(service._process, messages)  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while len(client.get("/api/v1/predictions", params={"site": "home", "limit": 100})
                  .json()["data"]) < 40:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        stored = client.get("/api/v1/predictions", params={"site": "home", "limit": 100})
        assert not any(p["motion"] for p in stored.json()["data"])  # the site's 1.5
        assert client.post(fit_path, json={}).status_code == 401
        r = client.post(fit_path, json={}, headers=auth)
        assert r.status_code == 409 and "0 still and 0 moving" in r.json()["detail"], r.text
        for start, end, activity in ((t0, t0 + 20, "nm"), (t0 + 20, t0 + 40, "walking")):
            assert client.post("/api/v1/labels", headers=auth, json={
                "site": "home", "ap": "hall", "start": start, "end": end,
                "activity": activity}).status_code == 201
        r = client.post(fit_path, json={"max_false_positive_rate": 0.7}, headers=auth)
        assert r.status_code == 422 and "max_false_positive_rate" in r.text
        r = client.post(fit_path, json={"still": ["sitting"]}, headers=auth)
        assert r.status_code == 409 and "walking 20 s" in r.json()["detail"], r.text
        # A movement just before the fit: the AP's presence hold must outlive the new threshold.
        client.portal.call(service._process, [  # type: ignore[union-attr]
            ("home", "hall", presence_message(40, [3.0]), time.time(), None)])
        r = client.post(fit_path, json={}, headers=auth)
        assert r.status_code == 200, r.text
        fitted = r.json()
        assert fitted["threshold"] == 0.5 and fitted["how"] == "fitted"  # above 0.45
        assert fitted["fit"]["still_seconds"] == 20 and fitted["fit"]["moving_seconds"] == 20
        assert fitted["fit"]["recall"] == 1.0 and fitted["fit"]["false_positive_rate"] == 0.0
        assert fitted["fit"]["labelled"] == {"nm": 20, "walking": 20}
        ap = client.get("/api/v1/aps/home/hall").json()
        assert ap["motion_threshold"]["threshold"] == 0.5
        # The next segments are judged against it; the AP keeps its presence hold.
        client.portal.call(service._process, [  # type: ignore[union-attr]
            ("home", "hall", presence_message(41 + i, [s]), time.time(), None)
            for i, s in enumerate([0.25, 0.8])])
        live = client.get("/api/v1/predictions", params={"site": "home", "limit": 3})
        while len(live.json()["data"]) < 3 or live.json()["data"][0]["seq"] != 42:
            assert time.monotonic() < deadline
            time.sleep(0.1)
            live = client.get("/api/v1/predictions", params={"site": "home", "limit": 3})
        newest = {p["seq"]: p for p in live.json()["data"]}
        assert newest[41]["motion"] is False  # under the fitted 0.5 too
        assert newest[41]["presence"] is True  # held 2 s after the motion at 40, before the fit
        assert newest[42]["motion"] is True  # 0.8: still under the site's 1.5
        assert client.get("/api/v1/aps").json()["data"][0]["motion_threshold"]["how"] == "fitted"
    with TestClient(create_app(settings)) as client:  # a restart keeps it
        service = client.app.state.service  # type: ignore[attr-defined]
        assert service.ingestor.motion_thresholds == {("home", "hall"): 0.5}
        path = "/api/v1/aps/home/hall/presence/threshold"
        for bad in (0.1, 9, "high", None):
            r = client.put(path, json={"threshold": bad}, headers=auth)
            assert r.status_code == 422 and "threshold" in r.text, bad
        assert client.put(path, json={"threshold": 2.0}).status_code == 401
        r = client.put(path, json={"threshold": 2.0}, headers=auth)
        assert r.status_code == 200 and r.json()["how"] == "set" and r.json()["fit"] is None
        assert service.ingestor.motion_thresholds == {("home", "hall"): 2.0}
        assert client.put("/api/v1/aps/home/nowhere/presence/threshold", json={
            "threshold": 2.0}, headers=auth).status_code == 404
        assert client.delete(path).status_code == 401
        assert client.delete(path, headers=auth).status_code == 204
        assert service.ingestor.motion_thresholds == {}
        assert client.get("/api/v1/aps/home/hall").json()["motion_threshold"] is None


def test_a_threshold_fit_counts_each_labelled_segment_once(tmp_path: Path) -> None:
    """Stored idle runs count once per segment inside a label (at the run's score), a segment
    under two labels once, and ``since`` leaves out what was scored before it."""
    from csi_cloud.api.facade import Cloud
    from csi_cloud.db import Label, Prediction

    settings = CloudSettings(broker=None, dev=True, token=SecretStr(TOKEN),
                             db=f"sqlite:///{tmp_path}/db.sqlite", models=MODELS,
                             recordings=tmp_path / "rec", jobs_dir=tmp_path / "jobs")
    t0 = 1_700_000_000.0

    def row(seq: int, score: float, segments: int | None = None) -> Prediction:
        return Prediction(site="home", ap="hall", epoch=1, seq=seq, timestamp=t0 + seq,
                          received=t0 + seq, model=None, rate_level=0, quality=1.0,
                          context_present=0, context_size=0, probabilities={},
                          motion_score=score, segments=segments)

    with TestClient(create_app(settings)) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        cloud = Cloud(service)
        with service.db.session.begin() as s:
            s.add_all([row(0, 0.3, segments=15), row(15, 0.1),  # still: a run of 15, then 1
                       *(row(20 + i, 1.0 + 0.01 * i) for i in range(12))])  # moving
            s.add_all([Label(site="home", ap="hall", start=t0 + 5, end=t0 + 16, activity="nm"),
                       Label(site="home", ap="hall", start=t0 + 10, end=t0 + 12,
                             activity="nm"),  # the same seconds again
                       Label(site="home", ap="hall", start=t0 + 20, end=t0 + 40,
                             activity="walking"),
                       Label(site="home", ap="hall", start=t0 + 20, end=t0 + 30,
                             identity="user1")])  # no activity: not a still or moving one
        with service.db.session() as s:
            quiet, moving, seen = cloud.labelled_motion_scores(s, "home", "hall", {"nm"})
            # The run's segments 5..14 (10, at its score 0.3) and the single row at 15.
            assert sorted(quiet) == [0.1] + [0.3] * 10
            assert len(moving) == 12 and seen == {"nm": 11, "walking": 12}
            quiet, _, seen = cloud.labelled_motion_scores(s, "home", "hall", {"nm"},
                                                          since=t0 + 8)
            assert sorted(quiet) == [0.1] + [0.3] * 7 and seen["nm"] == 8
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.post("/api/v1/aps/home/hall/presence/threshold/fit", json={},
                           headers=auth).status_code == 404  # the AP was never seen
