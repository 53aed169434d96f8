"""Bytes on the wire: MQTT 5 topic aliases and the status sent on change plus a heartbeat."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _broker import Mosquitto
from _mqtt_client import Collector

from csi_edge._mqtt import AliasingClient, TopicAliases, publish_packet_bytes
from csi_edge.agent import EncoderCache, StreamAgent
from csi_edge.bundle import encode_segment_codes, payload_codes
from csi_edge.codec import decode_payload
from csi_edge.settings import EdgeSettings

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fition"
SAMPLE = ROOT / "datasets" / "samples" / "fition" / "walking_user1_rm1" / \
    "walking_user1_rm1_10.pcap"


# -- topic aliases ------------------------------------------------------------------------------


def test_a_topic_is_sent_once_then_only_its_alias() -> None:
    aliases = TopicAliases(10)
    assert aliases.use("csi/v1/lab/ap1/seg") == ("csi/v1/lab/ap1/seg", 1)
    assert aliases.use("csi/v1/lab/ap1/status") == ("csi/v1/lab/ap1/status", 2)
    assert aliases.use("csi/v1/lab/ap1/seg") == ("", 1)
    assert aliases.use("csi/v1/lab/ap1/status") == ("", 2)
    topic, properties, aliased = aliases.publish_args("csi/v1/lab/ap1/seg")
    assert (topic, properties.TopicAlias, aliased) == ("", 1, True)


def test_the_broker_maximum_is_never_exceeded() -> None:
    aliases = TopicAliases(2)
    aliases.reserve(["a/seg", "b/seg"])  # the segment topics first: they are sent most
    assert aliases.use("a/status") == ("a/status", None)
    assert aliases.publish_args("a/status") == ("a/status", None, False)
    assert aliases.use("b/seg") == ("b/seg", 2)
    assert aliases.use("a/seg") == ("a/seg", 1)
    assert aliases.use("a/seg") == ("", 1)
    assert len(aliases) == 2
    none = TopicAliases(0)  # no Topic Alias Maximum in CONNACK, or MQTT 3.1.1
    assert none.use("a/seg") == ("a/seg", None) == none.use("a/seg")


def test_a_bad_alias_maximum_is_refused_with_its_value() -> None:
    with pytest.raises(ValueError, match="70000"):
        TopicAliases(70000)


def test_packet_size_counts_the_alias_and_the_empty_topic() -> None:
    topic = "csi/v1/lab/ap1/seg"
    plain = publish_packet_bytes(topic, 60)
    assert plain == 2 + (2 + len(topic)) + 2 + 1 + 60
    assert publish_packet_bytes(topic, 60, alias=True) == plain + 3  # teaching the alias
    assert publish_packet_bytes("", 60, alias=True) == 2 + 2 + 2 + 1 + 3 + 60
    assert publish_packet_bytes(topic, 60, v5=False) == plain - 1


def test_the_client_reads_topic_alias_maximum_from_connack() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    async def check() -> tuple[int, int, int]:
        client = AliasingClient("127.0.0.1", 1, identifier="t")
        unseen = client.topic_alias_maximum
        client.connack = Properties(PacketTypes.CONNACK)
        absent = client.topic_alias_maximum
        client.connack.TopicAliasMaximum = 7
        return unseen, absent, client.topic_alias_maximum

    assert asyncio.run(check()) == (0, 0, 7)


# -- status on change, plus a heartbeat ---------------------------------------------------------


@pytest.fixture
def stream(tmp_path: Path) -> StreamAgent:
    settings = EdgeSettings(model=MODEL, source=f"file://{SAMPLE}", site="lab", ap="ap1",
                            spool_dir=tmp_path, status_heartbeat_s=300)
    return StreamAgent(settings.all_streams()[0], settings, EncoderCache())


def _sent(stream: StreamAgent, at: float) -> None:
    """As if a status had just gone out (what _publish_status records)."""
    stream._status_key_sent = stream._status_key()
    stream._status_sent_at = at


def test_no_status_without_change_until_the_heartbeat(stream: StreamAgent) -> None:
    assert stream.status_due(0.0) == "change"  # nothing published yet
    _sent(stream, 100.0)
    stream.counters.segments_sent += 5  # counters and rates wait for the heartbeat
    stream.counters.payload_bytes += 80
    stream.seq += 5
    assert stream.status_due(100.0) is None
    assert stream.status_due(399.9) is None
    assert stream.status_due(400.0) == "heartbeat"


@pytest.mark.parametrize("change", ["level", "state", "error", "problem", "epoch"])
def test_what_the_status_says_changing_sends_it_at_once(stream: StreamAgent,
                                                        change: str) -> None:
    stream.problems.report("other_transmitter", "4 frame(s) so far")
    _sent(stream, 100.0)
    if change == "level":
        stream.level = 3
    elif change == "state":
        stream.state = "source_ended"
    elif change == "error":
        stream.fail("stream failed", "boom")
    elif change == "problem":
        stream.problems.report("spool_full", "bound reached")
    else:
        stream.epoch += 1
    assert stream.status_due(100.5) == "change"
    _sent(stream, 100.5)
    assert stream.status_due(101.0) is None
    # A problem already reported is no news.
    stream.problems.report("other_transmitter", "9 frame(s) so far")
    stream.problems.report("spool_full", "bound reached")
    assert stream.status_due(101.5) == (None if change == "problem" else "change")


def test_the_status_carries_its_heartbeat(stream: StreamAgent) -> None:
    body = stream._status()
    assert body["status_interval_s"] == 300
    assert json.loads(stream.will().payload)["status_interval_s"] == 300


# -- end to end ---------------------------------------------------------------------------------


def _wire_count() -> object:
    spec = importlib.util.spec_from_file_location("wire_count", ROOT / "bench" / "wire_count.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["wire_count"] = module
    spec.loader.exec_module(module)
    return module


def _key(status: dict[str, object]) -> tuple[object, ...]:
    return (status["state"], status["model"], status["rate_level"], status["epoch"],
            status["error"], tuple(sorted(status["problems"])), status["source"])


@pytest.mark.e2e
def test_aliased_segments_arrive_and_status_goes_out_on_change_or_heartbeat(
        tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    counter = _wire_count().WireCounter(broker.port).start()  # type: ignore[attr-defined]
    collector = Collector(broker.port, ["csi/v1/lab/ap1/#"], persistent=False)
    heartbeat = 2.0
    try:
        run = subprocess.run(
            [sys.executable, "-m", "csi_edge.cli", "edge", "--model", str(MODEL), "--source",
             f"file://{SAMPLE}", "--site", "lab", "--ap", "ap1", "--level", "0", "--speed", "1",
             "--broker", counter.url, "--spool-dir", str(tmp_path / "spool"),
             "--status-heartbeat", str(heartbeat), "--log-level", "WARNING"],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
            env=dict(os.environ, CSI_EDGE_MODELS_DIR=str(tmp_path / "fetched")))
        assert run.returncode == 0, run.stderr[-2000:]
        status_topic = "csi/v1/lab/ap1/status"

        def offline() -> bool:
            return any(not json.loads(m.payload)["online"] for m in collector.on(status_topic))

        # The final (offline) status is the last message the edge sends.
        collector.wait_for(offline, timeout_s=10, what="the offline status")
        segments = sum(len(decode_payload(m.payload).segments)
                       for m in collector.on("csi/v1/lab/ap1/seg"))
        statuses = [(m.at, json.loads(m.payload)) for m in collector.on(status_topic)
                    if not m.retain]
        final = statuses[-1][1]
        assert final is not None and not final["online"]
        # Every segment the edge sent arrived under its full topic, though it was aliased.
        assert segments == final["counters"]["segments_sent"] > 5
        conns = [c for c in counter.connections if c.client_id == "csi-edge-lab-ap1"]
        assert len(conns) == 1 and conns[0].topic_alias_maximum > 0
        published = conns[0].packets["up"]
        assert conns[0].aliased_publishes == published["PUBLISH seg"] + published[
            "PUBLISH status"]
        assert published["PUBLISH status"] == len(statuses)
        # When the edge wrote each one (its own clock): what arrives passes the wire counter's
        # proxy and the collector's thread, whose delays on a busy machine are not the edge's.
        online = [(body["time"], body) for _, body in statuses if body["online"]]
        assert len(online) >= 3  # at connect, then heartbeats over a 10 s replay
        for (t0, a), (t1, b) in itertools.pairwise(online):
            # No status sooner than the heartbeat unless what it says changed; none later
            # than the heartbeat plus the check interval (1 s) and scheduling slack.
            if t1 - t0 < heartbeat - 0.3:
                assert _key(a) != _key(b), (t1 - t0, a, b)
            assert t1 - t0 < heartbeat + 2.5, (t1 - t0, a, b)
    finally:
        collector.close()
        counter.stop()
        broker.stop()


# -- wire version 2: one coder stream a message -------------------------------------------------


def _queued(stream: StreamAgent, n: int) -> tuple[list, list]:
    """``n`` queued rows of the sample at level 1, as the agent spools them, and their codes."""
    from csi_edge.preprocess import Preprocessor
    from csi_edge.readers import read_recording
    from csi_edge.spool import QueuedSegment

    encoder = stream.encoder
    assert encoder is not None
    symbols, profile = encoder.encode(
        Preprocessor(encoder.spec).process(read_recording(SAMPLE)).data[:n])
    codes = [encoder.codes(s, p, 1) for s, p in zip(symbols, profile, strict=True)]
    rows = [QueuedSegment(epoch=1, seq=i, level=1, model_id=encoder.model_id,
                          timestamp_ms=1_000 * i, quality=1.0, motion=64 + i,
                          codes=encode_segment_codes(c, encoder.manifest, encoder.tables))
            for i, c in enumerate(codes)]
    return rows, codes


def test_a_message_codes_its_queued_segments_as_one_stream(stream: StreamAgent) -> None:
    encoder = stream.encoder
    assert encoder is not None
    rows, codes = _queued(stream, 4)
    data = stream._payload(rows)
    payload = decode_payload(data)
    assert payload.version == 2 and all(s.codes == b"" for s in payload.segments)
    assert [s.motion for s in payload.segments] == [0.0, 1 / 16, 2 / 16, 3 / 16]
    for a, b in zip(codes, payload_codes(payload, encoder.manifest, encoder.tables),
                    strict=True):
        assert a.latent.tolist() == b.latent.tolist()
        assert a.profile.tolist() == b.profile.tolist()
    # Version 1 of the same rows: each segment's own stream and its length byte.
    stream.settings = stream.settings.model_copy(update={"wire_version": 1})
    old = stream._payload(rows)
    assert decode_payload(old).version == 1
    assert [s.codes for s in decode_payload(old).segments] == [r.codes for r in rows]
    assert len(data) < len(old)


def test_queued_segments_it_cannot_recode_go_out_as_version_1(stream: StreamAgent) -> None:
    rows, _ = _queued(stream, 2)
    # Segments of a bundle this process no longer holds (an earlier run's backlog).
    foreign = [dataclasses.replace(r, model_id=b"\x01\x02\x03") for r in rows]
    payload = decode_payload(stream._payload(foreign))
    assert payload.version == 1 and [s.codes for s in payload.segments] == [r.codes for r in rows]
    # A row that does not decode (a damaged spool file) does not block the queue either.
    damaged = [rows[0], dataclasses.replace(rows[1], codes=rows[1].codes + b"\x00")]
    payload = decode_payload(stream._payload(damaged))
    assert payload.version == 1 and payload.segments[1].codes == damaged[1].codes


def test_idle_messages_are_version_2_and_never_decoded(stream: StreamAgent,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle message carries no codes: nothing to decode (a bundle with profile blocks could
    not decode an empty stream), version 2 with one byte a record less."""
    import csi_edge.agent as agent

    rows, _ = _queued(stream, 2)

    def refuse(*args: object) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(agent, "decode_segment_codes", refuse)
    idle = [dataclasses.replace(r, idle=True, codes=b"") for r in rows]
    assert decode_payload(stream._payload(idle)).version == 2


def test_codes_this_run_encoded_are_coded_again_without_decoding(
        stream: StreamAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    import csi_edge.agent as agent

    rows, codes = _queued(stream, 4)
    for row, c in zip(rows, codes, strict=True):
        stream._recent_codes[(row.epoch, row.seq, row.level, row.model_id)] = (row.codes, c)

    def refuse(*args: object) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(agent, "decode_segment_codes", refuse)
    kept = stream._payload(rows)
    monkeypatch.undo()
    # A row of long ago under the same key (a reused epoch) is decoded, not taken for it.
    other = dataclasses.replace(rows[1], codes=rows[2].codes)
    mixed = decode_payload(stream._payload([rows[0], other]))
    assert payload_codes(mixed, stream.encoder.manifest, stream.encoder.tables)[1] \
        .profile.tolist() == codes[2].profile.tolist()
    stream._recent_codes.clear()
    assert kept == stream._payload(rows)  # the same bytes as decoding the queued streams
