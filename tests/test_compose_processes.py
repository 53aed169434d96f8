"""compose.yaml's services, run as local processes with the same settings.

No Docker engine here, so this reads compose.yaml (and the Dockerfile's ENV and ENTRYPOINT of
each build target) and starts what ``CSI_EDGE_APS=2 docker compose up`` would start, as
processes: the broker with the committed mosquitto.conf and the ACL and passwords made by the
documented make-acl.py command, PostgreSQL (a fresh role and database on the local server), the
cloud service and the replaying edge with two APs. Only host names, ports and paths are
rewritten (a service name becomes 127.0.0.1 and a free port, a container path the folder its
volume maps to); every other value, the edge's entrypoint line included, is used as written.
The services are started in the order of ``depends_on`` and each waits for the previous one's
own compose healthcheck. Both APs must appear in the demo site, with predictions, and no
connection may take another's session (the broker makes the client id the user name)."""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import paho.mqtt.client as mqtt
import pytest
import yaml
from _broker import Mosquitto, free_port, mosquitto_binary
from test_compose import COMPOSE_FILE, dockerfile_stages, image_env, stage_chain

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "mosquitto"
POSTGRES = os.environ.get("CSI_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PASSWD_TOOL = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
REPLAY_APS = 2
TIMEOUT_S = 60.0

# Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}.
_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)"
                       r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<named>[A-Za-z_]\w*))")


def interpolate(node: object, env: dict[str, str]) -> object:
    """compose.yaml with the variables substituted, as Compose does."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def substitute(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name, op, arg = m["braced"] or m["named"], m["op"] or "", m["arg"]
        value = env.get(name)
        if value is not None and (value or not op.startswith(":")):
            return value
        if op.endswith("?"):
            raise KeyError(f"required variable {name} is missing: {arg}")
        return arg if op.endswith("-") else ""

    return _VARIABLE.sub(substitute, node)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


@dataclass
class Rewriter:
    """Maps what a container sees to this machine: service names to 127.0.0.1 and a port,
    container paths to the folders their volumes (or the container's own files) are."""

    ports: dict[str, tuple[int, int]]  # service: (port inside the network, port here)
    paths: dict[str, Path] = field(default_factory=dict)  # container path: folder here
    own: str | None = None  # the service this container belongs to

    def __call__(self, value: str) -> str:
        names = "|".join(map(re.escape, self.ports))

        def host(m: re.Match[str]) -> str:
            inside, here = self.ports[m[1]]
            assert m[2] is None or int(m[2]) == inside, f"{m[0]}: {m[1]} listens on {inside}"
            return f"127.0.0.1:{here}"

        value = re.sub(rf"(?<=[/@])({names})(?::(\d+))?(?=[/?]|$)", host, value)
        if self.own in self.ports:  # its own listening address
            inside, here = self.ports[self.own]
            value = re.sub(rf"^0\.0\.0\.0:{inside}$", f"127.0.0.1:{here}", value)
        if self.paths:
            keys = sorted(self.paths, key=len, reverse=True)
            pattern = "|".join(re.escape(k) for k in keys)
            value = re.sub(rf"(?<![\w.-])({pattern})(?=/|$|\?)",
                           lambda m: str(self.paths[m[1]]), value)
        return value


def container_paths(service: dict, target: str, state: Path, volumes: Path) -> dict[str, Path]:
    """Container path -> folder here: each volume (bind mounts relative to the project, named
    volumes in ``volumes``) and the image's WORKDIR (the container's own files, ``state``)."""
    stages = dockerfile_stages()
    workdirs = [args for name in stage_chain(stages, target)
                for kw, args in stages[name]["instructions"] if kw == "WORKDIR"]
    paths = {workdirs[-1]: state}
    for spec in service.get("volumes", []):
        source, target_path = spec.split(":")[:2]
        if source.startswith((".", "/")):
            paths[target_path] = (ROOT / source).resolve()
        else:
            paths[target_path] = volumes / source
            paths[target_path].mkdir(parents=True, exist_ok=True)
    return paths


def entry_argv(service: dict, target: str) -> list[str]:
    """ENTRYPOINT + CMD as Compose runs them: the service's entrypoint (which drops the
    image's command) or the image's, then the service's command."""
    stages = dockerfile_stages()
    entry = [args for name in stage_chain(stages, target)
             for kw, args in stages[name]["instructions"] if kw == "ENTRYPOINT"]
    argv = list(service["entrypoint"]) if "entrypoint" in service else json.loads(entry[-1])
    command = service.get("command") or []
    return argv + (command.split() if isinstance(command, str) else list(command))


class Process:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path,
                 logs: Path) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        cwd.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=cwd)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return f"--- {self.name} ---\n" + self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _base_env() -> dict[str, str]:
    """The test's environment without deployment settings, the project's ``csi`` first on the
    PATH (the image's is in /usr/local/bin)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CSI_", "POSTGRES_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _require_tools() -> None:
    missing = [what for what, ok in (("mosquitto", mosquitto_binary() is not None),
                                     ("mosquitto_passwd", Path(PASSWD_TOOL).exists()))
               if not ok]
    if missing:
        if IN_CI:
            pytest.fail(f"CI=true but {', '.join(missing)} is not installed")
        pytest.skip(f"needs {', '.join(missing)}")


@dataclass
class Deployment:
    compose: dict
    values: dict[str, str]  # the required variables, as an operator's .env would set them
    broker: Mosquitto
    credentials: dict[str, str]


def _broker_config(folder: Path, port: int) -> str:
    """The committed mosquitto.conf, on a free port, with /mosquitto/ mapped to ``folder``
    (config files as the compose service mounts and copies them, data as its volume)."""
    text = (DEPLOY / "mosquitto.conf").read_text()
    assert "\nlistener 1883\n" in text
    text = text.replace("\nlistener 1883\n", f"\nlistener {port} 127.0.0.1\n")
    text = text.replace("/mosquitto/config/", f"{folder}/config/").replace(
        "/mosquitto/data/", f"{folder}/data/")
    if os.geteuid() == 0:  # mosquitto started as root drops to user mosquitto: keep root here
        text += "\nuser root\n"
    # Also to a file, which mosquitto flushes line by line (its stdout to a file is buffered).
    return text + f"\nlog_dest file {folder}/broker.log\n"


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """compose.yaml's variables set as docs/deployment.md says, and its broker running."""
    _require_tools()
    placeholders = {k: "x" for k in ("CSI_CLOUD_TOKEN", "POSTGRES_PASSWORD",
                                     "CSI_CLOUD_MQTT_PASSWORD", "CSI_EDGE_MQTT_PASSWORD",
                                     "CSI_MQTT_HEALTHCHECK_PASSWORD")}
    edge = environment(interpolate(yaml.safe_load(COMPOSE_FILE.read_text()),
                                   placeholders)["services"]["edge"])
    user, site = edge["CSI_EDGE_USERNAME"], edge["REPLAY_SITE"]
    # The documented make-acl.py command (docs/deployment.md), into this test's folder.
    secrets_dir = tmp_path / "deploy"
    secrets_dir.mkdir()
    subprocess.run([sys.executable, str(DEPLOY / "make-acl.py"), "--aps-file",
                    str(DEPLOY / "aps.txt"), "--site-user", f"{user}={site}", "--reader",
                    "healthcheck", "--acl",
                    str(secrets_dir / "compose.acl"), "--passwd", str(secrets_dir / "passwd"),
                    "--credentials", str(secrets_dir / "mqtt-credentials.csv"),
                    "--mosquitto-passwd", PASSWD_TOOL], check=True)
    with (secrets_dir / "mqtt-credentials.csv").open() as fh:
        credentials = {row["username"]: row["password"] for row in csv.DictReader(fh)}
    values = {"CSI_CLOUD_TOKEN": secrets.token_urlsafe(24),
              "POSTGRES_PASSWORD": secrets.token_hex(12),
              "CSI_CLOUD_MQTT_PASSWORD": credentials["csi-cloud"],
              "CSI_EDGE_MQTT_PASSWORD": credentials[user],
              "CSI_MQTT_HEALTHCHECK_PASSWORD": credentials["healthcheck"],
              "CSI_EDGE_APS": str(REPLAY_APS)}
    compose = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), values)
    assert isinstance(compose, dict)
    # The broker: its mounts, and the copies its command makes of the password file and ACL.
    service = compose["services"]["mosquitto"]
    folder = tmp_path / "mosquitto"
    (folder / "config").mkdir(parents=True)
    (folder / "data").mkdir()
    mounts = {spec.split(":")[1]: spec.split(":")[0] for spec in service["volumes"]}
    assert mounts["/run/csi/acl"] == "./deploy/mosquitto/compose.acl"
    assert mounts["/run/csi/passwd"] == "./deploy/mosquitto/passwd"
    assert "cp /run/csi/passwd /run/csi/acl /mosquitto/config/" in service["command"][2]
    shutil.copy(secrets_dir / "compose.acl", folder / "config" / "acl")
    shutil.copy(secrets_dir / "passwd", folder / "config" / "passwd")
    broker = Mosquitto(folder)
    broker.config.write_text(_broker_config(folder, broker.port))
    with broker:
        yield Deployment(compose, values, broker, credentials)


def _healthcheck(service: dict, env: dict[str, str], port_inside: int | None = None,
                 port_here: int | None = None) -> int:
    """Run the service's compose healthcheck here; its exit code."""
    test = service["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        line = test[1]
        if port_inside is not None:  # the container's own port, given with -p
            line = re.sub(rf"(-p\s+){port_inside}\b", rf"\g<1>{port_here}", line)
        argv = ["sh", "-c", line]
    else:
        argv = [sys.executable if test[1] == "python" else test[1], *test[2:]]
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode


@pytest.fixture
def postgres_role() -> Iterator[tuple[str, int, str]]:
    """A fresh role and database on the local server: (host, port, name)."""
    import psycopg

    name = f"csi_compose_{uuid.uuid4().hex[:10]}"
    admin = POSTGRES.replace("postgresql+psycopg", "postgresql") + "/test"
    try:
        psycopg.connect(admin, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        if IN_CI:
            pytest.fail(f"CI=true but PostgreSQL is not reachable at {POSTGRES}: {exc}")
        pytest.skip(f"needs PostgreSQL at {POSTGRES}: {exc}")
    parts = urlsplit(admin)
    yield parts.hostname or "127.0.0.1", parts.port or 5432, name
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        con.execute(f"DROP ROLE IF EXISTS {name}")


@pytest.mark.e2e
def test_compose_services_as_processes(deployment: Deployment,
                                       postgres_role: tuple[str, int, str],
                                       tmp_path: Path) -> None:
    import psycopg

    started = time.monotonic()
    services = deployment.compose["services"]
    # Start order: what each service depends on first, and healthy (as compose waits).
    order = ["mosquitto", "postgres", "cloud", "edge"]
    for i, name in enumerate(order):
        assert set(services[name].get("depends_on", {})) <= set(order[:i]), name
        for dep in services[name].get("depends_on", {}).values():
            assert dep["condition"] == "service_healthy"

    # postgres: the database the postgres service would create, as a fresh role and database.
    pg_host, pg_port, pg_name = postgres_role
    pg_env = environment(services["postgres"])
    admin = POSTGRES.replace("postgresql+psycopg", "postgresql") + "/test"
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f"CREATE ROLE {pg_name} LOGIN PASSWORD '{pg_env['POSTGRES_PASSWORD']}'")
        con.execute(f"CREATE DATABASE {pg_name} OWNER {pg_name}")

    # mosquitto: running (fixture); healthy by its own healthcheck where mosquitto_sub exists.
    mqtt_port = deployment.broker.port
    cloud_port = free_port()
    ports = {"mosquitto": (1883, mqtt_port), "cloud": (8000, cloud_port),
             "postgres": (5432, pg_port)}
    assert pg_host in ("127.0.0.1", "localhost")
    broker_env = {**_base_env(), **environment(services["mosquitto"])}
    if shutil.which("mosquitto_sub"):
        assert _healthcheck(services["mosquitto"], broker_env, 1883, mqtt_port) == 0
        wrong = {**broker_env, "CSI_MQTT_HEALTHCHECK_PASSWORD": "not-the-password"}
        assert _healthcheck(services["mosquitto"], wrong, 1883, mqtt_port) != 0

    logs = tmp_path / "logs"
    logs.mkdir()
    volumes = tmp_path / "volumes"
    processes: list[Process] = []

    def container(name: str, service_name: str, hostname: str) -> tuple[list[str], dict, Path]:
        service = services[service_name]
        target = service["build"]["target"]
        state = tmp_path / "containers" / name
        rewrite = Rewriter(ports, container_paths(service, target, state, volumes),
                           own=service_name)
        env = _base_env()
        env.update({k: rewrite(v) for k, v in image_env(target).items()})
        env.update({k: rewrite(v) for k, v in environment(service).items()})
        env["HOSTNAME"] = hostname
        return [rewrite(a) for a in entry_argv(service, target)], env, state

    try:
        # cloud: the database URL names the postgres service's user, password and database;
        # here they are the fresh role's.
        argv, env, state = container("cloud-1", "cloud", secrets.token_hex(6))
        db = urlsplit(env["CSI_CLOUD_DB"])
        assert (db.username, db.password, db.path) == (
            pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], f"/{pg_env['POSTGRES_DB']}")
        assert (db.hostname, db.port) == ("127.0.0.1", pg_port)
        env["CSI_CLOUD_DB"] = urlunsplit(db._replace(
            netloc=f"{pg_name}:{db.password}@127.0.0.1:{pg_port}", path=f"/{pg_name}"))
        cloud = Process("cloud", argv, env, state, logs)
        processes.append(cloud)
        deadline = time.monotonic() + TIMEOUT_S
        while _healthcheck(services["cloud"], env) != 0:
            assert cloud.alive(), cloud.tail()
            assert time.monotonic() < deadline, f"cloud never healthy\n{cloud.tail()}"
            time.sleep(0.5)
        cloud_ready = time.monotonic() - started

        # edge: one process, CSI_EDGE_APS streams over one connection as the site user.
        argv, env, state = container("edge", "edge", secrets.token_hex(6))
        processes.append(Process("edge", argv, env, state, logs))
        aps = [f"replay-{i}" for i in range(1, REPLAY_APS + 1)]

        site = environment(services["edge"])["REPLAY_SITE"]
        url = f"http://127.0.0.1:{cloud_port}/api/v1/aps"
        deadline = time.monotonic() + TIMEOUT_S
        seen: dict[str, dict] = {}
        while True:
            for p in processes:
                assert p.alive(), p.tail()
            rows = httpx.get(url, timeout=10).json()["data"]
            seen = {a["ap"]: a for a in rows if a["site"] == site and a.get("prediction")}
            if set(aps) <= set(seen):
                break
            assert time.monotonic() < deadline, (
                f"APs with predictions: {sorted(seen)}, expected {aps}\n"
                + "\n".join(p.tail() for p in processes))
            time.sleep(0.5)
        for ap in aps:
            assert seen[ap]["online"], seen[ap]
            assert seen[ap]["prediction"]["activity"], seen[ap]
            assert seen[ap]["status"]["source"].startswith("file://"), seen[ap]["status"]
        # Every user has one session: the edge's streams share one connection, and the
        # healthcheck and the cloud never take each other's.
        log = (deployment.broker.folder / "broker.log").read_text()
        assert "already connected, closing old connection" not in log, log[-3000:]
        user = environment(services["edge"])["CSI_EDGE_USERNAME"]
        assert log.count(f" as {user} (") == 1, log[-3000:]
        assert log.count(" as csi-cloud (") == 1, log[-3000:]
        print(f"cloud healthy after {cloud_ready:.1f} s, {len(aps)} APs predicted after "
              f"{time.monotonic() - started:.1f} s")
    finally:
        for p in reversed(processes):
            p.stop()


class _Client:
    def __init__(self, port: int, user: str, password: str, topics: list[str]) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, password)
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics]) \
            if topics else subscribed.set()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert subscribed.wait(10), f"{user}: not connected"

    def _on_message(self, client: mqtt.Client, userdata: object,
                    msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def wait_for(self, payload: bytes) -> list[bytes]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._lock:
                got = [p for _, p in self.messages]
            if payload in got:
                return got
            time.sleep(0.02)
        raise AssertionError(f"{payload!r} never arrived: {got}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.e2e
def test_replay_user_is_confined_to_its_site(deployment: Deployment) -> None:
    """The one user of the replaying edge may act as any AP of its site, and nothing else."""
    edge = environment(deployment.compose["services"]["edge"])
    user, site = edge["CSI_EDGE_USERNAME"], edge["REPLAY_SITE"]
    port = deployment.broker.port
    cloud = _Client(port, "csi-cloud", deployment.credentials["csi-cloud"],
                    ["csi/v1/+/+/seg", "csi/v1/+/+/status"])
    replay = _Client(port, user, deployment.credentials[user],
                     [f"csi/v1/{site}/anyap/ctl", "csi/v1/lab/ap1/ctl"])
    try:
        replay.publish("csi/v1/lab/ap1/seg", b"forged")  # another site's AP
        replay.publish(f"csi/v1/{site}/anyap/pred", b"forged-pred")
        replay.publish(f"csi/v1/{site}/anyap/status", b"status")
        replay.publish(f"csi/v1/{site}/anyap/seg", b"seg")
        assert cloud.wait_for(b"seg") == [b"status", b"seg"]
        cloud.publish("csi/v1/lab/ap1/ctl", b"to-lab")  # as csi-cloud
        cloud.publish(f"csi/v1/{site}/anyap/ctl", b"to-replay")
        assert replay.wait_for(b"to-replay") == [b"to-replay"]
    finally:
        cloud.close()
        replay.close()
