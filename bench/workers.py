"""Cloud workers on the NATS cluster: 1, 2 and 3 workers, against one worker on Mosquitto.

Everything runs on this machine as real processes: a 3-node nats-server cluster (JetStream,
MQTT listener, streams on 3 nodes, 16 partitions), the workers (``csi cloud --bus nats://...``),
PostgreSQL (127.0.0.1:5432, shared by the workers), and a load generator publishing real wire
payloads over MQTT 3.1.1, QoS 1, one segment a second per AP (tests/_loadgen.py). The baseline
is one worker on a Mosquitto, same generator, same database.

For each layout, at the same offered load:
  - segments/s predicted, and whether every published segment was predicted exactly once;
  - latency from publish (generator clock) to the prediction on a worker's live WebSocket
    stream (sent after its batch is stored): p50, p99;
  - CPU per segment (user + system, /proc) of the workers and of the broker(s);
  - bus overhead: the workers' CPU per segment on NATS minus on Mosquitto, and the brokers'
    CPU per segment, each against one worker's CPU per segment on Mosquitto.
Then one run with failures: 3 workers; the node leading the MQTT message stream killed and
restarted, one worker killed (SIGKILL): segments lost, segments predicted twice, and how long
the killed worker's APs went without predictions. That run also has a second stream that
captures the same segments from their core subject (what a design consuming a stream of its
own would get) to count what such a stream misses of the PUBACKed segments.

The machine has 2 cores shared by all of it (3 NATS nodes, up to 3 workers, the generator,
PostgreSQL): absolute rates are this machine's; the projection at the end is labelled as such.

    python bench/workers.py            # about 8 minutes; bench/results/workers.json
    python bench/workers.py --aps 100 --seconds 15   # a short look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _broker import Mosquitto  # noqa: E402
from _cluster import Heartbeats, Worker, stored_predictions  # noqa: E402
from _nats import NatsCluster  # noqa: E402

from csi_cloud.bus import partition_of  # noqa: E402

POSTGRES = os.environ.get("CSI_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
PARTITIONS = 16


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Database:
    def __init__(self) -> None:
        import psycopg

        self.name = f"csi_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(f"{POSTGRES}/test", autocommit=True) as con:
            con.execute(f"CREATE DATABASE {self.name}")
        self.url = f"{POSTGRES.replace('postgresql://', 'postgresql+psycopg://')}/{self.name}"

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(f"{POSTGRES}/test", autocommit=True) as con:
            con.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


class LiveStreams:
    """First arrival time of each (ap, seq) on any worker's live WebSocket stream."""

    def __init__(self) -> None:
        self.arrived: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def watch(self, worker: Worker) -> None:
        ready = threading.Event()
        thread = threading.Thread(target=lambda: asyncio.run(self._listen(worker.port, ready)),
                                  daemon=True)
        thread.start()
        ready.wait(10)
        self._threads.append(thread)

    async def _listen(self, port: int, ready: threading.Event) -> None:
        import websockets

        while not self._stop.is_set():
            try:
                async with websockets.connect(f"ws://127.0.0.1:{port}/api/v1/predictions/ws",
                                              max_queue=None) as ws:
                    ready.set()
                    while not self._stop.is_set():
                        try:
                            text = await asyncio.wait_for(ws.recv(), 0.5)
                        except TimeoutError:
                            continue
                        event = json.loads(text)
                        self.arrived.setdefault((event["ap"], int(event["seq"])), time.time())
            except Exception:  # the worker was killed or restarts: listen again
                ready.set()
                await asyncio.sleep(0.5)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)


def run_generator(brokers: list[str], aps: int, seconds: float, work: Path,
                  tag: str, per_message: int = 1) -> subprocess.Popen[bytes]:
    out = work / f"sent-{tag}.json"
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_loadgen.py"), "--aps", str(aps), "--seconds",
         str(seconds), "--out", str(out), "--segments-per-message", str(per_message),
         *[a for b in brokers for a in ("--broker", b)]],
        stdout=(work / f"loadgen-{tag}.log").open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)


def summarise(tag: str, sent: list[list[Any]], live: LiveStreams, rows: list[dict[str, Any]],
              worker_cpu: float, broker_cpu: float, seconds: float,
              load: tuple[float, float]) -> dict[str, Any]:
    published = {(ap, seq): t for ap, seq, t, _, _ in sent}
    counts = Counter((r["ap"], r["seq"]) for r in rows if r["site"] == "load")
    latencies = np.array([live.arrived[k] - t for k, t in published.items()
                          if k in live.arrived]) * 1000
    # publish -> handed to a worker's ingest (the bus alone)
    first_received: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["site"] == "load":
            key = (r["ap"], r["seq"])
            first_received[key] = min(first_received.get(key, r["received"]), r["received"])
    to_worker = np.array([first_received[k] - t for k, t in published.items()
                          if k in first_received]) * 1000
    n = len(published)
    return {
        "layout": tag,
        "published": n,
        "offered_segments_per_s": round(n / seconds, 1),
        "predicted": sum(1 for k in published if counts.get(k)),
        "lost": sum(1 for k in published if not counts.get(k)),
        "predicted_twice": sum(1 for k in published if counts.get(k, 0) > 1),
        "predicted_segments_per_s": round(sum(1 for k in published if counts.get(k))
                                          / seconds, 1),
        "latency_ms": {"p50": round(float(np.percentile(latencies, 50)), 1),
                       "p99": round(float(np.percentile(latencies, 99)), 1),
                       "max": round(float(latencies.max()), 1)} if latencies.size else None,
        "live_events": len(latencies),
        "publish_to_worker_ms": {"p50": round(float(np.percentile(to_worker, 50)), 1),
                                 "p99": round(float(np.percentile(to_worker, 99)), 1)}
        if to_worker.size else None,
        "worker_cpu_ms_per_segment": round(1000 * worker_cpu / max(1, n), 3),
        "broker_cpu_ms_per_segment": round(1000 * broker_cpu / max(1, n), 3),
        # The machine's 1-minute load average before and after (other work shares it too).
        "load_average": [round(load[0], 1), round(load[1], 1)],
    }


def run_mosquitto(aps: int, seconds: float, work: Path) -> dict[str, Any]:
    db = Database()
    # No queue limits: the bench measures the workers, not the broker's back-pressure.
    broker = Mosquitto(work / "broker", extra="max_inflight_messages 1000",
                       settings={"max_queued_messages": "1000000", "max_queued_bytes": None,
                                 "autosave_interval": None})
    broker.start()
    port = broker.port
    worker = Worker("mosq-0", "mqtt", f"mqtt://127.0.0.1:{port}", db.url, work,
                    log_level="WARNING")
    live = LiveStreams()
    try:
        worker.start()
        live.watch(worker)
        cpu0, bcpu0 = cpu_s(worker.pid), cpu_s(broker.pid)
        load0 = os.getloadavg()[0]
        gen = run_generator([f"mqtt://127.0.0.1:{port}"], aps, seconds, work, "mosquitto")
        assert gen.wait(seconds + 120) == 0, (work / "loadgen-mosquitto.log").read_text()
        _drain(live, aps, seconds)
        worker_cpu, broker_cpu = cpu_s(worker.pid) - cpu0, cpu_s(broker.pid) - bcpu0
        load = (load0, os.getloadavg()[0])
        rows = stored_predictions(db.url)
    finally:
        live.close()
        worker.stop()
        broker.stop()
        db.drop()
    sent = json.loads((work / "sent-mosquitto.json").read_text())["sent"]
    return {**summarise("mosquitto, 1 worker", sent, live, rows, worker_cpu, broker_cpu,
                        seconds, load), "workers": 1}


def _drain(live: LiveStreams, aps: int, seconds: float, timeout_s: float = 30) -> None:
    total = aps * int(seconds)
    deadline = time.time() + timeout_s
    while len(live.arrived) < total and time.time() < deadline:
        time.sleep(0.3)


def run_nats(workers_n: int, aps: int, seconds: float, work: Path,
             failures: bool = False) -> dict[str, Any]:
    tag = f"nats-{workers_n}{'-failures' if failures else ''}"
    folder = work / tag
    folder.mkdir()
    db = Database()
    cluster = NatsCluster(folder / "nats", nodes=3, partitions=PARTITIONS)
    cluster.start()
    workers = [Worker(f"w{k}", cluster.url, cluster.mqtt_url(k % 3), db.url, folder,
                      log_level="INFO") for k in range(workers_n)]
    live = LiveStreams()
    extra: dict[str, Any] = {}
    try:
        for worker in workers:  # one after the other: the first creates the tables
            worker.start()
            live.watch(worker)
        if failures:
            for attempt in range(10):  # JetStream may still be settling right after start
                try:
                    asyncio.run(_contrast_stream(cluster.url, create=True))
                    break
                except Exception:
                    if attempt == 9:
                        raise
                    time.sleep(1)
        pids = [w.pid for w in workers]
        npids = [p.pid for p in cluster.procs if p is not None]
        # What the cluster and the workers cost with no segments (pull requests, heartbeats,
        # the cluster's own housekeeping), per second.
        idle0 = [cpu_s(p) for p in pids], [cpu_s(p) for p in npids]
        time.sleep(10)
        idle_workers = sum(cpu_s(p) - c for p, c in zip(pids, idle0[0], strict=True)) / 10
        idle_brokers = sum(cpu_s(p) - c for p, c in zip(npids, idle0[1], strict=True)) / 10
        cpu0 = [cpu_s(p) for p in pids]
        ncpu0 = [cpu_s(p) for p in npids]
        t_load = time.time()
        load0 = os.getloadavg()[0]
        with Heartbeats(cluster.url) as beats:
            gen = run_generator([cluster.mqtt_url(k) for k in range(3)], aps, seconds, folder,
                                tag)
            if failures:
                extra = _failures(cluster, workers, beats, seconds, aps)
            assert gen.wait(seconds + 180) == 0, (folder / f"loadgen-{tag}.log").read_text()
            _drain(live, aps, seconds, timeout_s=60)
            held = beats.held()
        worker_cpu = sum(cpu_s(p) - c for p, c in zip(pids, cpu0, strict=True))
        broker_cpu = sum(cpu_s(p) - c for p, c in zip(npids, ncpu0, strict=True))
        span = time.time() - t_load
        load = (load0, os.getloadavg()[0])
        time.sleep(2)
        rows = stored_predictions(db.url)
        if failures:
            sent_now = json.loads((folder / f"sent-{tag}.json").read_text())["sent"]
            acked = {(ap, seq) for ap, seq, _, puback, _ in sent_now if puback}
            captured = asyncio.run(_contrast_stream(cluster.url, create=False))
            extra["own_stream_from_core_subject"] = {
                "pubacked": len(acked),
                "missing_of_pubacked": len(acked - captured),
                "note": "a stream capturing csi.v1.seg.> (the core subject) on the same "
                        "cluster: what it lacks of the segments the edges got a PUBACK for"}
    finally:
        live.close()
        for worker in workers:
            worker.stop()
        cluster.stop()
        db.drop()
    sent = json.loads((folder / f"sent-{tag}.json").read_text())["sent"]
    label = f"nats cluster (3 nodes), {workers_n} worker{'s' if workers_n > 1 else ''}"
    if failures:
        label += ", node and worker killed"
    result = summarise(label, sent, live, rows, worker_cpu, broker_cpu, seconds, load)
    n = max(1, result["published"])
    result["idle_cores"] = {"workers": round(idle_workers, 3), "brokers": round(idle_brokers, 3)}
    # Above what they cost idle: the part that grows with the segment rate.
    result["marginal_worker_cpu_ms_per_segment"] = round(
        1000 * max(0.0, worker_cpu - idle_workers * span) / n, 3)
    result["marginal_broker_cpu_ms_per_segment"] = round(
        1000 * max(0.0, broker_cpu - idle_brokers * span) / n, 3)
    if failures:  # CPU of killed and restarted processes is not all counted: leave it out
        for key in ("worker_cpu_ms_per_segment", "broker_cpu_ms_per_segment",
                    "marginal_worker_cpu_ms_per_segment", "marginal_broker_cpu_ms_per_segment"):
            result.pop(key)
        result.update(extra)
        killed = extra.get("worker_killed_at")
        moved = {f"ap{k}" for k in range(aps)
                 if partition_of("load", f"ap{k}", PARTITIONS) in extra.get("its_partitions", [])}
        first: dict[str, float] = {}
        for r in rows:
            if r["ap"] in moved and killed and r["received"] > killed:
                first[r["ap"]] = min(first.get(r["ap"], r["received"]), r["received"])
        gaps = [t - killed for t in first.values()] if killed else []
        result["failover_s"] = {"max": round(max(gaps), 2), "median": round(
            float(np.median(gaps)), 2), "aps": len(gaps)} if gaps else None
    return {**result, "workers": workers_n, "partitions_held": held}


def _failures(cluster: NatsCluster, workers: list[Worker], beats: Heartbeats, seconds: float,
              aps: int) -> dict[str, Any]:
    t0 = time.time()
    victim = cluster.stream_leader()
    out: dict[str, Any] = {"killed_node_led_the_mqtt_message_stream": victim is not None}
    time.sleep(max(0.0, t0 + seconds * 0.25 - time.time()))
    if victim is not None:
        cluster.kill(victim)
    time.sleep(max(0.0, t0 + seconds * 0.45 - time.time()))
    target = workers[1]
    out["its_partitions"] = beats.held().get(target.name, [])
    out["worker_killed_at"] = time.time()
    target.stop(signal.SIGKILL)
    time.sleep(max(0.0, t0 + seconds * 0.6 - time.time()))
    if victim is not None:
        cluster.start(victim)
    time.sleep(max(0.0, t0 + seconds * 0.7 - time.time()))
    target.start()
    return out


async def _contrast_stream(servers: str, create: bool) -> set[tuple[str, int]]:
    """A stream of its own on the core segment subject (``create``), or what it holds."""
    import nats

    nc = await nats.connect(servers=servers.split(","))
    js = nc.jetstream()
    try:
        if create:
            await js.add_stream(name="CONTRAST", subjects=["csi.v1.seg.>"], num_replicas=3)
            return set()
        from nats.js.api import AckPolicy, ConsumerConfig

        # No acknowledgements: an explicit-ack consumer stops at its 1,000 pending.
        sub = await js.pull_subscribe("csi.v1.seg.>", stream="CONTRAST",
                                      config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        seen: set[tuple[str, int]] = set()
        from csi_edge.codec import decode_payload

        while True:
            try:
                msgs = await sub.fetch(2000, timeout=2)
            except Exception:
                break
            for msg in msgs:
                try:  # the workers' mapping probes are on these subjects too (empty)
                    payload = decode_payload(msg.data)
                except ValueError:
                    continue
                seen.add((msg.subject.rsplit(".", 1)[1], payload.first_seq))
        return seen
    finally:
        await nc.close()


class _AckAtOnce:
    """Takes the place of the service: acknowledges each segment as it comes."""

    def __init__(self) -> None:
        self.count = 0

    def submit(self, site: str, ap: str, payload: bytes, received: float,
               ack: Any = None) -> None:
        self.count += 1
        if ack is not None:
            ack()

    def reload_aps(self, keep: Any) -> int:
        return 0


SEGMENT_PATHS = {
    "full": "MQTT QoS 1 publish, the store on 3 nodes, the {partitions} partition consumers (3 "
            "replicas each), their acknowledgements",
    "publish_and_store": "MQTT QoS 1 publish and the store on 3 nodes only (no consumer: "
                         "nothing is delivered or acknowledged)",
    "one_replica": "the full path with the streams and consumers on one node each (gives up "
                   "surviving a node)",
}


def run_segment_path(aps: int, seconds: float, work: Path, variant: str = "full",
                     per_message: int = 1, partitions: int = PARTITIONS) -> dict[str, Any]:
    """The cluster's CPU per segment for the segment path alone (no worker: no predictions or
    statuses published back); ``variant`` (:data:`SEGMENT_PATHS`) leaves parts out to show
    where that CPU goes; ``per_message``: segments a message (rate level 2 segments grouped as
    levels 0 and 1 group theirs); ``partitions``: the stream's partition count (one consumer
    each)."""
    from csi_cloud.bus import NatsBus, SegmentSubjects

    folder = work / f"segment-path-{variant}-{per_message}-{partitions}"
    folder.mkdir()
    cluster = NatsCluster(folder / "nats", nodes=3, partitions=partitions,
                          replicas=1 if variant == "one_replica" else 3)
    cluster.start()
    sink = _AckAtOnce()

    async def run() -> float:
        import paho.mqtt.client as mqtt

        first = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="first",
                            protocol=mqtt.MQTTv311)
        first.connect("127.0.0.1", cluster.mqtt_ports[0])  # creates the MQTT streams
        first.loop_start()
        bus = None
        if variant != "publish_and_store":
            bus = NatsBus(cluster.url.split(","), sink, name="acker",
                          subjects=SegmentSubjects("csi/v1", partitions))
            await bus.start()
            while not bus.ready:
                await asyncio.sleep(0.2)
        await asyncio.sleep(3)
        pids = [p.pid for p in cluster.procs if p is not None]
        cpu0 = sum(cpu_s(p) for p in pids)
        gen = run_generator([cluster.mqtt_url(k) for k in range(3)], aps, seconds, folder,
                            "sp", per_message)
        while gen.poll() is None:
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        cpu = sum(cpu_s(p) for p in pids) - cpu0
        if bus is not None:
            await bus.close()
        first.loop_stop()
        return cpu

    try:
        cpu = asyncio.run(run())
    finally:
        cluster.stop()
    sent = json.loads((folder / "sent-sp.json").read_text())["sent"]
    acked = sum(1 for *_, puback, _ in sent if puback)
    messages = acked if variant == "publish_and_store" else sink.count
    segments = messages * per_message
    what = SEGMENT_PATHS[variant].format(partitions=partitions) + (
        f"; {per_message} segments a message" if per_message > 1 else "")
    return {"layout": f"nats cluster (3 nodes), segment path only (no worker): {variant}",
            "variant": variant, "what": what, "segments_per_message": per_message,
            "partitions": partitions, "published": acked, "messages": messages,
            "segments": segments,
            "broker_cpu_ms_per_segment": round(1000 * cpu / max(1, segments), 3),
            "load_average": [round(x, 1) for x in os.getloadavg()[:2]]}


# (variant, segments a message): where the cluster's CPU goes, and what grouping segments into
# messages, as the lowest rate levels do, does to it.
SEGMENT_PATH_RUNS = [("full", 1), ("publish_and_store", 1), ("one_replica", 1), ("full", 2),
                     ("full", 4)]


def segment_path_breakdown(aps: int, seconds: float, work: Path) -> list[dict[str, Any]]:
    out = []
    for variant, per_message in SEGMENT_PATH_RUNS:
        out.append(run_segment_path(aps, seconds, work, variant, per_message))
        print(json.dumps(out[-1]), flush=True)
    return out


def partition_sweep(counts: list[int], rounds: int, aps: int, seconds: float,
                    work: Path) -> dict[str, Any]:
    """The full segment path at each partition count, the counts alternated over ``rounds``
    (this machine's CPU figures drift between runs, so each count gets runs early and late).
    Whether fewer partitions, so more messages a consumer and a better chance for the
    server to combine Raft proposals, lower the cluster's CPU per segment."""
    runs = []
    for r in range(rounds):
        for n in counts:
            folder = work / f"round{r}"
            folder.mkdir(exist_ok=True)
            runs.append(run_segment_path(aps, seconds, folder, "full", 1, n))
            print(json.dumps(runs[-1]), flush=True)
    return {"benchmark": "segment path of the NATS cluster at several partition counts",
            "command": " ".join(["python", *sys.argv]),
            "load": {"aps": aps, "segment_per_s_per_ap": 1, "seconds": seconds,
                     "segments_per_message": 1},
            "note": "delivered: messages the consumers handed over and acknowledged by the "
                    "time the generator had stopped for 2 s; published: PUBACKed messages",
            "by_partitions": by_partitions(runs), "runs": runs}


def by_partitions(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Segment-path runs grouped by partition count, in the order the counts first ran: each
    run's cluster CPU per delivered segment, their median, and delivered of published."""
    out: dict[str, dict[str, Any]] = {}
    for n in dict.fromkeys(r["partitions"] for r in runs):
        mine = [r for r in runs if r["partitions"] == n]
        cpu = [r["broker_cpu_ms_per_segment"] for r in mine]
        out[str(n)] = {"cpu_ms_per_segment": cpu,
                       "median_cpu_ms_per_segment": round(float(np.median(cpu)), 3),
                       "delivered_of_published": [[r["messages"], r["published"]]
                                                  for r in mine]}
    return out


def projection(baseline: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    three = next(r for r in runs if r["workers"] == 3 and "failover_s" not in r)
    worker_ms = three["worker_cpu_ms_per_segment"]  # all workers' CPU per segment
    broker_ms = three["marginal_broker_cpu_ms_per_segment"]
    per_core = 1000 / worker_ms
    return {
        "label": "PROJECTION from the per-segment costs measured here, not a measurement",
        "worker_segments_per_s_per_core": round(per_core),
        "nats_cluster_segments_per_s_per_core": round(1000 / broker_ms),
        "nats_cluster_idle_cores": three["idle_cores"]["brokers"],
        "how": "segments/s = workers x cores per worker x worker_segments_per_s_per_core, as "
               "long as the NATS cluster has (segments/s / nats_cluster_segments_per_s_per_core)"
               " cores across its 3 nodes and each worker holds at least one partition "
               f"({PARTITIONS} partitions: at most {PARTITIONS} busy workers; raise "
               "bus_partitions and the servers' mapping together past that)",
        "examples": [{"workers": w, "cores_per_worker": 2,
                      "segments_per_s": round(w * 2 * per_core),
                      "aps_at_1_segment_per_s": round(w * 2 * per_core),
                      "nats_cores_needed": round(w * 2 * per_core * broker_ms / 1000
                                                 + three["idle_cores"]["brokers"], 1),
                      "partitions_per_worker": round(PARTITIONS / w, 1)}
                     for w in (3, 8, 16)],
        "baseline_worker_cpu_ms_per_segment_on_mosquitto":
            baseline["worker_cpu_ms_per_segment"],
    }


DOC = ROOT / "docs" / "scaling.md"
_BEGIN, _END = "<!-- bench/workers.py: begin -->", "<!-- bench/workers.py: end -->"


def render_doc_table(summary: dict[str, Any]) -> str:
    """The measured figures as docs/scaling.md shows them (written by this script; a test
    keeps the doc equal to bench/results/workers.json)."""
    def ms(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = ["| layout | segments/s predicted | lost | twice | p50 / p99 latency (ms) | "
             "of which publish to worker, p50 / p99 (ms) | workers' CPU ms/segment | "
             "broker CPU ms/segment (marginal) | load average |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in [summary["baseline"], *summary["nats"]]:
        lat = r["latency_ms"] or {}
        bus = r.get("publish_to_worker_ms") or {}
        marginal = r.get("marginal_broker_cpu_ms_per_segment")
        lines.append(
            f"| {r['layout']} | {r['predicted_segments_per_s']} of "
            f"{r['offered_segments_per_s']} | {r['lost']} | {r['predicted_twice']} | "
            f"{lat.get('p50', '-')} / {lat.get('p99', '-')} | "
            f"{bus.get('p50', '-')} / {bus.get('p99', '-')} | "
            f"{ms(r['worker_cpu_ms_per_segment'])} | {ms(r['broker_cpu_ms_per_segment'])}"
            + (f" ({ms(marginal)})" if marginal is not None else "")
            + f" | {r['load_average'][0]}-{r['load_average'][1]} |")
    f = summary["failures"]
    own = f.get("own_stream_from_core_subject") or {}
    failover = f.get("failover_s") or {}
    lat = f["latency_ms"] or {}
    lines += ["", "| with failures (3 workers) | value |", "|---|---|",
              f"| segments published / predicted | {f['published']} / {f['predicted']} |",
              f"| lost / predicted twice | {f['lost']} / {f['predicted_twice']} |",
              f"| killed worker's APs predicted again after (s), median / max | "
              f"{failover.get('median', '-')} / {failover.get('max', '-')} |",
              f"| p50 / p99 latency over the whole run (ms) | {lat.get('p50', '-')} / "
              f"{lat.get('p99', '-')} |",
              f"| a stream of its own on the core subject: PUBACKed segments it lacks | "
              f"{own.get('missing_of_pubacked', '-')} of {own.get('pubacked', '-')} |"]
    paths = summary.get("segment_path_breakdown") or [summary["segment_path_only"]]
    rerun = summary.get("segment_path_command")
    lines += ["", "The segment path alone (no worker, so no predictions or statuses published "
              "back), the cluster's CPU per segment"
              + (f" (rerun alone: `{rerun}`)" if rerun else "") + ":", "",
              "| segment path | cluster CPU ms/segment | segments | load average |",
              "|---|---|---|---|"]
    for path in paths:
        what = path.get("what", "MQTT QoS 1 publish, the store on 3 nodes, the partition "
                                "consumers, their acknowledgements")
        load = path.get("load_average")
        lines.append(f"| {what} | {ms(path['broker_cpu_ms_per_segment'])} | "
                     f"{path['segments']} | "
                     + (f"{load[0]}-{load[1]}" if load else "-") + " |")
    overhead = summary["bus_overhead"][0]
    lines += ["", f"Bus overhead, one worker, same load: the worker's CPU per segment on NATS "
              f"minus on Mosquitto = {overhead['worker_side_ms_per_segment']:.2f} ms "
              f"({100 * overhead['worker_side_vs_worker_cpu']:.0f} % of the worker's CPU per "
              f"segment); the NATS cluster's CPU per segment (3 nodes, marginal) = "
              f"{overhead['brokers_marginal_ms_per_segment']:.2f} ms "
              f"({100 * overhead['brokers_marginal_vs_worker_cpu']:.0f} % of it), Mosquitto's "
              f"= {overhead['mosquitto_ms_per_segment']:.2f} ms."]
    return "\n".join(lines)


def write_doc(summary: dict[str, Any]) -> None:
    text = DOC.read_text()
    if _BEGIN not in text or _END not in text:
        return
    head, rest = text.split(_BEGIN, 1)
    _, tail = rest.split(_END, 1)
    DOC.write_text(f"{head}{_BEGIN}\n{render_doc_table(summary)}\n{_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--aps", type=int, default=300, help="APs at 1 segment/s")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "workers.json")
    parser.add_argument("--only-segment-path", action="store_true",
                        help="rerun only the segment path breakdown and replace it in --out")
    parser.add_argument("--partition-sweep", default="",
                        help="e.g. 16,4,1: only the full segment path at these partition "
                             "counts, alternated over --rounds, into "
                             "bench/results/workers_partitions.json")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.partition_sweep:
        counts = [int(n) for n in args.partition_sweep.split(",")]
        with tempfile.TemporaryDirectory(prefix="csi-bench-workers-") as tmp:
            sweep = partition_sweep(counts, args.rounds, args.aps, args.seconds, Path(tmp))
        out = ROOT / "bench" / "results" / "workers_partitions.json"
        out.write_text(json.dumps(sweep, indent=2) + "\n")
        print(json.dumps(sweep["by_partitions"], indent=1))
        print(f"wrote {out}")
        return
    if args.only_segment_path:
        summary = json.loads(args.out.read_text())
        with tempfile.TemporaryDirectory(prefix="csi-bench-workers-") as tmp:
            paths = segment_path_breakdown(args.aps, args.seconds, Path(tmp))
        summary["segment_path_only"] = paths[0]
        summary["segment_path_breakdown"] = paths
        summary["segment_path_command"] = " ".join(["python", *sys.argv])
        _write(summary, args.out)
        return
    with tempfile.TemporaryDirectory(prefix="csi-bench-workers-") as tmp:
        work = Path(tmp)
        baseline = run_mosquitto(args.aps, args.seconds, work)
        print(json.dumps(baseline), flush=True)
        runs = []
        for n in (1, 2, 3):
            runs.append(run_nats(n, args.aps, args.seconds, work))
            print(json.dumps(runs[-1]), flush=True)
        failures = run_nats(3, args.aps, args.seconds * 2, work, failures=True)
        print(json.dumps(failures), flush=True)
        segment_paths = segment_path_breakdown(args.aps, args.seconds, work)
    base_worker = baseline["worker_cpu_ms_per_segment"]
    overhead = []
    for r in runs:
        extra_worker = r["worker_cpu_ms_per_segment"] - base_worker
        overhead.append({
            "workers": r["workers"],
            "worker_side_ms_per_segment": round(extra_worker, 3),
            "worker_side_vs_worker_cpu": round(extra_worker / base_worker, 3),
            "brokers_ms_per_segment": r["broker_cpu_ms_per_segment"],
            "brokers_marginal_ms_per_segment": r["marginal_broker_cpu_ms_per_segment"],
            "brokers_marginal_vs_worker_cpu": round(r["marginal_broker_cpu_ms_per_segment"]
                                                    / base_worker, 3),
            "brokers_vs_worker_cpu": round(r["broker_cpu_ms_per_segment"] / base_worker, 3),
            "mosquitto_ms_per_segment": baseline["broker_cpu_ms_per_segment"],
            "brokers_extra_vs_mosquitto_vs_worker_cpu": round(
                (r["broker_cpu_ms_per_segment"] - baseline["broker_cpu_ms_per_segment"])
                / base_worker, 3)})
    summary = {
        "benchmark": "cloud workers on a 3-node NATS JetStream cluster vs one worker on "
                     "Mosquitto",
        "command": " ".join(["python", *sys.argv]),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "note": "2 cores shared by 3 NATS nodes, the workers, the load generator "
                            "and PostgreSQL"},
        "load": {"aps": args.aps, "segment_per_s_per_ap": 1, "seconds": args.seconds,
                 "payload": "real wire payloads (Fition samples, rate level 2), MQTT 3.1.1 "
                            "QoS 1"},
        "targets": {"lost": 0, "predicted_twice": 0, "failover_s": 10,
                    "bus_overhead_vs_worker_cpu": 0.2},
        "baseline": baseline,
        "nats": runs,
        "failures": failures,
        "segment_path_only": segment_paths[0],
        "segment_path_breakdown": segment_paths,
        "bus_overhead": overhead,
        "projection": projection(baseline, runs),
    }
    _write(summary, args.out)


def _write(summary: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    if out == ROOT / "bench" / "results" / "workers.json":
        write_doc(summary)
        print(f"updated {DOC}")


if __name__ == "__main__":
    main()
