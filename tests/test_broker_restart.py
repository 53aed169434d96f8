"""A broker restart loses no segment, whatever the reconnect order (real processes).

The broker's side of it: persistence on, so the cloud's persistent (non-shared) session, its
subscription and what is queued for it survive a restart; and a queue bounded in bytes, not
in Mosquitto's default 1000 messages, so a backlog flushed by 20+ edges while the cloud is
away is kept, not silently dropped. bench/broker_restart.py measures the same scenario
with a crash (SIGKILL) and with the default queue limit.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from _broker import Mosquitto, mosquitto_binary
from _outage import run_outage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "broker_restart.json"


def render_table(runs: dict[str, Any]) -> str:
    """The rows docs/deployment.md shows for bench/results/broker_restart.json."""
    rows = []
    for name, r in runs.items():
        if "encoded" not in r:
            continue
        stop = "SIGTERM" if r["kind"] == "graceful" else "SIGKILL"
        if any("after the cloud came up" in n for n in r["notes"]):
            note = next(n for n in r["notes"] if "after the cloud came up" in n)
            stop += ", " + note.removeprefix("broker stopped ")
        rows.append(f"| `{name}` | {stop} | {r['outage_s']:g} s | {r['hold_s']:g} s | "
                    f"{r['encoded']} | {r['predicted']} | {r['lost']} | {r['duplicated']} |")
    return "\n".join(rows)


def render_memory(runs: dict[str, Any]) -> str:
    m = runs["queue_memory"]
    return (f"Each queued message of {m['payload_bytes']} B (the mean at level 1) cost the "
            f"broker {m['rss_growth_bytes_per_message']} B of memory and "
            f"{m['persistence_bytes_per_message']} B of persistence file (`queue_memory`, "
            f"{m['messages']} messages; the clean stop that wrote them took "
            f"{m['clean_stop_s']:g} s).")


def test_deployment_doc_quotes_the_measured_numbers() -> None:
    runs = json.loads(RESULTS.read_text())["runs"]
    doc = (ROOT / "docs" / "deployment.md").read_text()
    assert render_table(runs) in doc, "re-render the table from bench/results"
    assert render_memory(runs) in doc
    assert runs["graceful"]["lost"] == runs["graceful"]["duplicated"] == 0
    assert runs["queue_deployed"]["lost"] == 0 and runs["queue_default_1000"]["lost"] > 0
    assert all(r.get("edges_reconnected_first", True) for r in runs.values())


@pytest.mark.e2e
@pytest.mark.skipif(mosquitto_binary() is None, reason="needs mosquitto")
def test_broker_stopped_30_s_under_20_streams_edges_first_loses_nothing(
        tmp_path: Path) -> None:
    result = run_outage(tmp_path, kind="graceful", aps=20, outage_s=30.0, hold_s=5.0)
    assert result.edges_flushed_before_cloud and result.edges_reconnected_first, result
    assert result.edge_exit == 0 and not result.notes, result.notes
    assert result.encoded >= 20 * 30, result.encoded
    assert result.lost == 0, result.lost_by_ap
    assert result.duplicated == 0
    assert result.predicted == result.encoded
    # What the broker held for an offline session across the restart: the edges' backlog.
    assert result.probe_queued_messages > 20


def _offline_session(port: int, client_id: str) -> None:
    """A persistent session subscribed to every AP's segments, then disconnected."""
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, *a: c.subscribe("csi/v1/+/+/seg", qos=1)
    client.on_subscribe = lambda *a: done.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    client.loop_start()
    assert done.wait(10)
    client.disconnect()
    client.loop_stop()


def _queued_for(port: int, client_id: str, quiet_s: float = 3.0) -> int:
    """How many messages the broker kept for the session: every one delivered once it has
    connected, until none came for ``quiet_s`` (counted from the first, which may take a busy
    machine a while)."""
    got: list[bytes] = []
    connected = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.on_connect = lambda *a: connected.set()
    client.on_message = lambda c, u, m: got.append(m.payload)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    client.loop_start()
    assert connected.wait(30), "no CONNACK"
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    last, since = -1, time.monotonic()
    while time.monotonic() - since < quiet_s:
        if len(got) != last:
            last, since = len(got), time.monotonic()
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    return len(got)


@pytest.mark.e2e
@pytest.mark.skipif(mosquitto_binary() is None, reason="needs mosquitto")
@pytest.mark.parametrize("limits", ["deployed", "mosquitto default"])
def test_an_offline_session_keeps_a_24_ap_backlog(tmp_path: Path, limits: str) -> None:
    """3,000 segment messages of 60 B (24 APs, ~4 min at level 1) while the cloud is away,
    across a restart: Mosquitto's default keeps 1,000 and drops the rest without a word; the
    deployed byte limit keeps them all."""
    settings: dict[str, str | None] = {}
    if limits != "deployed":
        settings = {"max_queued_messages": None, "max_queued_bytes": None}
    broker = Mosquitto(tmp_path / "broker", settings=settings)
    with broker:
        _offline_session(broker.port, "cloud")
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="aps",
                                protocol=mqtt.MQTTv5)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        payload = b"\x01" * 60
        for start in range(0, 3000, 200):
            infos = [publisher.publish(f"csi/v1/site/ap{i % 24}/seg", payload, qos=1)
                     for i in range(start, start + 200)]
            for info in infos:
                info.wait_for_publish(10)  # every one acknowledged by the broker
        publisher.disconnect()
        publisher.loop_stop()
        broker.stop()
        broker.start()
        queued = _queued_for(broker.port, "cloud")
    if limits == "deployed":
        assert queued == 3000
    else:
        assert queued == 1000  # 2,000 acknowledged to the APs, then dropped
