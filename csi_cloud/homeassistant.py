"""Home Assistant MQTT discovery: each AP appears as a device with an occupancy and a motion
binary sensor, a motion-score sensor and a diagnostic sensor of how presence is calibrated
(``auto``, ``measuring`` or ``pinned`` on the empty room, from the AP's ``status``), on any
hardware, with or without a model (csi_edge.presence); plus, when the AP runs a bundle,
sensors of the smoothed activity ("uncertain" while the service abstains) with its
confidence and of the identity, fed by the retained ``pred`` topic, and an event entity fed
by the ``event`` topic (csi_cloud.events: each activity or presence change); all available
while the AP's ``status`` says online.

Configs are published retained under ``{discovery_prefix}/{component}/{node}/{object}/config``
(Home Assistant's documented discovery topic layout), with full (not abbreviated) keys. A
template renders ``None`` where the prediction has no value yet (the edge still calibrating):
Home Assistant's MQTT entities read that payload as "unknown", not as off.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["discovery_configs"]

# Rendered where a field is null: MQTT binary sensors and sensors take it as "unknown".
_UNKNOWN = "None"


def _node(site: str, ap: str) -> str:
    # Discovery node ids allow [a-zA-Z0-9_-] only.
    return re.sub(r"[^a-zA-Z0-9_-]", "_", f"csi_{site}_{ap}")


# The smoothed activity (csi_cloud.smoothing), "uncertain" while the filter abstains; the
# per-second label where a prediction has no smoothed one.
_ACTIVITY = ("{% set a = value_json.smoothed_activity or value_json.activity %}"
             "{{ 'uncertain' if value_json.uncertain else (a if a else '" + _UNKNOWN + "') }}")


def _on_off(field: str) -> str:
    return (f"{{{{ '{_UNKNOWN}' if value_json.{field} is none else "
            f"('ON' if value_json.{field} else 'OFF') }}}}")


def discovery_configs(prefix: str, site: str, ap: str, *, model_name: str | None = None,
                      discovery_prefix: str = "homeassistant"
                      ) -> dict[str, dict[str, Any] | None]:
    """Topic -> config payload for one AP; ``None`` removes an entity (publish an empty
    retained payload): the activity and identity sensors of an AP without a model."""
    node = _node(site, ap)
    base = f"{prefix}/{site}/{ap}"
    device = {"identifiers": [node], "name": f"CSI {site}/{ap}", "manufacturer": "csi-pipeline",
              "model": f"WiFi sensing ({model_name})" if model_name else
                       "WiFi sensing (presence only)"}
    common = {
        "state_topic": f"{base}/pred",
        "json_attributes_topic": f"{base}/pred",
        # Available while both say so: the AP's own status (its Last Will included) and the
        # cloud's verdict, which also catches an AP that went silent without a Last Will (its
        # status heartbeat overdue: a half-open link, streams sharing one connection).
        "availability": [
            {"topic": f"{base}/status", "payload_available": "online",
             "payload_not_available": "offline",
             "value_template": "{{ 'online' if value_json.online else 'offline' }}"},
            {"topic": f"{base}/availability", "payload_available": "online",
             "payload_not_available": "offline"}],
        "availability_mode": "all",
        "device": device,
    }
    configs: dict[str, dict[str, Any] | None] = {
        f"{discovery_prefix}/binary_sensor/{node}/occupancy/config": {
            **common, "name": "Occupancy", "unique_id": f"{node}_occupancy",
            "device_class": "occupancy", "value_template": _on_off("presence"),
            "payload_on": "ON", "payload_off": "OFF"},
        f"{discovery_prefix}/binary_sensor/{node}/motion/config": {
            **common, "name": "Motion", "unique_id": f"{node}_motion",
            "device_class": "motion", "value_template": _on_off("motion"),
            "payload_on": "ON", "payload_off": "OFF"},
        f"{discovery_prefix}/sensor/{node}/motion_score/config": {
            **common, "name": "Motion score", "unique_id": f"{node}_motion_score",
            "state_class": "measurement", "icon": "mdi:motion-sensor",
            "value_template": f"{{{{ '{_UNKNOWN}' if value_json.motion_score is none else "
                              "value_json.motion_score }}"},
        # How the edge calibrates presence (docs/presence.md, "Measuring the empty room"):
        # read from the AP's retained status, which says it at once when it changes.
        f"{discovery_prefix}/sensor/{node}/presence_calibration/config": {
            **common, "name": "Presence calibration", "unique_id": f"{node}_presence_calibration",
            "state_topic": f"{base}/status", "json_attributes_topic": f"{base}/status",
            "entity_category": "diagnostic", "icon": "mdi:tune-variant",
            "value_template": "{{ value_json.motion.mode if value_json.motion else '"
                              + _UNKNOWN + "' }}"},
    }
    # Each activity or presence change (presence changes exist without a model too).
    configs[f"{discovery_prefix}/event/{node}/change/config"] = {
        "name": "Activity or presence change", "unique_id": f"{node}_change",
        "state_topic": f"{base}/event", "event_types": ["activity", "presence"],
        "json_attributes_topic": f"{base}/event",
        **{k: common[k] for k in ("availability", "availability_mode", "device")},
        "icon": "mdi:timeline-clock"}
    model_entities: dict[str, dict[str, Any]] = {
        f"{discovery_prefix}/sensor/{node}/activity/config": {
            **common, "name": "Activity", "unique_id": f"{node}_activity",
            "value_template": _ACTIVITY, "icon": "mdi:run"},
        f"{discovery_prefix}/sensor/{node}/activity_confidence/config": {
            **common, "name": "Activity confidence", "unique_id": f"{node}_activity_confidence",
            "unit_of_measurement": "%", "state_class": "measurement", "icon": "mdi:gauge",
            "value_template": "{{ (value_json.smoothed_confidence * 100) | round(1) "
                              "if value_json.smoothed_confidence is number else "
                              f"'{_UNKNOWN}' }}}}"},
        f"{discovery_prefix}/sensor/{node}/identity/config": {
            **common, "name": "Identity", "unique_id": f"{node}_identity",
            "value_template": "{{ value_json.identity if value_json.identity else 'unknown' }}",
            "icon": "mdi:account"},
    }
    for topic, config in model_entities.items():
        configs[topic] = config if model_name else None
    # The presence sensor of earlier versions read presence from the activity; it goes.
    configs[f"{discovery_prefix}/binary_sensor/{node}/presence/config"] = None
    return configs
