"""The HTTP API in-process (TestClient, no MQTT): upload-and-predict, payloads, auth, models,
health, limits."""

from __future__ import annotations

import base64
import contextlib
import io
import time
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import _upload_crash
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from csi_cloud.api.app import create_app
from csi_cloud.api.routes.predict import PARSER
from csi_cloud.model.compression import CloudModel
from csi_cloud.model.openset import UNKNOWN
from csi_cloud.model.window import Windows, slot_rows
from csi_cloud.settings import PLACEHOLDER_TOKEN, CloudSettings
from csi_edge import read_recording
from csi_edge.bundle import EdgeEncoder, load_manifest
from csi_edge.codec import decode_payload, encode_payload
from csi_edge.preprocess import Preprocessor, SegmentBatch
from csi_edge.rollout import fetch_bundle

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
FITION = MODELS / "fition"
WIAR = MODELS / "wiar"
PCAP = ROOT / "datasets" / "samples" / "fition" / "walking_user1_rm1" / \
    "walking_user1_rm1_10.pcap"
WIAR_DAT = ROOT / "datasets" / "samples" / "wiar" / "height_90" / "csi_a1_1.dat"
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def settings(tmp: Path, **overrides: Any) -> CloudSettings:
    values: dict[str, Any] = {
        "broker": None, "dev": True, "token": TOKEN, "db": f"sqlite:///{tmp}/db.sqlite",
        "models": MODELS, "recordings": tmp / "rec", "jobs_dir": tmp / "jobs"}
    return CloudSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tmp_path_factory.mktemp("cloud")))) as c:
        yield c


@pytest.fixture(scope="module")
def fition() -> tuple[EdgeEncoder, CloudModel, SegmentBatch]:
    edge = EdgeEncoder(FITION)
    return edge, CloudModel.load(FITION), Preprocessor(edge.spec).process(read_recording(PCAP))


def upload(client: TestClient, path: Path | None = None, *, name: str | None = None,
           data: bytes | None = None, **form: str) -> Any:
    content = path.read_bytes() if data is None and path is not None else data
    return client.post("/api/v1/predict", data=form,
                       files={"file": (name or (path.name if path else "x"), content)})


def offline_last(fition: tuple[EdgeEncoder, CloudModel, SegmentBatch],
                 level: int) -> tuple[str, str | None, np.ndarray]:
    """The last segment's activity, identity and activity probabilities as the offline path
    computes them: each segment through the int8 edge encoder and the wire format on its own,
    decompressed, classified over the last N segment slots as the live output reads them (at
    the bundle's context lengths, csi_cloud.model.lengths)."""
    edge, cloud, batch = fition
    decoded = [cloud.decompress(edge.compress(batch.data[i : i + 1], level=level, first_seq=i,
                                              epoch=1, timestamp_ms=0))[0]
               for i in range(len(batch))]
    rows = slot_rows({int(k): i for i, k in enumerate(batch.index)}, int(batch.index[-1]),
                     cloud.net.cfg.context_segments)
    pred = cloud.classify_live(Windows.gather(rows[None], np.stack([d.z_q for d in decoded]),
                                              np.stack([d.profile for d in decoded]), level))
    p_act, p_id = pred.activity, pred.identity
    labels = cloud.manifest.labels
    identity = None
    if p_id is not None:
        identity = UNKNOWN if pred.unknown[0] else labels["identity"][int(p_id[0].argmax())]
    return labels["activity"][int(p_act[0].argmax())], identity, p_act[0]


# -- upload a recording -----------------------------------------------------------------------


def test_upload_pcap_predicts_like_the_offline_path(
        client: TestClient, fition: tuple[EdgeEncoder, CloudModel, SegmentBatch]) -> None:
    edge, cloud, batch = fition
    r = upload(client, PCAP)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == edge.manifest.id and body["model_name"] == "fition"
    assert body["level"] == 1  # the default
    assert body["segments"] == len(batch) == len(body["predictions"]) > 8
    assert body["dropped"] == batch.dropped.as_dict()
    assert body["dropped"]["other_transmitter"] == 21  # as documented for this sample
    assert body["rejected"] == []
    assert body["recording"]["format"] == "nexmon-pcap" and body["recording"]["frames"] == 472
    preds = body["predictions"]
    assert [p["seq"] for p in preds] == list(range(len(batch)))
    assert {(p["site"], p["ap"]) for p in preds} == {("upload", "upload")}
    steps = np.diff([p["timestamp"] for p in preds])
    assert np.allclose(steps, edge.spec.segment_s)
    assert [p["context_present"] for p in preds] == [min(i + 1, 8) for i in range(len(preds))]
    activity, identity, p_act = offline_last(fition, 1)
    last = preds[-1]
    assert last["context_size"] == cloud.net.cfg.context_segments == 8
    assert (last["activity"], last["identity"]) == (activity, identity)
    probs = last["probabilities"]["activity"]
    assert np.allclose([probs[k] for k in cloud.manifest.labels["activity"]], p_act, atol=2e-4)
    # What an edge at level 1 sends: 2 segments per message (the bundle's choice).
    per_message = edge.manifest.level(1).segments_per_message
    assert body["payload_bytes"] > 0
    assert len(preds) // per_message <= body["payload_bytes"] // 21


def test_upload_wiar_dat_with_the_wiar_model(client: TestClient) -> None:
    wiar = load_manifest(WIAR, verify=False)
    for model in ("wiar", wiar.id[:12], wiar.id):
        r = upload(client, WIAR_DAT, model=model, level="0")
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["model"], body["model_name"], body["level"]) == (wiar.id, "wiar", 0)
        assert body["segments"] >= 8
        assert body["recording"]["format"] == "intel5300-dat"
        assert body["recording"]["antennas"] == 3
        assert {p["activity"] for p in body["predictions"]} <= set(wiar.labels["activity"])


def test_pcap_against_the_wiar_model_names_both(client: TestClient) -> None:
    r = upload(client, PCAP, model="wiar")
    assert r.status_code == 422
    detail = r.json()["detail"]
    for part in (PCAP.name, "'wiar'", "nexmon", "intel5300"):
        assert part in detail, detail


@pytest.mark.parametrize("kind", ["random", "head", "empty", "not-csi"])
def test_corrupt_dat_is_422_and_the_service_carries_on(client: TestClient, kind: str) -> None:
    real = WIAR_DAT.read_bytes()
    data = {"random": np.random.default_rng(7).bytes(20_000), "head": real[:300],
            "empty": b"", "not-csi": b"\x00\x01" * 5000}[kind]
    r = upload(client, name="broken.dat", data=data, model="wiar")
    assert r.status_code == 422, r.text
    assert "broken.dat" in r.json()["detail"]
    assert "/tmp" not in r.json()["detail"]  # the temporary path is not leaked
    assert client.get("/healthz").status_code == 200
    assert upload(client, WIAR_DAT, model="wiar").status_code == 200


def test_a_truncated_dat_keeps_its_complete_records(client: TestClient) -> None:
    real = WIAR_DAT.read_bytes()
    r = upload(client, name="cut.dat", data=real[: len(real) // 2 + 7], model="wiar")
    assert r.status_code == 200, r.text
    assert r.json()["dropped"].get("truncated_record") == 1


def test_unrecognised_upload_is_422(client: TestClient) -> None:
    r = upload(client, name="notes.txt", data=b"hello, not CSI\n" * 10)
    assert r.status_code == 422 and "unrecognised format" in r.json()["detail"]


def test_a_parser_crash_is_422_and_the_worker_is_replaced(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    crashes = PARSER.crashes
    monkeypatch.setattr(PARSER, "worker", _upload_crash.segfault)
    r = upload(client, WIAR_DAT, model="wiar")
    assert r.status_code == 422, r.text
    assert "parser process died" in r.json()["detail"]
    assert "exit code -11" in r.json()["detail"]  # SIGSEGV
    assert WIAR_DAT.name in r.json()["detail"]
    assert PARSER.crashes == crashes + 1
    assert client.get("/healthz").status_code == 200
    monkeypatch.undo()
    r = upload(client, WIAR_DAT, model="wiar")
    assert r.status_code == 200, r.text


@pytest.mark.e2e
def test_a_hanging_parser_is_stopped(client: TestClient,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PARSER, "worker", _upload_crash.hang)
    monkeypatch.setattr(PARSER, "timeout_s", 3.0)
    t0 = time.monotonic()
    r = upload(client, PCAP)
    assert r.status_code == 422 and "longer than 3 s" in r.json()["detail"]
    assert time.monotonic() - t0 < 30
    monkeypatch.undo()
    assert upload(client, PCAP).status_code == 200


@pytest.mark.parametrize(("form", "needle"), [
    ({"model": "nope"}, "no model 'nope'"),
    ({"level": "7"}, "level '7'"),
    ({"level": "one"}, "level 'one'"),
    ({"level": "\u00b2"}, "level"),  # a digit to str.isdigit, not to int()
])
def test_bad_upload_fields_are_422(client: TestClient, form: dict[str, str],
                                   needle: str) -> None:
    r = upload(client, PCAP, **form)
    assert r.status_code == 422 and needle in r.json()["detail"], r.text


def test_malformed_upload_requests(client: TestClient) -> None:
    r = client.post("/api/v1/predict", data={"model": "fition"},
                    files={"other": ("a.pcap", b"x")})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = client.post("/api/v1/predict", data={"file": "not a file"})
    assert r.status_code == 415  # urlencoded form
    r = client.post("/api/v1/predict", content=b"--x\r\n",
                    headers={"content-type": "multipart/form-data"})
    assert r.status_code == 422 and "multipart" in r.json()["detail"]
    r = client.post("/api/v1/predict", content=b"abc", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    two = [("file", ("a.pcap", PCAP.read_bytes())), ("file", ("b.pcap", b"x"))]
    assert client.post("/api/v1/predict", files=two).status_code == 422


def _multipart(name: str, data: bytes, boundary: str = "csi-test-boundary") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_uploads_over_the_limit_are_413(tmp_path: Path) -> None:
    limit = 64 * 1024
    with TestClient(create_app(settings(tmp_path, max_upload_bytes=limit))) as c:
        big = PCAP.read_bytes()[: 2 * limit]
        r = upload(c, name="big.pcap", data=big)  # Content-Length says it all
        assert r.status_code == 413 and str(limit) in r.json()["detail"]
        body, content_type = _multipart("big.pcap", big)

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            for i in range(0, len(body), 8192):
                yield body[i : i + 8192]

        r = c.post("/api/v1/predict", content=chunks(), headers={"content-type": content_type})
        assert r.status_code == 413, r.text
        r = c.post("/api/v1/predict", content=b"{" + b" " * 2 * limit + b"}",
                   headers={"content-type": "application/json"})
        assert r.status_code == 413
        # Just under the limit is fine.
        small = WIAR_DAT.read_bytes()
        assert len(small) < limit
        assert upload(c, WIAR_DAT, model="wiar").status_code == 200


# -- raw payloads -----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_payloads_are_classified_and_rejects_reported_by_index(
        client: TestClient, fition: tuple[EdgeEncoder, CloudModel, SegmentBatch]) -> None:
    edge, _, batch = fition
    level = 2
    good = [edge.compress(batch.data[i : i + 1], level=level, first_seq=i, epoch=3,
                          timestamp_ms=1_700_000_000_000 + int(batch.index[i]) * 1000)
            for i in range(len(batch))]
    sample = good[0]
    unknown = encode_payload(replace(decode_payload(sample), model_id=b"\xff\xee\xdd"))
    wrong_crc = sample[:-1] + bytes([sample[-1] ^ 0xFF])
    bad_version = bytearray(sample)
    bad_version[0] = (bad_version[0] & 0x1F) | (3 << 5)
    from csi_edge.codec import crc16
    body = bytes(bad_version[:-2])
    bad_version = body + crc16(body).to_bytes(2, "big")
    extras = {1: b"garbage", 3: sample[:-4], 4: wrong_crc, 6: unknown, 7: bad_version,
              9: b"\x00" * 40}
    payloads: list[bytes] = []
    expected: dict[int, str] = {}
    reasons = {1: "too_short", 3: "crc_mismatch", 4: "crc_mismatch", 6: "unknown_model",
               7: "bad_version", 9: "crc_mismatch"}
    queue = list(good)
    while queue:
        if len(payloads) in extras:
            expected[len(payloads)] = reasons[len(payloads)]
            payloads.append(extras[len(payloads)])
        else:
            payloads.append(queue.pop(0))
    payloads.append(good[-1])  # a duplicate of the last segment
    r = client.post("/api/v1/predict", json={"payloads": [_b64(p) for p in payloads]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert {x["index"]: x["reason"] for x in out["rejected"]} == expected
    assert all(x["detail"] for x in out["rejected"])
    assert out["segments"] == len(good) == len(out["predictions"])
    assert out["model"] == edge.manifest.id and out["level"] == level
    assert out["payload_bytes"] == sum(len(p) for p in payloads)
    counts: dict[str, int] = {}
    for reason in expected.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert out["dropped"] == {**counts, "duplicate_segment": 1}
    assert [p["seq"] for p in out["predictions"]] == list(range(len(good)))
    assert {p["epoch"] for p in out["predictions"]} == {3}
    activity, identity, _ = offline_last(fition, level)
    assert (out["predictions"][-1]["activity"], out["predictions"][-1]["identity"]) == \
        (activity, identity)


def test_payloads_all_rejected_is_still_200(client: TestClient) -> None:
    r = client.post("/api/v1/predict", json={"payloads": [_b64(b"x" * 30), ""]})
    assert r.status_code == 200
    out = r.json()
    assert out["segments"] == 0 and out["model"] is None and out["predictions"] == []
    assert [(x["index"], x["reason"]) for x in out["rejected"]] == [(0, "crc_mismatch"),
                                                                    (1, "too_short")]


def test_invalid_base64_names_the_index(client: TestClient) -> None:
    r = client.post("/api/v1/predict", json={"payloads": [_b64(b"x" * 30), "AAAA", "not*b64"]})
    assert r.status_code == 422 and "payloads[2]" in r.json()["detail"]


def test_payloads_claiming_too_many_segments_are_422(client: TestClient) -> None:
    claim = bytes(16) + b"\xff" + bytes(4)  # header byte 16: 255 segments
    r = client.post("/api/v1/predict", json={"payloads": [_b64(claim)] * 80})
    assert r.status_code == 422 and "20400 segments" in r.json()["detail"]


@pytest.mark.parametrize("body", [b"{}", b'{"payloads": []}', b'{"payloads": "AAAA"}',
                                  b"not json", b'{"payloads": ["AAAA"], "x": 1}', b"[]",
                                  b'{"payloads": [1]}'])
def test_malformed_payload_bodies_are_422(client: TestClient, body: bytes) -> None:
    r = client.post("/api/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_predict_touches_no_live_state(client: TestClient) -> None:
    assert upload(client, PCAP).status_code == 200
    service = client.app.state.service  # type: ignore[attr-defined]
    assert service.ingestor.aps == {}
    assert client.get("/api/v1/aps").json()["count"] == 0
    assert client.get("/api/v1/predictions").json()["count"] == 0


# -- auth ----------------------------------------------------------------------------------------

WRITES = [("/api/v1/aps/lab/ap1/rate", {"level": 2}), ("/api/v1/models/fition/activate", None),
          ("/api/v1/aps/lab/ap1/presence/calibration", {"empty_s": 30})]


@pytest.mark.parametrize(("path", "body"), WRITES)
def test_write_endpoints_need_the_token(client: TestClient, path: str,
                                        body: dict[str, int] | None) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
        r = client.post(path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    # The right token, but no broker to publish on.
    r = client.post(path, json=body, headers=AUTH)
    assert r.status_code == 503 and "MQTT" in r.json()["detail"], r.text


def test_failed_activation_changes_nothing(client: TestClient) -> None:
    before = [m["active"] for m in client.get("/api/v1/models").json()["data"]]
    assert client.post("/api/v1/models/wiar/activate", headers=AUTH).status_code == 503
    assert [m["active"] for m in client.get("/api/v1/models").json()["data"]] == before


def test_releasing_the_presence_calibration_needs_the_token(client: TestClient) -> None:
    path = "/api/v1/aps/lab/ap1/presence/calibration"
    assert client.delete(path).status_code == 401
    r = client.delete(path, headers=AUTH)
    assert r.status_code == 503 and "MQTT" in r.json()["detail"], r.text


@pytest.mark.parametrize("empty_s", [4, 601, "long", None])
def test_an_empty_room_measurement_of_a_bad_length_is_a_422(client: TestClient,
                                                           empty_s: object) -> None:
    r = client.post("/api/v1/aps/lab/ap1/presence/calibration", json={"empty_s": empty_s},
                    headers=AUTH)
    assert r.status_code == 422, r.text
    assert "empty_s" in r.text


def test_rate_body_is_validated_after_auth(client: TestClient) -> None:
    assert client.post("/api/v1/aps/lab/ap1/rate", json={"level": 9},
                       headers=AUTH).status_code == 422
    assert client.post("/api/v1/aps/lab/ap1/rate", json={"level": 9}).status_code in (401, 422)


def test_placeholder_token_is_refused_outside_dev(tmp_path: Path) -> None:
    for token in (PLACEHOLDER_TOKEN, "short"):
        with pytest.raises(ValueError, match="CSI_CLOUD_TOKEN"):
            create_app(settings(tmp_path, dev=False, token=token))
    create_app(settings(tmp_path, dev=False, token=TOKEN))  # a real secret is fine
    create_app(settings(tmp_path, dev=True, token=PLACEHOLDER_TOKEN))


# -- models, APs, health ------------------------------------------------------------------------


def test_models_are_listed_with_one_active(client: TestClient) -> None:
    body = client.get("/api/v1/models").json()
    names = {m["name"]: m for m in body["data"]}
    assert {"fition", "wiar"} <= set(names) and body["count"] == len(body["data"])
    assert sum(m["active"] for m in body["data"]) == 1
    assert names["fition"]["active"]  # first by name when nothing was activated
    assert names["wiar"]["input_spec"]["source_kind"] == "intel5300"
    assert names["fition"]["labels"]["activity"]
    one = client.get(f"/api/v1/models/{names['wiar']['id'][:8]}").json()
    assert one["name"] == "wiar"


def test_edge_bundle_zip_passes_the_rollout_checks(client: TestClient, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = next(m for m in client.get("/api/v1/models").json()["data"]
                 if m["name"] == "fition")
    r = client.get(f"/api/v1/models/{model['id']}/edge")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert "fition" in r.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        assert sorted(archive.namelist()) == ["bundle.json", "edge.onnx"]
        archive.extractall(tmp_path / "unzipped")
    assert load_manifest(tmp_path / "unzipped", parts=("edge",)).id == model["id"]

    class Opener:  # the edge's download, served in-process
        def open(self, request: Any, timeout: float) -> Any:
            response = client.get(request.full_url.removeprefix("http://cloud"))
            assert response.status_code == 200
            return contextlib.nullcontext(io.BytesIO(response.content))

    # The edge downloads through its own opener (it refuses redirects), not urlopen.
    monkeypatch.setattr("csi_edge.rollout._OPENER", Opener())
    folder = fetch_bundle(f"http://cloud/api/v1/models/{model['id']}/edge", model["id"],
                          tmp_path / "models")
    assert folder.name == model["id"]
    assert EdgeEncoder(folder).manifest.id == model["id"]


@pytest.mark.parametrize("path", ["/api/v1/aps/lab/nope", "/api/v1/aps/lab/nope/prediction",
                                  "/api/v1/models/nope", "/api/v1/models/nope/edge",
                                  "/api/v1/models/c63edc00/edge", "/api/v1/nothing"])
def test_unknown_things_are_404(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404, r.text


def test_activating_an_unknown_model_is_404(client: TestClient) -> None:
    assert client.post("/api/v1/models/nope/activate", headers=AUTH).status_code == 404


@pytest.mark.parametrize("prefix", ["", "/api/v1"])
def test_health_readiness_and_metrics(client: TestClient, prefix: str) -> None:
    health = client.get(f"{prefix}/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["models"] >= 2
    assert health.json()["database"] is True and health.json()["mqtt_connected"] is False
    ready = client.get(f"{prefix}/readyz")
    assert ready.status_code == 200  # no broker configured: nothing to wait for
    metrics = client.get(f"{prefix}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/")
    for name in ("csi_messages_total", "csi_ingest_queue", "csi_rejected",
                 "csi_decode_classify_seconds", "csi_idle_segments_total",
                 "csi_unknown_identities_total"):
        assert name in metrics.text


def test_json_bodies_over_max_request_bytes_are_413(client: TestClient) -> None:
    limit = client.app.state.service.settings.max_request_bytes  # type: ignore[attr-defined]
    big = b'{"level": 1' + b" " * limit + b"}"
    r = client.post("/api/v1/aps/lab/ap1/rate", content=big,
                    headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and str(limit) in r.json()["detail"]
    r = client.post("/api/v1/aps/lab/ap1/rate", content=big[:100],
                    headers={**AUTH, "content-type": "application/json",
                             "content-length": "not-a-number"})
    assert r.status_code == 413


def test_chunked_json_bodies_over_max_request_bytes_are_413(client: TestClient) -> None:
    limit = client.app.state.service.settings.max_request_bytes  # type: ignore[attr-defined]

    def chunks() -> Iterator[bytes]:
        yield b'{"level": 1'
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536
        yield b"}"

    r = client.post("/api/v1/aps/lab/ap1/rate", content=chunks(),
                    headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413



def test_nan_in_a_request_body_is_a_422_not_a_500(client: TestClient) -> None:
    r = client.post("/api/v1/aps/lab/ap1/rate", content=b'{"level": NaN}',
                    headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422
