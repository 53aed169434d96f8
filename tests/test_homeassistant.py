"""Home Assistant MQTT discovery against a real broker: configs that parse as HA's documented
schema, states rendered from the real ``pred`` payloads, availability following the AP; the
occupancy and motion entities of csi_edge.presence, with or without a model."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import jinja2
import pytest
from _broker import Mosquitto
from _harness import FOLDER, MODEL, Cloud, run_edge
from _mqtt_client import Collector

from csi_cloud.homeassistant import discovery_configs
from csi_edge.bundle import load_manifest

TOPIC = re.compile(r"^homeassistant/(sensor|binary_sensor|event)/([a-zA-Z0-9_-]+)/([a-zA-Z0-9_-]+)"
                   r"/config$")
# Keys Home Assistant's MQTT discovery documents for these platforms (full names), and the
# ones every entity here must carry.
ALLOWED = {"name", "unique_id", "state_topic", "value_template", "json_attributes_topic",
           "availability", "availability_mode", "device", "icon", "device_class", "payload_on",
           "payload_off", "state_class", "unit_of_measurement", "event_types", "entity_category"}
REQUIRED = {"name", "unique_id", "state_topic", "availability", "availability_mode", "device"}
# Home Assistant's MQTT entities read this rendered payload as "unknown".
UNKNOWN = "None"


def available(config: dict, status: bytes, verdict: bytes | None) -> str:
    """What Home Assistant makes of the entity's availability (mode ``all``: available only
    while the AP's status and the cloud's verdict both say so)."""
    assert config["availability_mode"] == "all"
    states = []
    for item in config["availability"]:
        if item["topic"] == "csi/v1/home/living/status":
            states.append(render(item["value_template"], status))
        else:
            assert item["topic"] == "csi/v1/home/living/availability"
            states.append((verdict or b"").decode())
        assert states[-1] in (item["payload_available"], item["payload_not_available"])
    return "online" if all(s == "online" for s in states) else "offline"


def cloud_says(ha: Collector) -> bytes | None:
    """The cloud's latest retained verdict on the AP."""
    seen = ha.on("csi/v1/home/living/availability")
    return seen[-1].payload if seen else None


def render(template: str, payload: bytes) -> str:
    return jinja2.Environment().from_string(template).render(value_json=json.loads(payload))


def _pred(**fields: object) -> bytes:
    base = {"activity": None, "identity": None, "presence": None, "motion": None,
            "motion_score": None}
    return json.dumps({**base, **fields}).encode()


def test_configs_follow_the_documented_schema() -> None:
    configs = discovery_configs("csi/v1", "lab", "ap 1/x", model_name="fition")
    entities = {t: c for t, c in configs.items() if c is not None}
    assert len(entities) == 8
    uids = set()
    classes = {}
    for topic, config in entities.items():
        match = TOPIC.match(topic)
        assert match, topic
        assert set(config) <= ALLOWED, config
        assert set(config) >= REQUIRED, config
        # A sensor renders a state; an event entity takes the payload's event_type.
        assert ("value_template" in config) == (match.group(1) != "event"), config
        assert config["device"]["identifiers"] == [match.group(2)]
        uids.add(config["unique_id"])
        classes[match.group(3)] = (match.group(1), config.get("device_class"))
    assert len(uids) == 8
    assert classes == {"occupancy": ("binary_sensor", "occupancy"),
                       "motion": ("binary_sensor", "motion"),
                       "motion_score": ("sensor", None), "activity": ("sensor", None),
                       "presence_calibration": ("sensor", None),
                       "activity_confidence": ("sensor", None), "identity": ("sensor", None),
                       "change": ("event", None)}
    assert entities["homeassistant/event/csi_lab_ap_1_x/change/config"]["state_topic"] == \
        "csi/v1/lab/ap 1/x/event"
    # The presence sensor of earlier versions (a template waiting for an "empty" activity no
    # model has) is removed: an empty retained payload.
    removed = [t for t, c in configs.items() if c is None]
    assert removed == ["homeassistant/binary_sensor/csi_lab_ap_1_x/presence/config"]


def test_templates_render_on_off_and_unknown() -> None:
    configs = discovery_configs("csi/v1", "lab", "ap1", model_name="fition")
    occupancy = configs["homeassistant/binary_sensor/csi_lab_ap1/occupancy/config"]
    motion = configs["homeassistant/binary_sensor/csi_lab_ap1/motion/config"]
    score = configs["homeassistant/sensor/csi_lab_ap1/motion_score/config"]
    activity = configs["homeassistant/sensor/csi_lab_ap1/activity/config"]
    assert occupancy is not None and motion is not None and score is not None
    assert activity is not None
    for value, state in ((True, "ON"), (False, "OFF"), (None, UNKNOWN)):
        assert render(occupancy["value_template"], _pred(presence=value)) == state
        assert render(motion["value_template"], _pred(motion=value)) == state
    assert render(score["value_template"], _pred(motion_score=2.5)) == "2.5"
    assert render(score["value_template"], _pred(motion_score=0.0)) == "0.0"
    assert render(score["value_template"], _pred()) == UNKNOWN
    assert render(activity["value_template"], _pred(activity="walking")) == "walking"
    assert render(activity["value_template"], _pred()) == UNKNOWN
    # The smoothed activity wins over the per-second one, and abstention shows.
    assert render(activity["value_template"], _pred(activity="walking",
                                                    smoothed_activity="sitdown",
                                                    uncertain=False)) == "sitdown"
    assert render(activity["value_template"], _pred(activity="walking",
                                                    smoothed_activity="sitdown",
                                                    uncertain=True)) == "uncertain"
    calibration = configs["homeassistant/sensor/csi_lab_ap1/presence_calibration/config"]
    assert calibration is not None
    for motion, state in (({"mode": "pinned"}, "pinned"), ({"mode": "measuring"}, "measuring"),
                          (None, UNKNOWN)):
        assert render(calibration["value_template"],
                      json.dumps({"online": True, "motion": motion}).encode()) == state
    confidence = configs["homeassistant/sensor/csi_lab_ap1/activity_confidence/config"]
    assert confidence is not None
    assert render(confidence["value_template"], _pred(smoothed_confidence=0.91234)) == "91.2"
    assert render(confidence["value_template"], _pred(smoothed_confidence=None)) == UNKNOWN


def test_an_ap_without_a_model_has_presence_entities_only() -> None:
    configs = discovery_configs("csi/v1", "home", "hall", model_name=None)
    entities = {t for t, c in configs.items() if c is not None}
    assert entities == {"homeassistant/binary_sensor/csi_home_hall/occupancy/config",
                        "homeassistant/binary_sensor/csi_home_hall/motion/config",
                        "homeassistant/sensor/csi_home_hall/motion_score/config",
                        "homeassistant/sensor/csi_home_hall/presence_calibration/config",
                        "homeassistant/event/csi_home_hall/change/config"}
    # Activity and identity (an AP that ran a model before) are removed.
    assert configs["homeassistant/sensor/csi_home_hall/activity/config"] is None
    assert configs["homeassistant/sensor/csi_home_hall/identity/config"] is None
    device = configs["homeassistant/sensor/csi_home_hall/motion_score/config"]["device"]  # type: ignore[index]
    assert device["model"] == "WiFi sensing (presence only)"


@pytest.mark.e2e
def test_discovery_with_a_live_ap(broker: Mosquitto, tmp_path: Path) -> None:
    cloud = Cloud(broker, f"sqlite:///{tmp_path / 'c.db'}", tmp_path)
    cloud.start()
    ha = Collector(broker.port, ["homeassistant/#", "csi/v1/+/+/pred", "csi/v1/+/+/status",
                                 "csi/v1/+/+/event", "csi/v1/+/+/availability"],
                   client_id="home-assistant", persistent=False)
    edge = run_edge(broker, tmp_path / "spool", "--source", f"file://{FOLDER}", "--site", "home",
                    "--ap", "living", "--speed", "5", "--level", "2")
    labels = load_manifest(MODEL).labels
    try:
        ha.wait_for(lambda: len([m for m in ha.messages if m.topic.startswith(
            "homeassistant/") and m.payload]) >= 8, 30, "eight discovery configs")
        ha.wait_for(lambda: ha.on("csi/v1/home/living/pred"), 30, "a prediction")
        ha.wait_for(lambda: cloud_says(ha) == b"online", 30, "the cloud's online verdict")
        ha.wait_for(lambda: ha.on("csi/v1/home/living/event"), 30, "an activity event")
        configs = {m.topic: json.loads(m.payload) for m in ha.messages
                   if m.topic.startswith("homeassistant/") and m.payload}
        pred = ha.on("csi/v1/home/living/pred")[-1].payload
        status = [m for m in ha.messages if m.topic == "csi/v1/home/living/status"][-1].payload
        for topic, config in configs.items():
            kind = TOPIC.match(topic).group(1)  # type: ignore[union-attr]
            assert available(config, status, cloud_says(ha)) == "online"
            if kind == "event":
                assert config["state_topic"] == "csi/v1/home/living/event"
                for message in ha.on("csi/v1/home/living/event"):
                    event = json.loads(message.payload)
                    assert event["event_type"] in config["event_types"]
                    assert not message.retain
                continue
            if config["unique_id"].endswith("presence_calibration"):
                assert config["state_topic"] == "csi/v1/home/living/status"
                assert config["entity_category"] == "diagnostic"
                assert render(config["value_template"], status) == "auto"
                continue
            assert config["state_topic"] == "csi/v1/home/living/pred"
            state = render(config["value_template"], pred)
            if kind == "binary_sensor":
                assert state in (config["payload_on"], config["payload_off"], UNKNOWN)
            elif config["unique_id"].endswith("activity"):
                assert state in [*labels["activity"], "uncertain"]
            elif config["unique_id"].endswith("activity_confidence"):
                assert 0 <= float(state) <= 100
            elif config["unique_id"].endswith("motion_score"):
                assert state == UNKNOWN or float(state) == json.loads(pred)["motion_score"]
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
    ha.wait_for(lambda: cloud_says(ha) == b"offline", 20, "the cloud's offline verdict")
    for config in configs.values():
        assert available(config, status, b"online") == "offline"
        assert available(config, b'{"online": true}', b"offline") == "offline"
    ha.close()
    # A Home Assistant starting later gets the configs: they are retained.
    late = Collector(broker.port, ["homeassistant/#"], client_id="ha-late", persistent=False)
    try:
        late.wait_for(lambda: len(late.messages) >= 8, 10, "retained configs")
        assert all(m.retain for m in late.messages)
        assert not any(m.topic.endswith("/presence/config") for m in late.messages)
    finally:
        late.close()
        cloud.stop()
