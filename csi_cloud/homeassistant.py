"""Home Assistant MQTT discovery: each AP appears as a device with an activity sensor, an
identity sensor and a presence binary sensor, fed by the retained ``pred`` topic and available
while the AP's ``status`` says online.

Configs are published retained under ``{discovery_prefix}/{component}/{node}/{object}/config``
(Home Assistant's documented discovery topic layout), with full (not abbreviated) keys.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["discovery_configs"]


def _node(site: str, ap: str) -> str:
    # Discovery node ids allow [a-zA-Z0-9_-] only.
    return re.sub(r"[^a-zA-Z0-9_-]", "_", f"csi_{site}_{ap}")


def discovery_configs(prefix: str, site: str, ap: str, *, model_name: str | None = None,
                      discovery_prefix: str = "homeassistant",
                      absent_activities: tuple[str, ...] = ("empty",)
                      ) -> dict[str, dict[str, Any]]:
    """Topic -> config payload for one AP."""
    node = _node(site, ap)
    base = f"{prefix}/{site}/{ap}"
    device = {"identifiers": [node], "name": f"CSI {site}/{ap}", "manufacturer": "csi-pipeline",
              "model": f"WiFi sensing ({model_name})" if model_name else "WiFi sensing"}
    common = {
        "state_topic": f"{base}/pred",
        "json_attributes_topic": f"{base}/pred",
        "availability_topic": f"{base}/status",
        "availability_template": "{{ 'online' if value_json.online else 'offline' }}",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
    }
    absent = ", ".join(repr(a) for a in absent_activities)
    return {
        f"{discovery_prefix}/sensor/{node}/activity/config": {
            **common, "name": "Activity", "unique_id": f"{node}_activity",
            "value_template": "{{ value_json.activity }}", "icon": "mdi:run"},
        f"{discovery_prefix}/sensor/{node}/identity/config": {
            **common, "name": "Identity", "unique_id": f"{node}_identity",
            "value_template": "{{ value_json.identity if value_json.identity else 'unknown' }}",
            "icon": "mdi:account"},
        f"{discovery_prefix}/binary_sensor/{node}/presence/config": {
            **common, "name": "Presence", "unique_id": f"{node}_presence",
            "device_class": "occupancy",
            "value_template": "{{ 'OFF' if value_json.activity in [" + absent + "] else 'ON' }}",
            "payload_on": "ON", "payload_off": "OFF"},
    }
