"""The committed Mosquitto config and generated ACL, on a real broker: every AP may only
publish its own ``seg``/``status`` and read its own ``ctl``; anonymous clients are refused."""

from __future__ import annotations

import csv
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

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "mosquitto"
PREFIX = "csi/v1"
PASSWD_TOOL = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None or not Path(PASSWD_TOOL).exists(),
    reason="needs mosquitto and mosquitto_passwd")


class Client:
    """A paho MQTT 5 client on its own thread that records connect, subscribe and messages."""

    def __init__(self, port: int, client_id: str, username: str | None = None,
                 password: str | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.granted: dict[int, list[int]] = {}
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
        self.client.connect("127.0.0.1", port, keepalive=10)
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
    return text


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[Mosquitto, dict[str, str]]]:
    """A broker with the deploy config, and the passwords make-acl.py generated."""
    folder = tmp_path / "broker"
    folder.mkdir()
    subprocess.run([sys.executable, str(DEPLOY / "make-acl.py"), "lab/ap1", "lab/ap2",
                    "--reader", "dashboard", "--acl", str(folder / "acl"), "--passwd",
                    str(folder / "passwd"), "--credentials", str(tmp_path / "cred.csv"),
                    "--mosquitto-passwd", PASSWD_TOOL], check=True)
    with (tmp_path / "cred.csv").open() as fh:
        passwords = {row["username"]: row["password"] for row in csv.DictReader(fh)}
    assert set(passwords) == {"csi-cloud", "dashboard", "lab/ap1", "lab/ap2"}
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
                                  "lab/ ap", "/ap1"])
def test_generator_refuses_names_that_are_not_one_level(name: str) -> None:
    out = subprocess.run([sys.executable, str(DEPLOY / "make-acl.py"), name],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "SITE/AP" in out.stderr


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
        # The cloud's own subscriptions are granted (shared seg, status).
        assert cloud.subscribe(f"$share/csi-cloud/{PREFIX}/+/+/seg") < 0x80
        assert cloud.subscribe(f"{PREFIX}/+/+/status") < 0x80
        assert dash.subscribe(f"{PREFIX}/+/+/pred") < 0x80
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
