"""Settings of the edge agent: command line > ``CSI_EDGE_*`` environment > config file.

A config file (TOML or JSON, ``--config``) may list several streams, one per access point::

    broker = "mqtt://broker.local:1883"
    model = "models/fition"

    [[streams]]
    site = "lab"
    ap = "ap1"
    source = "nexmon-udp://0.0.0.0:5500"

    [[streams]]
    site = "lab"
    ap = "ap2"
    source = "file:///data/fition?loop=1"

Nested environment variables use ``__``: ``CSI_EDGE_STREAMS='[{"site": ...}]'`` (JSON).
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .names import check_name

__all__ = [
    "BrokerAddress",
    "EdgeSettings",
    "FileConfiguredSettings",
    "StreamSettings",
    "load_settings",
    "topic_name",
]

_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config", default=None)


def topic_name(value: str, what: str) -> str:
    """Check that ``value`` can be one MQTT topic level: a name (:mod:`csi_edge.names`)."""
    return check_name(value, what)


class BrokerAddress(BaseModel):
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://`` for TLS."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker {url!r}: scheme {parts.scheme!r} is not mqtt:// or mqtts://")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ValueError(f"broker {url!r}: bad port ({exc})") from exc
        if not parts.hostname:
            raise ValueError(f"broker {url!r} has no host")
        return cls(host=parts.hostname, port=port, tls=tls,
                   username=unquote(parts.username) if parts.username else None,
                   password=unquote(parts.password) if parts.password else None)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class StreamSettings(BaseModel):
    """One access point's stream: where its CSI comes from and under which topics it goes."""

    model_config = ConfigDict(extra="forbid")

    site: str
    ap: str
    source: str = Field(description="nexmon-udp://HOST:PORT, file:///PATH, "
                                    "esp32-serial:///dev/tty...?baud=N, or stdin")
    model: Path | None = Field(default=None, description="bundle folder (default: the agent's)")
    level: int | None = Field(default=None, ge=0, le=3, description="rate level (default: "
                                                                     "the agent's)")
    presence_only: bool | None = Field(default=None, description="no bundle for this stream: "
                                                                 "motion scores only (default: "
                                                                 "the agent's)")

    @field_validator("site")
    @classmethod
    def _site(cls, value: str) -> str:
        return topic_name(value, "site")

    @field_validator("ap")
    @classmethod
    def _ap(cls, value: str) -> str:
        return topic_name(value, "ap")


class FileConfiguredSettings(BaseSettings):
    """Settings read from init values, then the environment, then a TOML/JSON config file."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is not None:
            if path.suffix.lower() == ".json":
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
            else:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, config: Path | None = None, **overrides: Any) -> Any:
        """``overrides`` (None = not given) win over the environment, which wins over
        ``config``."""
        if config is not None and not config.is_file():
            raise ValueError(f"config file {str(config)!r} does not exist")
        token = _CONFIG_FILE.set(config)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _CONFIG_FILE.reset(token)


class EdgeSettings(FileConfiguredSettings):
    """Everything the edge agent can be told. One ``csi edge`` process runs every stream."""

    model_config = SettingsConfigDict(env_prefix="CSI_EDGE_", env_nested_delimiter="__",
                                      extra="forbid")

    model: Path = Field(default=Path("models/fition"), description="model bundle folder")
    source: str | None = Field(default=None, description="source of the single stream "
                                                         "(with site and ap)")
    site: str | None = Field(default=None, description="site of the single stream (topic level)")
    ap: str | None = Field(default=None, description="access point of the single stream "
                                                     "(topic level)")
    streams: list[StreamSettings] = Field(default_factory=list,
                                          description="several streams (config file or JSON)")
    broker: str = Field(default="mqtt://127.0.0.1:1883", description="mqtt[s]://[user:pass@]"
                                                                    "host:port")
    username: str | None = Field(default=None, description="MQTT user (overrides the URL's)")
    password: SecretStr | None = Field(default=None, description="MQTT password")
    ca_file: Path | None = Field(default=None, description="CA bundle for mqtts://")
    prefix: str = Field(default="csi/v1", description="topic prefix")
    mqtt_protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT version "
                                                                         "(3.1.1 for brokers "
                                                                         "without MQTT 5)")
    level: int = Field(default=1, ge=0, le=3, description="rate level at start")
    idle: bool = Field(default=True, description="send idle markers instead of codes while "
                                                 "nothing moves (only with a bundle that has "
                                                 "an idle calibration; false: never)")
    idle_threshold: float | None = Field(
        default=None, ge=0, allow_inf_nan=False,
        description="motion threshold instead of the bundle's calibrated one (higher: fewer "
                    "bytes, more accuracy lost; the model report's trade-off table); with a "
                    "bundle without idle calibration it turns idle markers on")
    idle_segments_per_message: int = Field(
        default=10, ge=1, le=255, description="idle segments grouped into one message (a "
                                              "moving segment flushes the group at once)")
    motion: bool = Field(default=True, description="compute each segment's motion score "
                                                   "(csi_edge.presence) and send it, 1 byte a "
                                                   "segment; the cloud derives presence and "
                                                   "motion from it")
    presence_only: bool = Field(default=False, description="run without a bundle: segments of "
                                                           "1 s carry motion scores only (1-2 "
                                                           "bytes each), for hardware no bundle "
                                                           "fits; the cloud predicts presence "
                                                           "and motion, no activity")
    presence_segments_per_message: int = Field(
        default=1, ge=1, le=255, description="presence-only segments per message (more: fewer "
                                             "bytes, later presence)")
    speed: str = Field(default="real", description="file replay: real, max, or a factor (2.5)")
    loop: bool = Field(default=False, description="file replay: start again at the end")
    loop_new_epoch: bool = Field(
        default=False, description="file replay: each recording played (the next file of a "
                                   "folder, or the first again when a loop starts over) starts "
                                   "a new epoch, so the cloud starts a fresh context instead of "
                                   "classifying its start with the end of the last (the demo "
                                   "sets it)")
    timestamps: Literal["now", "recorded"] = Field(
        default="now", description="file replay: shift the capture times to now, or keep them")
    spool_dir: Path = Field(default=Path("spool"), description="on-disk queue: SITE/AP.sqlite "
                                                               "per stream")
    spool_max_segments: int = Field(default=86_400, ge=1,
                                    description="queue bound; the oldest are dropped beyond it")
    spool_sync: Literal["normal", "full"] = Field(
        default="normal", description="normal survives a killed process, full a power cut")
    spool_min_free_bytes: int = Field(
        default=2 << 20, ge=0, description="below this much free disk space the spool drops "
                                           "its oldest segment for each new one (counted in "
                                           "segments_dropped_disk_full)")
    spool_wal_limit_bytes: int = Field(
        default=1 << 20, ge=64 << 10, description="the spool's SQLite WAL is checkpointed and "
                                                  "cut back to about this size")
    inflight: int = Field(default=16, ge=1, le=1024, description="messages awaiting PUBACK")
    backlog_segments_per_message: int = Field(
        default=32, ge=1, le=255, description="segments per message while sending a backlog")
    status_heartbeat_s: float = Field(
        default=300.0, gt=0, le=86_400,
        description="longest time between two status messages while online: a status goes "
                    "out when what it says changes (state, model, level, error, problems, "
                    "...), otherwise once per heartbeat with fresh counters (~1 kB each); it "
                    "carries this value as status_interval_s for the cloud to tell a silent AP")
    status_check_s: float = Field(default=1.0, gt=0, le=60,
                                  description="how often a stream's status is compared with "
                                              "the last one published")
    wire_version: Literal[1, 2] = Field(
        default=2, description="wire format of the segment messages (csi_edge.codec): 2 codes "
                               "a message's segments as one stream (fewer bytes); 1 for a "
                               "cloud that predates version 2")
    topic_aliases: bool = Field(default=True, description="MQTT 5 topic aliases, up to the "
                                                          "broker's Topic Alias Maximum (saves "
                                                          "the topic on every message)")
    keepalive_s: int = Field(default=60, ge=5, le=65535,
                             description="MQTT keepalive: a PINGREQ only after this long "
                                         "without a packet; the broker sends the Last Will "
                                         "after 1.5 times it without one")
    reconnect_min_s: float = Field(default=0.5, gt=0, description="first reconnect backoff")
    reconnect_max_s: float = Field(default=30.0, gt=0,
                                   description="backoff ceiling (full jitter: a broker back after "
                                               "a restart does not see every AP at once)")
    drain_timeout_s: float = Field(default=5.0, ge=0,
                                   description="on stop, time to send what is queued")
    models_dir: Path = Field(default=Path("models/.fetched"),
                             description="where bundles fetched from the cloud are kept")
    cloud_url: str | None = Field(default=None, description="cloud base URL: bundles are "
                                                            "fetched only from under it, and "
                                                            "only ids its model list names "
                                                            "(unset: switch_model refused)")
    fetch_max_bytes: int = Field(default=50_000_000, ge=1024, description="largest bundle "
                                                                          "download accepted")
    udp_warmup: int = Field(default=100, ge=1, description="Nexmon packets seen before the "
                                                           "majority stream is chosen")
    client_id_prefix: str = Field(default="csi-edge", description="without a user name, each "
                                                                   "stream connects as client "
                                                                   "id PREFIX-SITE-AP (with "
                                                                   "one: one connection, client "
                                                                   "id = the user name)")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        levels = value.split("/")
        for level in levels:
            topic_name(level, "topic prefix level")
        return value

    @field_validator("speed")
    @classmethod
    def _speed(cls, value: str) -> str:
        if value in ("real", "max"):
            return value
        try:
            factor = float(value)
        except ValueError:
            raise ValueError(f"speed {value!r} is not real, max or a positive number") from None
        if not factor > 0:
            raise ValueError(f"speed {value!r} must be positive")
        return value

    @property
    def speed_factor(self) -> float | None:
        """Replay speed as a factor of real time; None for as fast as possible."""
        if self.speed == "max":
            return None
        return 1.0 if self.speed == "real" else float(self.speed)

    def broker_address(self) -> BrokerAddress:
        address = BrokerAddress.parse(self.broker)
        updates: dict[str, Any] = {}
        if self.username:
            updates["username"] = self.username
        if self.password:
            updates["password"] = self.password.get_secret_value()
        return address.model_copy(update=updates)

    def all_streams(self) -> list[StreamSettings]:
        """The configured streams: ``streams`` plus the single one of source/site/ap."""
        streams = list(self.streams)
        single = (self.source, self.site, self.ap)
        if any(v is not None for v in single):
            if self.source is None or self.site is None or self.ap is None:
                raise ValueError("a single stream needs all of --source, --site and --ap "
                                 f"(got source={self.source!r}, site={self.site!r}, "
                                 f"ap={self.ap!r})")
            streams.insert(0, StreamSettings(site=self.site, ap=self.ap, source=self.source))
        if not streams:
            raise ValueError("no stream configured: give --source, --site and --ap, or "
                             "streams in a config file")
        seen: set[tuple[str, str]] = set()
        for s in streams:
            if (s.site, s.ap) in seen:
                raise ValueError(f"stream {s.site}/{s.ap} is configured twice")
            seen.add((s.site, s.ap))
        return streams


def load_settings(config: Path | None = None, **overrides: Any) -> EdgeSettings:
    """Settings from ``overrides`` (the command line; None means not given), the environment,
    then ``config``."""
    settings: EdgeSettings = EdgeSettings.load(config, **overrides)
    return settings
