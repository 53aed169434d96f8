"""Settings of the cloud service: command line > ``CSI_CLOUD_*`` environment > config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from csi_edge.settings import BrokerAddress, FileConfiguredSettings, topic_name

from .smoothing import DEFAULT_SETTLE_S

__all__ = ["PLACEHOLDER_TOKEN", "CloudSettings", "load_settings"]

PLACEHOLDER_TOKEN = "change-me"


class CloudSettings(FileConfiguredSettings):
    """Everything one cloud worker can be told."""

    model_config = SettingsConfigDict(env_prefix="CSI_CLOUD_", extra="forbid")

    models: Path = Field(default=Path("models"), description="folder of model bundles; every "
                                                             "bundle in it is served")
    default_model: str | None = Field(default=None, description="bundle name or id announced "
                                                                "as active [first by name]")
    broker: str | None = Field(default="mqtt://127.0.0.1:1883",
                               description="mqtt[s]://[user:pass@]host:port; empty: no MQTT")
    mqtt_username: str | None = Field(default=None, description="MQTT user (overrides the URL's)")
    mqtt_password: SecretStr | None = Field(default=None, description="MQTT password")
    ca_file: Path | None = Field(default=None, description="CA bundle for mqtts://")
    prefix: str = Field(default="csi/v1", description="topic prefix")
    share_group: str = Field(default="csi-cloud", description="MQTT 5 shared subscription group "
                                                              "(with shared_subscription)")
    shared_subscription: bool = Field(
        default=False,
        description="subscribe to segments through $share/{share_group}/... (advanced; off by "
                    "default: Mosquitto does not restore shared subscriptions after a restart, "
                    "so edges reconnecting first lose their backlog, and a stale member of the "
                    "group takes its share of segments; scale out with bus=nats://)")
    mqtt_protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT version")
    homeassistant: bool = Field(default=True, description="publish Home Assistant MQTT "
                                                          "discovery configs for each AP")
    homeassistant_prefix: str = Field(default="homeassistant", description="discovery prefix")
    sites: list[str] = Field(default_factory=list, description="handle only these sites' "
                                                               "segments (sharding workers by "
                                                               "site); empty: every site")
    client_id: str = Field(default="csi-cloud-1", description="MQTT client id; a stable id keeps "
                                                              "the session across restarts")
    mqtt_receive_maximum: int = Field(default=1024, ge=16, le=65_535, description="segment "
                                      "messages received but not yet stored, per worker "
                                      "(MQTT; the rest waits in the broker)")
    session_expiry_s: int = Field(default=86_400, ge=0, description="broker keeps the session "
                                                                    "(and queued QoS 1) this long")
    http: str = Field(default="127.0.0.1:8000", description="HOST:PORT to serve HTTP on")
    public_url: str | None = Field(default=None, description="base URL edges use to reach this "
                                                            "service (model downloads) "
                                                            "[http://HOST:PORT]")
    db: str = Field(default="sqlite:///csi-cloud.db", description="SQLAlchemy URL (sqlite:///"
                                                                   "FILE or postgresql+psycopg://"
                                                                   "...)")
    recordings: Path = Field(default=Path("recordings"), description="HDF5 recordings per AP")
    record: bool = Field(default=True, description="record received segments to HDF5")
    record_reconstruction: bool = Field(default=True, description="also store the "
                                                                  "reconstructed CSI amplitude")
    recording_max_bytes: int = Field(default=256 * 2**20, ge=2**16, description="rotate a "
                                                                             "recording file "
                                                                             "beyond this size")
    recording_flush_s: float = Field(default=2.0, ge=0, description="commit recordings at "
                                                                    "most this often (a crash "
                                                                    "loses up to this much)")
    recording_max_s: float = Field(default=3600.0, gt=0, description="rotate a recording file "
                                                                    "after this long")
    token: SecretStr = Field(default=SecretStr(PLACEHOLDER_TOKEN),
                             description="bearer token for write endpoints")
    dev: bool = Field(default=False, description="allow the placeholder token")
    batch_max_segments: int = Field(default=512, ge=1, description="messages per ingest batch")
    batch_max_wait_ms: float = Field(default=10.0, ge=0, description="longest a message waits "
                                                                     "for its batch to fill")
    store_retry_max_s: float = Field(default=2.0, gt=0, le=30, description="longest wait "
                                     "between tries to store a batch while the database is "
                                     "unavailable (bounds the recovery time once it is back)")
    store_attempts: int = Field(default=4, ge=1, le=20, description="tries to store a batch "
                                "the database refuses (not an outage: a bad value) before its "
                                "messages are dead-lettered")
    db_timeout_s: float = Field(default=10.0, gt=0, le=300, description="longest wait for a "
                                "database lock or connection (a locked SQLite file, an "
                                "unreachable server); then the operation is retried")
    api_db_pool_size: int = Field(default=5, ge=1, le=100, description="database connections "
                                  "kept for the HTTP API (its own pool: reads cannot take "
                                  "ingest's connections)")
    api_db_max_overflow: int = Field(default=5, ge=0, le=100, description="extra database "
                                     "connections the HTTP API may open under load")
    api_db_pool_timeout_s: float = Field(default=2.0, gt=0, le=60, description="a request "
                                         "waiting longer for a database connection is answered "
                                         "503 with Retry-After")
    status_timeout_s: float = Field(default=10.0, gt=0, le=300, description="longest a status "
                                    "message's database write may take before it is given up "
                                    "(logged and counted; ingest goes on)")
    max_aps: int = Field(default=10_000, ge=1, description="access points tracked at most; "
                         "segments of further ones are rejected (too_many_aps)")
    live_lengths: bool = Field(default=True, description="the live activity reads the "
                               "context lengths its bundle was calibrated with (follows "
                               "changes; 2.7-4x the classifier's CPU of the full window "
                               "alone, bench/results/live_cpu.json); off: the full window only")
    max_payload_bytes: int = Field(default=16_384, ge=64, description="larger MQTT payloads "
                                                                      "are rejected")
    max_upload_bytes: int = Field(default=64 * 2**20, ge=1024, description="largest recording "
                                                                          "upload (POST /predict)")
    max_request_bytes: int = Field(default=1 * 2**20, ge=1024, description="JSON request bodies")
    offline_after_s: float = Field(default=30.0, gt=0, description="an AP whose status is "
                                   "this long overdue counts as offline (due: the "
                                   "status_interval_s its last status gave)")
    presence_threshold: float = Field(
        default=1.5, gt=0, allow_inf_nan=False,
        description="motion score (log2 of the segment's CSI variability over the AP's quiet "
                    "reference, docs/presence.md) at and above which a segment is motion, at "
                    "sensitivity 1")
    presence_sensitivity: float = Field(
        default=1.0, gt=0, le=100, allow_inf_nan=False,
        description="divides the motion threshold: 2 flags half as much variability as motion, "
                    "0.5 twice as much")
    presence_hold_s: float = Field(
        default=30.0, ge=0, allow_inf_nan=False,
        description="an AP stays occupied this long after its last motion segment")
    events_settle_s: float = Field(
        default=DEFAULT_SETTLE_S, ge=0, le=60, allow_inf_nan=False,
        description="activity events are given this late, each second's label settled on the "
                    "seconds after it (docs/trust.md); 0: as the live label, at once")
    jobs_dir: Path = Field(default=Path("jobs"), description="training job work folders")
    datasets: dict[str, Path] = Field(default_factory=dict,
                                      description="registered dataset folders by name")
    # -- the scale-out bus (csi_cloud.bus, docs/scaling.md) --
    bus: str = Field(default="mqtt", description="where segments come from: mqtt (the broker's "
                                                 "seg topics) or nats://[user:pass@]HOST:PORT"
                                                 "[,nats://...] (a NATS JetStream cluster, "
                                                 "partitioned by AP over the workers)")
    bus_partitions: int = Field(default=16, ge=1, le=1024, description="partitions of the "
                                                                       "segment subjects (nats "
                                                                       "bus): the servers' "
                                                                       "mapping must use it")
    bus_pin_ttl_s: float = Field(default=6.0, ge=3.0, le=300, description="a worker that stops "
                                                                          "pulling loses its "
                                                                          "partitions after "
                                                                          "this long (nats bus)")
    bus_ack_wait_s: float = Field(default=5.0, gt=0, description="a segment not stored this "
                                                                 "long after delivery is "
                                                                 "delivered again; below "
                                                                 "bus_pin_ttl_s (nats bus)")
    bus_max_inflight: int = Field(default=2048, ge=16, description="segments received but not "
                                                                   "yet stored, per worker "
                                                                   "(nats bus)")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        for level in value.split("/"):
            topic_name(level, "topic prefix level")
        return value

    @field_validator("sites")
    @classmethod
    def _sites(cls, value: list[str]) -> list[str]:
        return [topic_name(site, "site") for site in value]

    @field_validator("bus")
    @classmethod
    def _bus(cls, value: str) -> str:
        if value == "mqtt":
            return value
        for url in value.split(","):
            parts = urlsplit(url.strip())
            if parts.scheme not in ("nats", "tls") or not parts.hostname:
                raise ValueError(f"bus {value!r}: {url.strip()!r} is not nats://HOST:PORT (or "
                                 "tls://); the bus is mqtt or a list of NATS servers")
        return value

    @model_validator(mode="after")
    def _nats_bus(self) -> CloudSettings:
        if self.bus == "mqtt":
            return self
        if not self.broker:
            raise ValueError("bus nats:// needs broker= (the cluster's MQTT listener: status, "
                             "ctl and predictions flow over it)")
        if self.sites:
            raise ValueError(f"sites {self.sites!r}: sharding by site is for bus=mqtt; the "
                             "nats bus partitions APs over the workers by itself")
        if self.bus_ack_wait_s >= self.bus_pin_ttl_s:
            raise ValueError(f"bus_ack_wait_s {self.bus_ack_wait_s} must be below "
                             f"bus_pin_ttl_s {self.bus_pin_ttl_s}")
        if "mqtt_protocol" not in self.model_fields_set:
            self.mqtt_protocol = "3.1.1"  # the NATS MQTT listener speaks 3.1.1 only
        elif self.mqtt_protocol != "3.1.1":
            raise ValueError(f"mqtt_protocol {self.mqtt_protocol!r}: the NATS server's MQTT "
                             "listener speaks 3.1.1 only")
        return self

    def bus_servers(self) -> list[str] | None:
        """The NATS servers of the bus, or None for MQTT."""
        if self.bus == "mqtt":
            return None
        return [url.strip() for url in self.bus.split(",")]

    @field_validator("http")
    @classmethod
    def _http(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"http {value!r} is not HOST:PORT")
        return value

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.http_host if self.http_host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.http_port}"

    @property
    def http_host(self) -> str:
        return self.http.rpartition(":")[0]

    @property
    def http_port(self) -> int:
        return int(self.http.rpartition(":")[2])

    def broker_address(self) -> BrokerAddress | None:
        if not self.broker:
            return None
        address = BrokerAddress.parse(self.broker)
        updates: dict[str, Any] = {}
        if self.mqtt_username:
            updates["username"] = self.mqtt_username
        if self.mqtt_password:
            updates["password"] = self.mqtt_password.get_secret_value()
        return address.model_copy(update=updates)

    def check_token(self) -> None:
        """Refuse the placeholder token outside dev mode."""
        value = self.token.get_secret_value()
        if not self.dev and (value == PLACEHOLDER_TOKEN or len(value) < 16):
            raise ValueError("set CSI_CLOUD_TOKEN to a secret of at least 16 characters (the "
                             f"placeholder {PLACEHOLDER_TOKEN!r} is only allowed with --dev)")


def load_settings(config: Path | None = None, **overrides: Any) -> CloudSettings:
    """Settings from ``overrides`` (None = not given), the environment, then ``config``."""
    return CloudSettings.load(config, **overrides)
