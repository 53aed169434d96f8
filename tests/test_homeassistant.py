"""Home Assistant MQTT discovery against a real broker: configs that parse as HA's documented
schema, states rendered from the real ``pred`` payloads, availability following the AP."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import jinja2
import pytest
from _broker import Mosquitto
from _mqtt_client import Collector
from test_cloud_service import FOLDER, MODEL, Cloud, run_edge

from csi_cloud.homeassistant import discovery_configs
from csi_edge.bundle import load_manifest

TOPIC = re.compile(r"^homeassistant/(sensor|binary_sensor)/([a-zA-Z0-9_-]+)/([a-zA-Z0-9_-]+)"
                   r"/config$")
# Keys Home Assistant's MQTT discovery documents for these platforms (full names), and the
# ones every entity here must carry.
ALLOWED = {"name", "unique_id", "state_topic", "value_template", "json_attributes_topic",
           "availability_topic", "availability_template", "payload_available",
           "payload_not_available", "device", "icon", "device_class", "payload_on",
           "payload_off"}
REQUIRED = {"name", "unique_id", "state_topic", "value_template", "availability_topic",
            "device"}


def render(template: str, payload: bytes) -> str:
    return jinja2.Environment().from_string(template).render(value_json=json.loads(payload))


def test_configs_follow_the_documented_schema() -> None:
    configs = discovery_configs("csi/v1", "lab", "ap 1/x", model_name="fition")
    assert len(configs) == 3
    uids = set()
    for topic, config in configs.items():
        match = TOPIC.match(topic)
        assert match, topic
        assert set(config) <= ALLOWED, config
        assert set(config) >= REQUIRED, config
        assert config["device"]["identifiers"] == [match.group(2)]
        uids.add(config["unique_id"])
        if match.group(1) == "binary_sensor":
            assert config["device_class"] == "occupancy"
    assert len(uids) == 3


@pytest.mark.e2e
def test_discovery_with_a_live_ap(broker: Mosquitto, tmp_path: Path) -> None:
    cloud = Cloud(broker, f"sqlite:///{tmp_path / 'c.db'}", tmp_path)
    cloud.start()
    ha = Collector(broker.port, ["homeassistant/#", "csi/v1/+/+/pred", "csi/v1/+/+/status"],
                   client_id="home-assistant", persistent=False)
    edge = run_edge(broker, tmp_path / "spool", "--source", f"file://{FOLDER}", "--site", "home",
                    "--ap", "living", "--speed", "5", "--level", "2")
    labels = load_manifest(MODEL).labels
    try:
        ha.wait_for(lambda: len([m for m in ha.messages if m.topic.startswith(
            "homeassistant/")]) >= 3, 30, "three discovery configs")
        ha.wait_for(lambda: ha.on("csi/v1/home/living/pred"), 30, "a prediction")
        configs = {m.topic: json.loads(m.payload) for m in ha.messages
                   if m.topic.startswith("homeassistant/")}
        pred = ha.on("csi/v1/home/living/pred")[-1].payload
        status = [m for m in ha.messages if m.topic == "csi/v1/home/living/status"][-1].payload
        for topic, config in configs.items():
            kind = TOPIC.match(topic).group(1)  # type: ignore[union-attr]
            assert config["state_topic"] == "csi/v1/home/living/pred"
            assert config["availability_topic"] == "csi/v1/home/living/status"
            assert render(config["availability_template"], status) == "online"
            state = render(config["value_template"], pred)
            if kind == "binary_sensor":
                assert state in (config["payload_on"], config["payload_off"])
            elif config["unique_id"].endswith("activity"):
                assert state in labels["activity"]
            else:
                assert state in [*(labels["identity"] or []), "unknown"]
    finally:
        edge.send_signal(signal.SIGINT)
        edge.communicate(timeout=20)
    # Offline: the AP's status (the same topic HA watches) now renders unavailable.
    ha.wait_for(lambda: not json.loads([m for m in ha.messages if m.topic ==
                                        "csi/v1/home/living/status"][-1].payload)["online"],
                20, "the offline status")
    status = [m for m in ha.messages if m.topic == "csi/v1/home/living/status"][-1].payload
    for config in configs.values():
        assert render(config["availability_template"], status) == "offline"
    ha.close()
    # A Home Assistant starting later gets the configs: they are retained.
    late = Collector(broker.port, ["homeassistant/#"], client_id="ha-late", persistent=False)
    try:
        late.wait_for(lambda: len(late.messages) >= 3, 10, "retained configs")
        assert all(m.retain for m in late.messages)
    finally:
        late.close()
        cloud.stop()
