"""Edge agent settings: command line > CSI_EDGE_* environment > config file, streams, and the
validation messages a user sees (each quotes the offending value)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from csi_edge.settings import (
    BrokerAddress,
    EdgeSettings,
    StreamSettings,
    load_settings,
    topic_name,
)

TOML_TWO_STREAMS = """
broker = "mqtt://broker.local:1883"
model = "models/fition"
level = 2
speed = "max"

[[streams]]
site = "lab"
ap = "ap1"
source = "nexmon-udp://0.0.0.0:5500"

[[streams]]
site = "lab"
ap = "ap2"
source = "file:///data/fition?loop=1"
level = 0
model = "models/wiar"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CSI_EDGE_* variable of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("CSI_EDGE_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- precedence -------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings()
    assert settings.model == Path("models/fition")
    assert settings.broker == "mqtt://127.0.0.1:1883"
    assert settings.level == 1
    assert settings.speed == "real" and settings.speed_factor == 1.0
    assert settings.loop is False and settings.timestamps == "now"
    assert settings.streams == []
    assert settings.prefix == "csi/v1"


def test_overrides_beat_environment_beat_config_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "edge.toml", 'level = 2\nprefix = "file/prefix"\n'
                                           'broker = "mqtt://from-file:1"\ninflight = 3\n')
    assert load_settings(config).level == 2
    monkeypatch.setenv("CSI_EDGE_LEVEL", "3")
    monkeypatch.setenv("CSI_EDGE_BROKER", "mqtt://from-env:2")
    settings = load_settings(config)
    assert (settings.level, settings.broker) == (3, "mqtt://from-env:2")
    assert settings.prefix == "file/prefix" and settings.inflight == 3  # file still fills in
    settings = load_settings(config, level=0, broker="mqtt://from-cli:3")
    assert (settings.level, settings.broker) == (0, "mqtt://from-cli:3")
    assert settings.prefix == "file/prefix"


def test_none_overrides_mean_not_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "edge.toml", "level = 2\nloop = true\n")
    monkeypatch.setenv("CSI_EDGE_SPEED", "max")
    settings = load_settings(config, level=None, speed=None, loop=None, source=None)
    assert (settings.level, settings.speed, settings.loop) == (2, "max", True)
    assert settings.source is None


def test_environment_alone_and_without_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSI_EDGE_SPEED", "2.5")
    monkeypatch.setenv("CSI_EDGE_LOOP", "true")
    monkeypatch.setenv("CSI_EDGE_TIMESTAMPS", "recorded")
    monkeypatch.setenv("CSI_EDGE_SPOOL_DIR", "/var/lib/csi/spool")
    monkeypatch.setenv("CSI_EDGE_PASSWORD", "s3cret")
    settings = load_settings()
    assert settings.speed_factor == 2.5
    assert settings.loop is True and settings.timestamps == "recorded"
    assert settings.spool_dir == Path("/var/lib/csi/spool")
    assert settings.password is not None
    assert settings.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_json_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "edge.json", json.dumps({
        "level": 3, "broker": "mqtts://cloud:8883",
        "streams": [{"site": "s", "ap": "a", "source": "stdin"}],
    }))
    settings = load_settings(config)
    assert settings.level == 3
    assert [(s.site, s.ap, s.source) for s in settings.all_streams()] == [("s", "a", "stdin")]
    monkeypatch.setenv("CSI_EDGE_LEVEL", "0")
    assert load_settings(config).level == 0


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ValueError, match="does not exist") as info:
        load_settings(missing)
    assert repr(str(missing)) in str(info.value)


def test_unknown_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="levle"):
        load_settings(write(tmp_path / "edge.toml", "levle = 2\n"))
    with pytest.raises(ValidationError, match="colour"):
        load_settings(colour="blue")


def test_config_file_does_not_leak_into_later_loads(tmp_path: Path) -> None:
    load_settings(write(tmp_path / "edge.toml", "level = 3\n"))
    assert load_settings().level == 1
    assert EdgeSettings().level == 1


# -- streams ------------------------------------------------------------------------------------


def test_streams_from_a_toml_config_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path / "edge.toml", TOML_TWO_STREAMS))
    assert settings.broker == "mqtt://broker.local:1883"
    assert settings.level == 2 and settings.speed_factor is None
    streams = settings.all_streams()
    assert [(s.site, s.ap, s.source) for s in streams] == [
        ("lab", "ap1", "nexmon-udp://0.0.0.0:5500"),
        ("lab", "ap2", "file:///data/fition?loop=1"),
    ]
    assert streams[0].model is None and streams[0].level is None
    assert streams[1].model == Path("models/wiar") and streams[1].level == 0


def test_single_stream_goes_first_next_to_config_streams(tmp_path: Path) -> None:
    config = write(tmp_path / "edge.toml", TOML_TWO_STREAMS)
    settings = load_settings(config, source="stdin", site="lab", ap="ap3")
    assert [(s.site, s.ap) for s in settings.all_streams()] == [
        ("lab", "ap3"), ("lab", "ap1"), ("lab", "ap2")]


def test_streams_from_environment_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSI_EDGE_STREAMS", json.dumps([
        {"site": "home", "ap": "kitchen", "source": "nexmon-udp://0.0.0.0:5500", "level": 3},
    ]))
    streams = load_settings().all_streams()
    assert [(s.site, s.ap, s.level) for s in streams] == [("home", "kitchen", 3)]


def test_single_stream_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSI_EDGE_SOURCE", "stdin")
    monkeypatch.setenv("CSI_EDGE_SITE", "lab")
    monkeypatch.setenv("CSI_EDGE_AP", "ap9")
    streams = load_settings().all_streams()
    assert [(s.site, s.ap, s.source) for s in streams] == [("lab", "ap9", "stdin")]


@pytest.mark.parametrize("given", [
    {"source": "stdin"},
    {"site": "lab"},
    {"source": "stdin", "ap": "ap1"},
    {"site": "lab", "ap": "ap1"},
])
def test_partial_single_stream_names_what_was_given(given: dict[str, str]) -> None:
    settings = load_settings(**given)
    with pytest.raises(ValueError, match="needs all of --source, --site and --ap") as info:
        settings.all_streams()
    for key in ("source", "site", "ap"):
        assert f"{key}={given.get(key)!r}" in str(info.value)


def test_no_stream_at_all() -> None:
    with pytest.raises(ValueError, match="no stream configured"):
        load_settings().all_streams()


def test_duplicate_streams_are_refused(tmp_path: Path) -> None:
    config = write(tmp_path / "edge.toml", TOML_TWO_STREAMS)
    with pytest.raises(ValueError, match="stream lab/ap1 is configured twice"):
        load_settings(config, source="stdin", site="lab", ap="ap1").all_streams()
    twice = TOML_TWO_STREAMS.replace('ap = "ap2"', 'ap = "ap1"')
    with pytest.raises(ValueError, match="stream lab/ap1 is configured twice"):
        load_settings(write(tmp_path / "twice.toml", twice)).all_streams()
    # Same AP name at another site is another stream.
    other_site = TOML_TWO_STREAMS.replace('site = "lab"\nap = "ap2"', 'site = "home"\nap = "ap1"')
    streams = load_settings(write(tmp_path / "other.toml", other_site)).all_streams()
    assert [(s.site, s.ap) for s in streams] == [("lab", "ap1"), ("home", "ap1")]


def test_stream_refuses_unknown_keys_and_bad_levels() -> None:
    with pytest.raises(ValidationError, match="colour"):
        StreamSettings(site="a", ap="b", source="stdin", colour="red")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="level"):
        StreamSettings(site="a", ap="b", source="stdin", level=4)
    with pytest.raises(ValidationError, match="source"):
        StreamSettings(site="a", ap="b")  # type: ignore[call-arg]


# -- topic levels -------------------------------------------------------------------------------

BAD_LEVELS = ["a/b", "+", "#", "$SYS", "", "lab+1", "x#", " lab", "lab ", "a\x00b", "x" * 65,
              ".", "..", "_x", "läb", "a b", "a$b"]


@pytest.mark.parametrize("bad", BAD_LEVELS)
def test_bad_site_and_ap_are_quoted(bad: str) -> None:
    for field in ("site", "ap"):
        values = {"site": "lab", "ap": "ap1", field: bad}
        with pytest.raises(ValidationError) as info:
            StreamSettings(source="stdin", **values)
        assert f"{field} {bad!r} is not a valid name" in str(info.value)


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "$SYS", ""])
def test_bad_single_stream_site_is_quoted_by_all_streams(bad: str) -> None:
    settings = load_settings(source="stdin", site=bad, ap="ap1")
    with pytest.raises(ValueError) as info:
        settings.all_streams()
    assert f"site {bad!r}" in str(info.value)


def test_bad_stream_in_config_file_is_quoted(tmp_path: Path) -> None:
    config = write(tmp_path / "edge.toml", TOML_TWO_STREAMS.replace('ap = "ap2"', 'ap = "a/2"'))
    with pytest.raises(ValidationError) as info:
        load_settings(config)
    assert "ap 'a/2' is not a valid name" in str(info.value)


@pytest.mark.parametrize("good", ["lab", "ap-1", "AP_2.5g", "x" * 64, "0", "a.b-c_d"])
def test_good_topic_levels(good: str) -> None:
    assert topic_name(good, "site") == good
    assert StreamSettings(site=good, ap=good, source="stdin").site == good


@pytest.mark.parametrize("prefix", ["csi/+/v1", "csi/#", "csi//v1", "/csi", "csi/", "$SYS/csi"])
def test_bad_prefix_is_refused_quoting_the_level(prefix: str) -> None:
    with pytest.raises(ValidationError) as info:
        load_settings(prefix=prefix)
    assert "topic prefix level" in str(info.value)
    bad_level = next(level for level in prefix.split("/") if not _is_ok(level))
    assert repr(bad_level) in str(info.value)


def _is_ok(level: str) -> bool:
    try:
        topic_name(level, "x")
    except ValueError:
        return False
    return True


def test_good_prefixes() -> None:
    assert load_settings(prefix="csi").prefix == "csi"
    assert load_settings(prefix="org/site-a/csi/v2").prefix == "org/site-a/csi/v2"


# -- broker URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "host", "port", "tls", "user", "password"), [
    ("mqtt://broker.local", "broker.local", 1883, False, None, None),
    ("mqtt://broker.local:1884", "broker.local", 1884, False, None, None),
    ("mqtts://broker.local", "broker.local", 8883, True, None, None),
    ("mqtts://broker.local:9999", "broker.local", 9999, True, None, None),
    ("tcp://10.0.0.1:1883", "10.0.0.1", 1883, False, None, None),
    ("ssl://10.0.0.1", "10.0.0.1", 8883, True, None, None),
    ("broker.local:1885", "broker.local", 1885, False, None, None),
    ("broker.local", "broker.local", 1883, False, None, None),
    ("mqtt://edge@broker.local", "broker.local", 1883, False, "edge", None),
    ("mqtt://edge:pa55@broker.local:1883", "broker.local", 1883, False, "edge", "pa55"),
    ("mqtts://ed%40ge:p%3Ass%2Fw@b.example:8884", "b.example", 8884, True, "ed@ge", "p:ss/w"),
    ("mqtt://[::1]:1883", "::1", 1883, False, None, None),
])
def test_broker_url_parsing(url: str, host: str, port: int, tls: bool, user: str | None,
                            password: str | None) -> None:
    address = BrokerAddress.parse(url)
    assert (address.host, address.port, address.tls) == (host, port, tls)
    assert (address.username, address.password) == (user, password)
    assert str(address) == f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
    if password:
        assert password not in str(address)


@pytest.mark.parametrize(("url", "message"), [
    ("http://broker.local", "scheme 'http' is not mqtt:// or mqtts://"),
    ("ws://broker.local:80", "scheme 'ws'"),
    ("mqtt://broker.local:99999", "bad port"),
    ("mqtt://broker.local:abc", "bad port"),
    ("mqtt://broker.local:-1", "bad port"),
    ("mqtt://:1883", "has no host"),
    ("mqtts://", "has no host"),
])
def test_bad_broker_urls_are_quoted(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as info:
        BrokerAddress.parse(url)
    assert repr(url) in str(info.value)


def test_broker_address_takes_username_and_password_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(broker="mqtts://u:old@b.example")
    address = settings.broker_address()
    assert (address.host, address.port, address.tls) == ("b.example", 8883, True)
    assert (address.username, address.password) == ("u", "old")
    monkeypatch.setenv("CSI_EDGE_USERNAME", "edge")
    monkeypatch.setenv("CSI_EDGE_PASSWORD", "new")
    address = load_settings(broker="mqtts://u:old@b.example").broker_address()
    assert (address.username, address.password) == ("edge", "new")
    with pytest.raises(ValueError, match="'gopher://x'"):
        load_settings(broker="gopher://x").broker_address()


# -- speed and other checked values -------------------------------------------------------------


@pytest.mark.parametrize(("speed", "factor"), [
    ("real", 1.0), ("max", None), ("2.5", 2.5), ("1", 1.0), ("0.1", 0.1), ("10", 10.0),
])
def test_speed_values(speed: str, factor: float | None) -> None:
    assert load_settings(speed=speed).speed_factor == factor


@pytest.mark.parametrize(("speed", "message"), [
    ("fast", "is not real, max or a positive number"),
    ("", "is not real, max or a positive number"),
    ("0", "must be positive"),
    ("-2", "must be positive"),
    ("nan", "must be positive"),
])
def test_bad_speed_is_quoted(speed: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        load_settings(speed=speed)
    assert f"speed {speed!r}" in str(info.value)
    monkeypatch.setenv("CSI_EDGE_SPEED", speed)
    with pytest.raises(ValidationError, match=message):
        load_settings()


@pytest.mark.parametrize("values", [
    {"level": 4}, {"level": -1}, {"inflight": 0}, {"backlog_segments_per_message": 256},
    {"spool_max_segments": 0}, {"spool_sync": "sometimes"}, {"timestamps": "later"},
    {"keepalive_s": 1}, {"status_heartbeat_s": 0}, {"status_check_s": 0}, {"fetch_max_bytes": 10},
])
def test_out_of_range_values_are_refused(values: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match=next(iter(values))):
        load_settings(**values)
