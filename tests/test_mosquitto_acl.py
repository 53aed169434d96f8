"""The committed Mosquitto config and generated ACL, on a real broker: every AP may only
publish its own ``seg``/``status`` and read its own ``ctl``; only the cloud may publish Home
Assistant discovery; anonymous clients are refused; no credentials can take another user's
session (the broker makes the client id the user name), so the cloud's queued segments and
an AP's connection are safe from every other AP; an edge process logged in as a site user
streams all its APs over its one session."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from _broker import Mosquitto, mosquitto_binary
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "mosquitto"
PREFIX = "csi/v1"
PASSWD_TOOL = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None or not Path(PASSWD_TOOL).exists(),
    reason="needs mosquitto and mosquitto_passwd")


class Client:
    """A paho MQTT 5 client on its own thread that records connect, subscribe, messages and
    disconnects. ``session_s`` > 0: a persistent session (clean start off) kept that long."""

    def __init__(self, port: int, client_id: str, username: str | None = None,
                 password: str | None = None, session_s: int = 0) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.granted: dict[int, list[int]] = {}
        self.disconnects: list[str] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Condition()
        self.reason: int | None = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_s
        self.client.connect("127.0.0.1", port, keepalive=10, clean_start=session_s == 0,
                            properties=props)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise AssertionError(f"{client_id}: no CONNACK")

    @property
    def accepted(self) -> bool:
        return self.reason == 0

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason: mqtt.ReasonCode, properties: object) -> None:
        self.reason = int(reason.value)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: object,
                    msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason: mqtt.ReasonCode, properties: object) -> None:
        self.disconnects.append(str(reason))

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reasons: list[mqtt.ReasonCode], properties: object) -> None:
        with self._subscribed:
            self.granted[mid] = [int(r.value) for r in reasons]
            self._subscribed.notify_all()

    def subscribe(self, topic: str) -> int:
        """The broker's SUBACK reason code (< 0x80 granted)."""
        _, mid = self.client.subscribe(topic, qos=1)
        with self._subscribed:
            assert self._subscribed.wait_for(lambda: mid in self.granted, 10), "no SUBACK"
            return self.granted[mid][0]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def received(self, topic: str | None = None) -> list[tuple[str, bytes]]:
        with self._lock:
            return [m for m in self.messages if topic is None or m[0] == topic]

    def wait_for(self, topic: str, payload: bytes, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (topic, payload) in self.received():
                return
            time.sleep(0.02)
        raise AssertionError(f"{payload!r} on {topic} never arrived: {self.received()}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _config(folder: Path, port: int) -> str:
    """The committed mosquitto.conf, moved to a free port and this test's folder."""
    text = (DEPLOY / "mosquitto.conf").read_text()
    assert "\nlistener 1883\n" in text
    text = text.replace("\nlistener 1883\n", f"\nlistener {port} 127.0.0.1\n")
    text = text.replace("/mosquitto/config/", f"{folder}/").replace("/mosquitto/data/",
                                                                    f"{folder}/data/")
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not [line for line in settings if "/mosquitto/" in line]
    (folder / "data").mkdir()
    if os.geteuid() == 0:  # mosquitto started as root drops to user mosquitto: keep root here
        text += "\nuser root\n"
    # Also to a file, which mosquitto flushes line by line (its stdout to a file is buffered).
    return text + f"\nlog_dest file {folder}/broker.log\n"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[Mosquitto, dict[str, str]]]:
    """A broker with the deploy config, and the passwords make-acl.py generated."""
    folder = tmp_path / "broker"
    folder.mkdir()
    subprocess.run([sys.executable, str(DEPLOY / "make-acl.py"), "lab/ap1", "lab/ap2",
                    "--reader", "dashboard", "--site-user", "replay=demo", "--cloud-user",
                    "csi-cloud", "--cloud-user", "csi-cloud-2", "--acl", str(folder / "acl"),
                    "--passwd",
                    str(folder / "passwd"), "--credentials", str(tmp_path / "cred.csv"),
                    "--mosquitto-passwd", PASSWD_TOOL], check=True)
    with (tmp_path / "cred.csv").open() as fh:
        passwords = {row["username"]: row["password"] for row in csv.DictReader(fh)}
    assert set(passwords) == {"csi-cloud", "csi-cloud-2", "dashboard", "replay", "lab/ap1",
                              "lab/ap2"}
    assert (tmp_path / "cred.csv").stat().st_mode & 0o077 == 0
    broker = Mosquitto(folder)
    broker.config.write_text(_config(folder, broker.port))
    with broker:
        yield broker, passwords


def test_committed_acl_matches_the_generator() -> None:
    out = subprocess.run([sys.executable, str(DEPLOY / "make-acl.py"), "--aps-file",
                          str(DEPLOY / "aps.txt")], check=True, capture_output=True, text=True)
    assert out.stdout == (DEPLOY / "acl").read_text()


@pytest.mark.parametrize("name", ["lab", "lab/ap1/x", "lab/+", "lab/#", "lab/a:b", "$SYS/ap",
                                  "lab/ ap", "/ap1", "lab/..", "lab/.", "lab/_ap", "lab/a_" * 20,
                                  "lab/caf\u00e9", "lab/" + "a" * 65])
def test_generator_refuses_names_outside_the_one_rule(name: str) -> None:
    """The ACL generator applies csi_edge.names, the rule the edge, the cloud and the
    database apply (and, without the package installed, reads it from that file)."""
    from csi_edge.names import is_valid_name

    site, _, ap = name.partition("/")
    assert not (is_valid_name(site) and is_valid_name(ap))
    # The project's Python, and (where there is one) a bare system Python without csi_edge.
    pythons = [sys.executable] + (["/usr/bin/python3"] if os.access("/usr/bin/python3",
                                                                    os.X_OK) else [])
    for python in pythons:
        out = subprocess.run([python, str(DEPLOY / "make-acl.py"), name],
                             capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
        assert out.returncode == 2 and "SITE/AP" in out.stderr, (python, out.stderr)


def test_generator_accepts_what_the_rule_accepts() -> None:
    names = ["lab/ap1", "Lab-2/AP.3_x", "a/" + "b" * 64]
    out = subprocess.run([sys.executable, str(DEPLOY / "make-acl.py"), *names],
                         capture_output=True, text=True, check=True)
    for name in names:
        assert f"user {name}\n" in out.stdout


def test_only_cloud_users_publish_home_assistant_discovery() -> None:
    out = subprocess.run([sys.executable, str(DEPLOY / "make-acl.py"), "lab/ap1", "--reader",
                          "ha", "--site-user", "replay=demo", "--cloud-user", "w1",
                          "--cloud-user", "w2", "--homeassistant-prefix", "hass"],
                         capture_output=True, text=True, check=True)
    blocks = {next(line for line in b.splitlines() if line.startswith("user ")): b
              for b in out.stdout.split("\n\n") if "\nuser " in f"\n{b}"}
    for user in ("user w1", "user w2"):
        assert "topic write hass/+/+/+/config" in blocks[user]
        assert "$share" not in blocks[user]
    assert "topic read hass/+/+/+/config" in blocks["user ha"]
    writers = [u for u, b in blocks.items() if "write hass/" in b]
    assert sorted(writers) == ["user w1", "user w2"]


@pytest.mark.e2e
def test_ap_users_are_confined_to_their_own_topics(
        secured: tuple[Mosquitto, dict[str, str]]) -> None:
    broker, pw = secured
    port = broker.port
    cloud = Client(port, "csi-cloud-1", "csi-cloud", pw["csi-cloud"])
    dash = Client(port, "dash", "dashboard", pw["dashboard"])
    ap1 = Client(port, "edge-lab-ap1", "lab/ap1", pw["lab/ap1"])
    ap2 = Client(port, "edge-lab-ap2", "lab/ap2", pw["lab/ap2"])
    try:
        assert cloud.accepted and dash.accepted and ap1.accepted and ap2.accepted
        # The cloud's own subscriptions are granted (seg, status).
        assert cloud.subscribe(f"{PREFIX}/+/+/seg") < 0x80
        assert cloud.subscribe(f"{PREFIX}/+/+/status") < 0x80
        assert dash.subscribe(f"{PREFIX}/+/+/pred") < 0x80
        assert dash.subscribe(f"{PREFIX}/+/+/event") < 0x80
        assert dash.subscribe(f"{PREFIX}/+/+/availability") < 0x80
        assert ap1.subscribe(f"{PREFIX}/lab/ap1/ctl") < 0x80
        assert ap2.subscribe(f"{PREFIX}/lab/ap2/ctl") < 0x80
        # Another AP's control topic, directly or by wildcard. Mosquitto's acl_file checks
        # read access when it delivers a message, not at SUBSCRIBE (the SUBACK may grant it),
        # so what is proven below is that nothing of ap2's ever reaches ap1.
        ap1.subscribe(f"{PREFIX}/lab/ap2/ctl")
        ap1.subscribe(f"{PREFIX}/+/+/ctl")
        ap1.subscribe(f"{PREFIX}/+/+/seg")

        # ap1 impersonating ap2, or sending as the cloud: dropped by the broker. Each is
        # followed by a legitimate message on the same connection (QoS 1, in order), so once
        # that one arrives the forbidden one would have arrived before it.
        ap1.publish(f"{PREFIX}/lab/ap2/seg", b"forged-seg")
        ap1.publish(f"{PREFIX}/lab/ap2/status", b"forged-status")
        ap1.publish(f"{PREFIX}/lab/ap1/pred", b"forged-pred")
        ap1.publish(f"{PREFIX}/lab/ap1/availability", b"forged-availability")
        ap1.publish(f"{PREFIX}/lab/ap2/ctl", b"forged-ctl")
        ap1.publish(f"{PREFIX}/lab/ap1/seg", b"seg-1")
        ap1.publish(f"{PREFIX}/lab/ap1/status", b'{"online": true}')
        cloud.wait_for(f"{PREFIX}/lab/ap1/seg", b"seg-1")
        cloud.wait_for(f"{PREFIX}/lab/ap1/status", b'{"online": true}')
        ap2.publish(f"{PREFIX}/lab/ap2/seg", b"seg-2")
        cloud.wait_for(f"{PREFIX}/lab/ap2/seg", b"seg-2")
        assert [p for _, p in cloud.received()] == [b"seg-1", b'{"online": true}', b"seg-2"]

        # The cloud's commands: each AP gets exactly its own.
        cloud.publish(f"{PREFIX}/lab/ap2/ctl", b"to-ap2")
        cloud.publish(f"{PREFIX}/lab/ap1/ctl", b"to-ap1")
        cloud.publish(f"{PREFIX}/lab/ap1/pred", b"pred-1")
        ap1.wait_for(f"{PREFIX}/lab/ap1/ctl", b"to-ap1")
        ap2.wait_for(f"{PREFIX}/lab/ap2/ctl", b"to-ap2")
        dash.wait_for(f"{PREFIX}/lab/ap1/pred", b"pred-1")
        # Events and the cloud's availability verdict reach readers (Home Assistant).
        cloud.publish(f"{PREFIX}/lab/ap1/event", b"event-1")
        cloud.publish(f"{PREFIX}/lab/ap1/availability", b"offline")
        dash.wait_for(f"{PREFIX}/lab/ap1/event", b"event-1")
        dash.wait_for(f"{PREFIX}/lab/ap1/availability", b"offline")
        assert b"forged-availability" not in [p for _, p in dash.received()]
        time.sleep(0.2)
        assert b"to-ap2" not in [p for _, p in ap1.received()]
        assert b"forged-ctl" not in [p for _, p in ap2.received()]
        assert b"forged-pred" not in [p for _, p in dash.received()]
        assert b"seg-2" not in [p for _, p in ap1.received()]  # no reading others' segments
        # A read-only user cannot command APs.
        dash.publish(f"{PREFIX}/lab/ap1/ctl", b"from-dashboard")
        cloud.publish(f"{PREFIX}/lab/ap1/ctl", b"to-ap1-again")
        ap1.wait_for(f"{PREFIX}/lab/ap1/ctl", b"to-ap1-again")
        assert b"from-dashboard" not in [p for _, p in ap1.received()]
    finally:
        for client in (cloud, dash, ap1, ap2):
            client.close()


def test_anonymous_and_wrong_passwords_are_refused(
        secured: tuple[Mosquitto, dict[str, str]]) -> None:
    broker, pw = secured
    attempts = [Client(broker.port, "anon"),
                Client(broker.port, "wrong", "lab/ap1", pw["lab/ap2"]),
                Client(broker.port, "nobody", "lab/ap3", "guess")]
    try:
        for client in attempts:
            assert not client.accepted, client.reason
            assert client.reason in (0x86, 0x87)  # bad user name or password / not authorized
    finally:
        for client in attempts:
            client.close()


@pytest.mark.e2e
def test_no_credentials_can_take_another_users_session(
        secured: tuple[Mosquitto, dict[str, str]]) -> None:
    """With Mosquitto's default an AP's credentials could connect as ``csi-cloud``: the
    broker would close the cloud's connection and, with a clean start, destroy its session and
    every segment queued for it. Here the client id is the user name, whatever is asked for."""
    broker, pw = secured
    port = broker.port
    seg = f"{PREFIX}/lab/ap1/seg"
    # The cloud's persistent session, subscribed, then away (a restart): segments queue for it.
    cloud = Client(port, "csi-cloud", "csi-cloud", pw["csi-cloud"], session_s=3600)
    assert cloud.subscribe(f"{PREFIX}/+/+/seg") < 0x80
    cloud.close()
    ap1 = Client(port, "lab/ap1", "lab/ap1", pw["lab/ap1"])
    attackers: list[Client] = []
    try:
        for i in range(5):
            ap1.publish(seg, f"queued-{i}".encode())
        # Other users asking for the cloud's client id (clean start: it would wipe the queue)
        # and for ap1's; the second cloud worker's and the site user's credentials too.
        for user, wanted in (("lab/ap2", "csi-cloud"), ("lab/ap2", "lab/ap1"),
                             ("csi-cloud-2", "csi-cloud"), ("replay", "csi-cloud"),
                             ("dashboard", "lab/ap1")):
            attacker = Client(port, wanted, user, pw[user])
            assert attacker.accepted  # as itself
            attacker.publish(f"{PREFIX}/lab/ap2/status", b"{}")  # a round trip: it is in
            attacker.close()
        time.sleep(0.3)
        assert ap1.disconnects == [], "the victim AP was kicked off"
        ap1.publish(seg, b"after")
        # The cloud comes back: its session, with every queued segment, is intact.
        cloud = Client(port, "anything", "csi-cloud", pw["csi-cloud"], session_s=3600)
        cloud.wait_for(seg, b"after")
        assert [p for _, p in cloud.received(seg)] == [
            *(f"queued-{i}".encode() for i in range(5)), b"after"]
        # A live cloud connection is not taken either.
        intruder = Client(port, "csi-cloud", "lab/ap2", pw["lab/ap2"])
        attackers.append(intruder)
        ap1.publish(seg, b"live")
        cloud.wait_for(seg, b"live")
        assert cloud.disconnects == [] and intruder.accepted
    finally:
        for client in (cloud, ap1, *attackers):
            client.close()
    log = (broker.folder / "broker.log").read_text()
    for victim in ("csi-cloud", "lab/ap1"):
        assert f"Client {victim} already connected" not in log, log[-3000:]
    assert " as lab/ap2 (" in log and " as csi-cloud-2 (" in log  # each under its own name
    assert " as anything (" not in log and " as lab/ap1 (p5, c1, k10, u'lab/ap2')" not in log


@pytest.mark.e2e
def test_one_user_has_one_session(secured: tuple[Mosquitto, dict[str, str]]) -> None:
    """The other side of the rule: a second connection with the same user replaces the first
    (so one edge process per AP user, one cloud worker per cloud user)."""
    broker, pw = secured
    first = Client(broker.port, "a", "lab/ap1", pw["lab/ap1"])
    first.client.reconnect_delay_set(30, 60)  # no instant reconnect fight in this test
    second = Client(broker.port, "b", "lab/ap1", pw["lab/ap1"])
    try:
        deadline = time.monotonic() + 10
        while not first.disconnects and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.disconnects and second.disconnects == []
    finally:
        first.close()
        second.close()


@pytest.mark.e2e
def test_home_assistant_discovery_from_the_cloud_only(
        secured: tuple[Mosquitto, dict[str, str]]) -> None:
    """What the cloud really publishes for Home Assistant (csi_cloud.homeassistant) passes the
    generated ACL; a reader (Home Assistant's user) receives it; an AP cannot forge it."""
    from csi_cloud.homeassistant import discovery_configs

    broker, pw = secured
    configs = discovery_configs(PREFIX, "lab", "ap1", model_name="fition")
    cloud = Client(broker.port, "c", "csi-cloud", pw["csi-cloud"])
    hass = Client(broker.port, "h", "dashboard", pw["dashboard"])
    ap1 = Client(broker.port, "x", "lab/ap1", pw["lab/ap1"])
    try:
        assert hass.subscribe("homeassistant/#") < 0x80
        forged = next(iter(configs))
        ap1.publish(forged, b'{"name": "forged"}')
        hass.publish(forged, b'{"name": "forged by a reader"}')
        for topic, config in configs.items():
            cloud.publish(topic, json.dumps(config).encode())
        last = list(configs)[-1]
        hass.wait_for(last, json.dumps(configs[last]).encode())
        assert [t for t, _ in hass.received()] == list(configs)
        assert all(b"forged" not in p for _, p in hass.received())
    finally:
        for client in (cloud, hass, ap1):
            client.close()


@pytest.mark.e2e
def test_an_edge_logged_in_as_a_site_user_streams_every_ap_over_its_one_session(
        secured: tuple[Mosquitto, dict[str, str]], tmp_path: Path) -> None:
    """The compose demo's case: one ``csi edge`` process, several APs of the site, one user.
    Without sharing one connection the streams would take each other's session in a loop."""
    broker, pw = secured
    samples = ROOT / "datasets" / "samples" / "fition"
    files = sorted(samples.rglob("*.pcap"))[:3]
    cloud = Client(broker.port, "c", "csi-cloud", pw["csi-cloud"])
    try:
        assert cloud.subscribe(f"{PREFIX}/+/+/seg") < 0x80
        assert cloud.subscribe(f"{PREFIX}/+/+/status") < 0x80
        streams = [a for i, f in enumerate(files) for a in ("--stream", f"demo/r{i}=file://{f}")]
        env = dict(os.environ, CSI_EDGE_USERNAME="replay", CSI_EDGE_PASSWORD=pw["replay"],
                   CSI_EDGE_MODELS_DIR=str(tmp_path / "fetched"), PYTHONUNBUFFERED="1")
        out = subprocess.run(
            [sys.executable, "-m", "csi_edge.cli", "edge", "--model",
             str(ROOT / "models" / "fition"), "--broker", broker.url, "--spool-dir",
             str(tmp_path / "spool"), "--speed", "max", *streams],
            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        for i in range(len(files)):
            status = f"{PREFIX}/demo/r{i}/status"
            deadline = time.monotonic() + 10
            while not any(b'"online":false' in p for _, p in cloud.received(status)):
                assert time.monotonic() < deadline, f"r{i}: no final status"
                time.sleep(0.05)
            final = json.loads(cloud.received(status)[-1][1])
            assert final["counters"]["segments_sent"] == final["counters"]["segments_encoded"]
            assert final["counters"]["segments_sent"] >= 8
            assert len(cloud.received(f"{PREFIX}/demo/r{i}/seg")) == \
                final["counters"]["messages_sent"]
    finally:
        cloud.close()
    log = (broker.folder / "broker.log").read_text()
    assert log.count(" as replay (") == 1, log[-3000:]
    assert "already connected" not in log, log[-3000:]
