"""A broker outage under load, on real processes, counted segment by segment.

Mosquitto (the deployment's persistence and queue settings, tests/_broker.py), the cloud
service (``csi cloud``, SQLite, a persistent NON-shared subscription) and one ``csi edge``
process replaying N APs in real time. Once every AP has predictions:

1. the cloud is frozen (SIGSTOP), so it cannot reconnect before the edges do;
2. a *probe* session (a second persistent, non-shared subscriber to every AP's segments) goes
   offline too: what the broker queues for it is what it queued for the cloud;
3. the broker stops (``graceful``: SIGTERM, it writes its state; ``crash``: SIGKILL, only the
   last autosave survives) and stays down ``outage_s``;
4. it starts again; the edges reconnect and flush their spools (seen on their status) while
   the cloud is still frozen; then ``hold_s`` more seconds of live segments queue;
5. the cloud resumes (SIGCONT) and catches up; the probe reconnects and counts its queue;
6. the edges stop (SIGTERM: they drain), and every AP's final status gives the number of
   segments it encoded in its epoch.

Lost = encoded segments without a prediction; duplicated = prediction rows beyond the first
for one (AP, epoch, sequence number).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from _broker import Mosquitto
from _harness import FOLDER as SAMPLES
from _harness import PREFIX, Cloud, Edge, stored_seqs, wait_until
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["OutageResult", "run_outage"]



@dataclass
class OutageResult:
    kind: str
    aps: int
    outage_s: float
    hold_s: float
    broker_settings: dict[str, str]
    encoded: int = 0
    predicted: int = 0
    lost: int = 0
    duplicated: int = 0
    lost_by_ap: dict[str, int] = field(default_factory=dict)
    edges_reconnected_first: bool = False
    edges_flushed_before_cloud: bool = False
    probe_queued_messages: int = 0
    probe_queued_payload_bytes: int = 0
    broker_rss_before_kb: int | None = None
    broker_rss_queued_kb: int | None = None
    recovery_s: float | None = None
    edge_exit: int | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Probe:
    """A persistent (clean start off), non-shared subscriber to every AP's segments."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = self._connect()

    def _connect(self) -> mqtt.Client:
        self._ready.clear()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="outage-probe",
                             protocol=mqtt.MQTTv5)
        client.on_message = self._on_message
        client.on_subscribe = lambda *a: self._ready.set()
        client.on_connect = lambda c, u, f, rc, p: (c.subscribe(f"{PREFIX}/+/+/seg", qos=1)
                                                    if not f.session_present
                                                    else self._ready.set())
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        client.connect("127.0.0.1", self.port, keepalive=10, clean_start=False,
                       properties=props)
        client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("probe did not connect")
        return client

    def _on_message(self, client: mqtt.Client, userdata: object,
                    msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def leave(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def come_back(self) -> None:
        with self._lock:
            self.messages.clear()
        self.client = self._connect()

    def settle(self, quiet_s: float = 2.0, timeout_s: float = 60.0) -> list[tuple[str, bytes]]:
        """Messages received until none came for ``quiet_s``."""
        deadline = time.monotonic() + timeout_s
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            with self._lock:
                n = len(self.messages)
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                break
            time.sleep(0.1)
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class _Statuses:
    """Every AP's status messages, as they arrive (a clean session)."""

    def __init__(self, port: int) -> None:
        self.by_ap: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="outage-status",
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = lambda c, *a: c.subscribe(f"{PREFIX}/+/+/status", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("status listener did not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: object,
                    msg: mqtt.MQTTMessage) -> None:
        site, ap = msg.topic.split("/")[-3:-1]
        try:
            status = json.loads(msg.payload)
        except ValueError:
            return
        with self._lock:
            self.by_ap.setdefault(f"{site}/{ap}", []).append((time.monotonic(), status))

    def since(self, t: float) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            return {ap: [s for at, s in items if at >= t] for ap, items in self.by_ap.items()}

    def last(self, ap: str) -> dict[str, Any]:
        with self._lock:
            return self.by_ap[ap][-1][1]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _rss_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_outage(folder: Path, *, kind: str = "graceful", aps: int = 24, outage_s: float = 30.0,
               hold_s: float = 5.0, level: int = 1,
               broker_settings: dict[str, str | None] | None = None,
               settle_s: float = 0.0,
               crash_after_cloud_s: float | None = None) -> OutageResult:
    """Run the scenario of the module docstring in ``folder``; the counts.

    ``settle_s``: the outage starts at least that long after the cloud came up (longer than
    the autosave interval: the cloud's session is on disk when the broker crashes).
    ``crash_after_cloud_s``: instead, the outage starts that long after the cloud came up,
    predictions or not (shorter than the autosave interval: its session is not on disk yet).
    """
    folder.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(folder / "broker", settings=broker_settings,
                       extra=f"log_dest file {folder / 'broker' / 'broker-file.log'}\n")
    result = OutageResult(kind, aps, outage_s, hold_s, dict(broker.settings))
    if crash_after_cloud_s is not None:
        result.notes.append(f"broker stopped {crash_after_cloud_s:g} s after the cloud came up")
    files = sorted(SAMPLES.rglob("*.pcap"))
    broker.start()
    probe = _Probe(broker.port)
    statuses = _Statuses(broker.port)
    cloud = Cloud(broker, f"sqlite:///{folder / 'cloud.db'}", folder, "csi-cloud-outage",
                  recordings=folder / "rec", log_level="WARNING",
                  env={"CSI_CLOUD_SHARED_SUBSCRIPTION": "false", "CSI_CLOUD_RECORD": "false"})
    names = [f"b{i % 4}/ap{i}" for i in range(aps)]
    edge = Edge(broker, folder, [(n, files[i % len(files)]) for i, n in enumerate(names)],
                spool=folder / "spool", level=level, status_interval_s=2, idle=True)

    def alive() -> None:
        cloud.check()
        edge.check()

    try:
        cloud.start(90)
        cloud_up = time.monotonic()
        edge.start()
        base = cloud.url

        if crash_after_cloud_s is None:
            def predicted_everywhere() -> bool:
                rows = httpx.get(f"{base}/api/v1/aps", timeout=5).json()["data"]
                have = {f"{r['site']}/{r['ap']}" for r in rows if r.get("prediction")}
                return set(names) <= have

            wait_until(predicted_everywhere, 120, "predictions from every AP", alive)
            time.sleep(max(0.0, cloud_up + settle_s - time.monotonic()))
        else:
            time.sleep(max(0.0, cloud_up + crash_after_cloud_s - time.monotonic()))
        probe.leave()
        cloud.freeze()
        result.broker_rss_before_kb = _rss_kb(broker.pid)
        if kind == "crash":
            broker.kill()
        else:
            broker.stop()
        time.sleep(outage_s)
        broker.start()
        up_at = time.monotonic()

        def flushed() -> bool:  # every edge reconnected and its backlog is out
            recent = statuses.since(up_at)
            return all(any(s["online"] and s["counters"]["reconnects"] >= 1
                           and s["counters"]["segments_buffered"] <= 4 for s in recent.get(n, []))
                       for n in names)

        wait_until(flushed, 120, "the edges to flush their spools", alive)
        result.edges_flushed_before_cloud = True
        time.sleep(hold_s)
        result.broker_rss_queued_kb = _rss_kb(broker.pid)
        resumed = time.monotonic()
        cloud.thaw()
        probe.come_back()

        # Who reconnected first: the broker's own log.
        wait_until(lambda: " as csi-cloud-outage (" in (
            folder / "broker" / "broker-file.log").read_text(errors="replace").split(
            "mosquitto version")[-1], 60, "the cloud to reconnect", alive)
        after = (folder / "broker" / "broker-file.log").read_text(
            errors="replace").split("mosquitto version")[-1]
        cloud_at = after.index(" as csi-cloud-outage (")
        edge_ats = [after.find(f" as csi-edge-{n.replace('/', '-')} (") for n in names]
        result.edges_reconnected_first = all(0 <= at < cloud_at for at in edge_ats)

        time.sleep(3)  # live traffic once the cloud is back: part of the scenario
        result.edge_exit = edge.stop(90)
        try:  # the final statuses may still be on their way to the listener
            wait_until(lambda: all(not statuses.last(n)["online"] for n in names), 15,
                       "every AP's final status")
        except AssertionError as exc:
            result.notes.append(str(exc))
        finals = {n: statuses.last(n) for n in names}
        for n, status in finals.items():
            if status["online"] or status["counters"]["segments_buffered"]:
                result.notes.append(f"{n}: final status {status['state']} with "
                                    f"{status['counters']['segments_buffered']} queued")
        expected = {n: (finals[n]["epoch"], finals[n]["next_seq"]) for n in names}
        result.encoded = sum(seq for _, seq in expected.values())

        def predictions(n: str) -> list[int]:
            """The segments of the AP's epoch its stored predictions stand for (a row of an
            idle run stands for several)."""
            site, ap = n.split("/")
            page = httpx.get(f"{base}/api/v1/predictions", timeout=20,
                             params={"site": site, "ap": ap, "limit": 10_000}).json()
            return stored_seqs((r["seq"], r["segments"]) for r in page["data"]
                               if r["epoch"] == expected[n][0])

        def caught_up() -> bool:
            return all(len(set(predictions(n))) >= expected[n][1] for n in names)

        try:
            wait_until(caught_up, 120, "the cloud to predict every segment", alive)
        except AssertionError as exc:
            result.notes.append(str(exc))
        result.recovery_s = round(time.monotonic() - resumed, 1)
        for n in names:
            counts = Counter(predictions(n))
            missing = set(range(expected[n][1])) - set(counts)
            result.lost_by_ap[n] = len(missing)
            result.lost += len(missing)
            result.duplicated += sum(c - 1 for c in counts.values())
            result.predicted += len(counts)

        queued = probe.settle()
        result.probe_queued_messages = len(queued)
        result.probe_queued_payload_bytes = sum(len(p) for _, p in queued)
        return result
    finally:
        edge.stop(30)
        cloud.stop()
        probe.close()
        statuses.close()
        broker.stop()
