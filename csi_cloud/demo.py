"""``csi demo``: the whole pipeline on loopback, from one command, with nothing else installed.

It starts, as child processes:
  1. an MQTT broker: ``mosquitto`` when one is installed, else the embedded Python broker
     (:mod:`csi_cloud.embedded_broker`, MQTT 3.1.1, so every client falls back to 3.1.1);
  2. the cloud service with the chosen bundle, an SQLite database and recordings in a work
     folder, and a random API token (printed, for the dashboard's rate control);
  3. one edge agent running N AP streams, each replaying recordings at their real rate,
     looping. Where the recordings' names say who was recorded and someone has several
     (Fition's samples: two per person, each person in a room of their own), AP k plays the
     k-th person's recordings in turn: an AP stays in one room while the activity changes.
     Otherwise AP k loops the k-th recording. Each recording played is a new epoch, so the
     cloud's context never mixes two (and the truth shown beside each prediction is its
     recording's).
Then it prints the dashboard URL and a line per AP as predictions arrive, until Ctrl-C (or
SIGTERM, SIGHUP, or a reader of its output that goes away: ``csi demo | head``), which stops
every child (edges first, so they can flush, then the cloud, then the broker) with whatever
each started (csi_edge.lifetime). Each child runs in its own process group and gets SIGTERM from
the kernel if the demo dies without stopping it. A part that fails ends the demo with the last
lines of its log, and the work folder with the logs is kept.

The cloud serves its bundles from ``WORK/models`` (links to the shipped ones), so bundles its
jobs make stay in the work folder, never in the checkout's ``models/``.

Recordings no bundle of the models folder takes (ESP32 ``.npz`` of ESPectre, with the Nexmon
and Intel 5300 bundles shipped here) are replayed in presence-only mode: the edges send motion
scores only and the cloud shows presence and motion (csi_edge.presence). A folder of labelled
sub-folders (``baseline/``, ``movement/``) then gives AP k the k-th recording of each
sub-folder in turn, so every AP alternates between them; the presence hold is shortened to
``PRESENCE_DEMO_HOLD_S`` so occupied/empty follows 10 s recordings visibly.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csi_edge._errors import CSIError
from csi_edge.bundle import BundleError, load_manifest
from csi_edge.lifetime import preexec_die_with, stop_group
from csi_edge.locations import BundleNotFoundError, models_dir, resolve_model, samples_dir

__all__ = ["BROKER_PERSISTENCE", "DemoError", "demo_broker_config", "log_tail", "parse_http",
           "run_demo"]

_SUFFIXES = {".pcap", ".dat", ".csv", ".h5", ".hdf5", ".mat", ".npz"}
_DEFAULT_DATA = {"nexmon": "fition", "intel5300": "wiar"}
# With the motion score's 4 s window, a movement stays "occupied" about 4 s + the hold: 7 s
# leaves a 10 s quiet recording a few seconds of "empty".
PRESENCE_DEMO_HOLD_S = 3.0
DEFAULT_HTTP = "127.0.0.1:8000"
LOG_TAIL_LINES = 20
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class DemoError(RuntimeError):
    """The demo cannot start or a part of it failed (what and why)."""


class _StopRequestedError(Exception):
    """A stop was asked for (a signal, or the output went away) while the demo started."""


def _bind_error(host: str, port: int) -> OSError | None:
    """Why nothing can listen on ``host:port`` (None: it is free)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            return exc
    return None


def _free(host: str, port: int) -> bool:
    if _bind_error(host, port) is not None:
        return False
    # Something may listen on the wildcard address or another loopback form.
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def parse_http(http: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or DemoError naming the bad value."""
    host, _, port_text = http.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise DemoError(f"--http {http!r} is not HOST:PORT (a port from 1 to 65535)")
    return host, int(port_text)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log (what there is of it)."""
    try:
        data = path.read_bytes()[-64 * 1024:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


# The deployment's persistence and queue settings (deploy/mosquitto/mosquitto.conf; a test keeps
# them equal): the cloud's persistent session and its queued segments survive a broker restart,
# and the queue is bounded in bytes, not in Mosquitto's default 1000 messages.
BROKER_PERSISTENCE = {"autosave_interval": "30", "max_queued_messages": "1000000",
                      "max_queued_bytes": "67108864"}


def demo_broker_config(port: int, data: Path) -> str:
    """The demo's mosquitto.conf: loopback, anonymous (clients pick their client id), and the
    deployment's persistence and queue settings, persisted under ``data``."""
    data.mkdir(parents=True, exist_ok=True)
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence true",
             f"persistence_location {data}/",
             *(f"{k} {v}" for k, v in BROKER_PERSISTENCE.items())]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        lines.append("user root")  # as root it would drop to 'mosquitto', who cannot write here
    return "\n".join(lines) + "\n"


@dataclass
class _Children:
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)
    stop_now: bool = False

    def start(self, name: str, command: list[str], env: dict[str, str], log: Path) -> None:
        with log.open("ab") as out:
            # Its own session: Ctrl-C and a closed terminal reach the demo, which stops the
            # children in order; the kernel's SIGTERM if the demo dies without doing so.
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=preexec_die_with(os.getpid()))
        self.procs.append((name, proc))
        self.logs[name] = log

    def failure(self, name: str, what: str) -> DemoError:
        """A DemoError saying what failed, with the end of its log and where the log is."""
        log = self.logs.get(name)
        if log is None:
            return DemoError(what)
        tail = log_tail(log)
        shown = "\n".join(f"  | {line}" for line in tail.splitlines()) or "  | (empty)"
        return DemoError(f"{what}; the last lines of its log {log}:\n{shown}")

    def check(self) -> None:
        if self.stop_now:
            raise _StopRequestedError
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise self.failure(name, f"{name} exited with code {proc.returncode}")

    def stop(self) -> None:
        """Edges first (they flush), then the cloud, then the broker, each with its process
        group (the cloud's upload worker, recorder and resource tracker); kill what lingers."""
        order = {"edge": 0, "cloud": 1, "broker": 2}
        for name, proc in sorted(self.procs, key=lambda p: order.get(p[0], 3)):
            stop_group(proc, 3.0 if name == "edge" else 5.0)


def _recordings(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES)
    if not files:
        raise DemoError(f"no recording in {folder} (looked for {', '.join(sorted(_SUFFIXES))})")
    return files


def _device_of(files: list[Path]) -> str:
    """The CSI kind (``RadioInfo.device``) of the first readable recording."""
    from csi_edge.readers import read_recording

    problems = []
    for path in files:
        try:
            return read_recording(path).info.device
        except (CSIError, OSError, ValueError) as exc:
            problems.append(str(exc))
    raise DemoError(f"no readable recording among {len(files)} file(s): {'; '.join(problems)}")


def _link_folder(target: Path, recordings: list[tuple[str, Path]]) -> list[Path]:
    """``target`` holding a link ``NN-name`` to each (name, recording), in this order (the
    edge plays a folder in name order); the links, in that order. Links, so the recordings
    stay where they are."""
    target.mkdir(parents=True, exist_ok=True)
    links = []
    for i, (name, source) in enumerate(recordings):
        link = target / f"{i:02d}-{name}"
        if not link.exists():
            link.symlink_to(source.resolve())
        links.append(link)
    return links


def _presence_sessions(folder: Path, aps: int, work: Path) -> list[Path] | None:
    """Per AP, a folder of links to the k-th recording of each labelled sub-folder of
    ``folder`` (in sub-folder order); None when ``folder`` has no such sub-folders."""
    if not folder.is_dir():
        return None
    groups = [sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES)
              for sub in sorted(p for p in folder.iterdir() if p.is_dir())]
    groups = [g for g in groups if g]
    if len(groups) < 2:
        return None
    sessions = []
    for k in range(aps):
        target = work / "sessions" / f"ap{k + 1}"
        picked = [g[k % len(g)] for g in groups]
        _link_folder(target, [(f"{p.parent.name}-{p.name}", p) for p in picked])
        sessions.append(target)
    return sessions


@dataclass(frozen=True)
class _Room:
    """One AP of a labelled replay: the person (so, in these datasets, the room) its
    recordings show, the folder it replays and the recordings in it, in play order."""

    who: str
    folder: Path
    plays: list[Path]


def _rooms(data: Path, files: list[Path], labels: dict[str, list[str] | None], aps: int,
           work: Path) -> tuple[list[_Room], int] | None:
    """Per AP, a folder of links to recordings of one person, played in turn: an AP stays in
    one room while the activities change, as a real one does. Each person's first recording
    of each activity (a whole dataset folder would give an AP hundreds), people in order of
    their first recording; AP k gets the k-th (again from the first when there are more
    APs). Also the number of people left out. None when nobody has two activities (or the
    names say nothing): then each AP loops one recording. Reads names only, no recording."""
    from .demo_truth import label_of

    groups: dict[str, dict[str, Path]] = {}
    for path in files:
        label = label_of(path, data, labels)
        if label is not None and label[1] is not None:
            groups.setdefault(label[1], {}).setdefault(label[0], path)
    if not any(len(g) > 1 for g in groups.values()):
        return None
    people = list(groups)
    rooms = []
    for k in range(aps):
        who = people[k % len(people)]
        target = work / "rooms" / f"ap{k + 1}"
        plays = _link_folder(target, [(p.name, p) for p in groups[who].values()])
        rooms.append(_Room(who, target, plays))
    return rooms, max(0, len(people) - aps)


def _get(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _demo_models(models: Path, work: Path) -> Path:
    """``WORK/models``: a link to every bundle of ``models``, where the cloud's jobs add
    theirs (the shipped folder stays as it is)."""
    target = work / "models"
    target.mkdir(parents=True, exist_ok=True)
    for manifest in sorted(models.glob("*/bundle.json")):
        link = target / manifest.parent.name
        if not link.exists():
            link.symlink_to(manifest.parent.resolve(), target_is_directory=True)
    return target


def _work_folder(workdir: Path | None) -> Path:
    try:
        if workdir is None:
            return Path(tempfile.mkdtemp(prefix="csi-demo-"))
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".csi-demo-write-test"
        probe.write_bytes(b"")
        probe.unlink()
        return workdir
    except OSError as exc:
        where = workdir if workdir is not None else Path(tempfile.gettempdir())
        raise DemoError(f"--workdir {where}: cannot write there "
                        f"({exc.strerror or exc})") from None


def run_demo(*, http: str | None = None, data: Path | None = None, aps: int = 3,
             model: str = "fition", models: Path | None = None, broker: str = "auto",
             workdir: Path | None = None, duration_s: float | None = None,
             out: Any = None) -> int:
    """Run the demo until SIGINT, SIGTERM, SIGHUP, a closed output (or ``duration_s``); the
    exit code. ``http`` given explicitly must be free; left out, 8000 or a free port."""
    out = out or sys.stdout
    children = _Children()
    closed = [False]

    def say(text: str) -> None:
        if closed[0]:
            return
        try:
            print(text, file=out, flush=True)
        except (BrokenPipeError, ValueError):  # the reader went away (csi demo | head)
            closed[0] = children.stop_now = True
            _silence(out)

    if not 1 <= aps <= 500:
        raise DemoError(f"--aps {aps} is not between 1 and 500")
    models = models or models_dir()
    try:
        bundle = resolve_model(model, models)
        manifest = load_manifest(bundle)
    except (BundleNotFoundError, BundleError) as exc:
        raise DemoError(f"model {model!r}: {exc}") from exc
    if data is None:
        default = _DEFAULT_DATA.get(manifest.input_spec.source_kind)
        if default is None:
            raise DemoError(f"model {model!r} takes {manifest.input_spec.source_kind} CSI; "
                            "give recordings with --data")
        data = samples_dir() / default
    files = _recordings(data)
    device = _device_of(files)
    presence_only = device not in (manifest.input_spec.source_kind, "recording")
    host, http_port = parse_http(http or DEFAULT_HTTP)
    problem = _bind_error(host, http_port)
    if problem is not None and getattr(problem, "errno", None) != errno.EADDRINUSE:
        raise DemoError(f"--http {http or DEFAULT_HTTP}: cannot listen there "
                        f"({problem.strerror or problem})")
    if not _free(host, http_port):
        if http is not None:  # asked for explicitly: moving elsewhere would hide it
            raise DemoError(f"--http {http}: port {http_port} is taken (leave --http out and "
                            "the demo picks a free port)")
        taken, http_port = http_port, _free_port()
        say(f"port {taken} is taken; the dashboard uses {http_port} instead")

    work = _work_folder(workdir)
    own_workdir = workdir is None
    failed = True

    def request_stop(signum: int, frame: object) -> None:
        children.stop_now = True

    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    try:
        # 1. Broker.
        binary = mosquitto_binary() if broker in ("auto", "mosquitto") else None
        if broker == "mosquitto" and binary is None:
            raise DemoError("--broker mosquitto, but no mosquitto binary is installed")
        broker_port = 1883
        if not _free("127.0.0.1", broker_port):
            broker_port = _free_port()
            say(f"port 1883 is taken (a system broker?); the demo broker uses {broker_port}")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        protocol: dict[str, str] = {}
        if binary is not None:
            conf = work / "mosquitto.conf"
            conf.write_text(demo_broker_config(broker_port, work / "broker-data"))
            children.start("broker", [binary, "-c", str(conf)], env, work / "broker.log")
            broker_name = f"mosquitto ({binary})"
        else:
            children.start("broker", [sys.executable, "-m", "csi_cloud.embedded_broker",
                                      "--port", str(broker_port)], env, work / "broker.log")
            broker_name = "embedded Python broker (amqtt, MQTT 3.1.1)"
            protocol = {"CSI_CLOUD_MQTT_PROTOCOL": "3.1.1",
                        "CSI_CLOUD_SHARED_SUBSCRIPTION": "false",
                        "CSI_EDGE_MQTT_PROTOCOL": "3.1.1"}
        _wait_port(broker_port, children, 15)
        broker_url = f"mqtt://127.0.0.1:{broker_port}"
        say(f"broker: {broker_name} on {broker_url}")

        # 2. Cloud.
        token = secrets.token_urlsafe(18)
        served = _demo_models(bundle.parent, work)
        cloud_env = {**env, **protocol, "CSI_CLOUD_TOKEN": token,
                     "CSI_CLOUD_DEFAULT_MODEL": manifest.id,
                     "CSI_CLOUD_JOBS_DIR": str(work / "jobs")}
        if presence_only:
            cloud_env["CSI_CLOUD_PRESENCE_HOLD_S"] = str(PRESENCE_DEMO_HOLD_S)
        children.start("cloud", [
            sys.executable, "-m", "csi_cloud.cli", "cloud", "--models", str(served),
            "--broker", broker_url, "--http", f"{host}:{http_port}",
            "--db", f"sqlite:///{work / 'demo.db'}", "--recordings", str(work / "recordings"),
            "--client-id", "csi-demo-cloud", "--log-level", "WARNING"], cloud_env,
            work / "cloud.log")
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http_port}"
        _wait_ready(f"{base}/readyz", children, 90)

        # 3. Edges: one process, one stream per AP.
        sessions = _presence_sessions(data, aps, work) if presence_only else None
        found = None if presence_only else _rooms(data, files, manifest.labels, aps, work)
        rooms, left_out = found if found is not None else ([], 0)
        sources = sessions or [r.folder for r in rooms] or \
            [files[k % len(files)].resolve() for k in range(aps)]
        streams = []
        for k, source in enumerate(sources):
            streams += ["--stream", f"demo/ap{k + 1}=file://{source}"]
        mode = ["--presence-only"] if presence_only else []
        plays = [r.plays for r in rooms] or [[source] for source in sources]
        truth = None if presence_only else _truth_keeper(base, token, manifest, data, plays)
        children.start("edge", [
            sys.executable, "-m", "csi_edge.cli", "edge", "--model", str(bundle), *mode,
            "--broker", broker_url, "--speed", "real", "--loop", "--spool-dir",
            str(work / "spool"), "--status-interval", "2", "--cloud-url", base, "--log-level",
            "WARNING", *streams], {**env, **protocol, "CSI_EDGE_MODELS_DIR": str(work / "fetched"),
                                   # each recording played a new epoch: a fresh context
                                   # (and truth) for each
                                   "CSI_EDGE_LOOP_NEW_EPOCH": "true"},
            work / "edge.log")

        raw = None if presence_only else \
            (manifest.metrics.get("test_split") or {}).get("native_bytes_per_s")
        say(f"dashboard: {base}/   API: {base}/docs   token: {token}")
        if presence_only:
            say(f"{aps} AP(s) replaying {len(files)} {device} recording(s) from {data}: model "
                f"{manifest.name} takes {manifest.input_spec.source_kind} CSI, so presence "
                f"only (motion scores, no activity; presence held {PRESENCE_DEMO_HOLD_S:g} s); "
                f"logs in {work}")
            for k, session in enumerate(sessions or []):
                names = [link.name.split("-", 2)[2] for link in sorted(session.iterdir())]
                say(f"  demo/ap{k + 1} alternates: {' then '.join(names)}")
        elif rooms:
            say(f"{aps} AP(s), one per person of the recordings in {data}, each playing "
                f"that person's recordings in turn, with model {manifest.name} "
                f"({manifest.id[:12]}); logs in {work}")
            for k, room in enumerate(rooms):
                names = [link.name.split("-", 1)[1] for link in room.plays]
                say(f"  demo/ap{k + 1} ({room.who}) alternates: {' then '.join(names)}")
            if left_out:
                people = "person" if left_out == 1 else "people"
                say(f"  ({left_out} more {people} in the recordings: --aps {aps + left_out} "
                    "replays every one)")
        else:
            say(f"{aps} AP(s), each looping one of the {len(files)} recording(s) in {data}, "
                f"with model {manifest.name} ({manifest.id[:12]}); logs in {work}")
            for k, source in enumerate(sources):
                say(f"  demo/ap{k + 1} loops {source.parent.name}/{source.name}")
            if aps < len(files):
                say(f"  ({len(files) - aps} not replayed: --aps {len(files)} replays every one)")
        if truth is not None and truth.truths:
            say(f"{len(truth.truths)} AP(s) replay labelled recordings: the truth is posted as "
                "labels (the dashboard shows it beside each prediction) and each line ends with "
                "it and the share of seconds predicted right so far")
        say("Ctrl-C stops everything.")
        _watch(base, children, duration_s, raw, say, truth)
        failed = False
        return 0
    except _StopRequestedError:
        failed = False
        return 0
    finally:
        say("stopping ...")
        children.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_workdir and not failed:
            shutil.rmtree(work, ignore_errors=True)
        elif failed:
            say(f"the logs are kept in {work}")
        say("stopped")


def _silence(out: Any) -> None:
    """Point a closed output at /dev/null, so the interpreter's last flush stays quiet."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _wait_port(port: int, children: _Children, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children.check()
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise children.failure("broker", f"the broker did not listen on port {port} within "
                                     f"{timeout_s:.0f} s")


def _wait_ready(url: str, children: _Children, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children.check()
        try:
            _get(url, 1.0)
            return
        except (OSError, urllib.error.URLError, ValueError):
            time.sleep(0.3)
    raise children.failure("cloud", f"the cloud service was not ready at {url} within "
                                    f"{timeout_s:.0f} s")


def _truth_keeper(base: str, token: str, manifest: Any, data: Path,
                  plays: list[list[Path]]) -> Any:
    """What each recording an AP plays shows, where the names say (see :mod:`.demo_truth`);
    an AP with a recording whose name says nothing gets no truth."""
    from .demo_truth import TruthKeeper, truth_of

    truths = {}
    for k, recordings in enumerate(plays):
        found = [truth_of(path, data, manifest.labels) if path.is_file() else None
                 for path in recordings]
        known = [t for t in found if t is not None]
        if known and len(known) == len(found):
            truths[f"demo/ap{k + 1}"] = known
    return TruthKeeper(base, token, manifest.input_spec.segment_s, truths)


def _watch(base: str, children: _Children, duration_s: float | None, raw: float | None,
           say: Any, truth: Any = None) -> None:
    """A line per AP whenever its latest prediction changes."""
    seen: dict[str, int] = {}
    started = time.monotonic()
    while not children.stop_now:
        if duration_s is not None and time.monotonic() - started >= duration_s:
            return
        children.check()
        try:
            page = _get(f"{base}/api/v1/aps")
        except (OSError, urllib.error.URLError, ValueError):
            page = {"data": []}
        for ap in page.get("data", []):
            p = ap.get("prediction")
            name = f"{ap['site']}/{ap['ap']}"
            if not p or seen.get(name) == p["seq"]:
                continue
            seen[name] = p["seq"]
            rate = (ap.get("counters") or {}).get("payload_bytes_per_s", 0.0)
            identity = (f"  {p['identity']:<8s} {p['identity_confidence']:.2f}"
                        if p.get("identity") else "")
            versus = f" (raw CSI {raw / 1000:.1f} kB/s)" if raw else ""
            activity = (f"{p['activity']:<11s} {p['activity_confidence']:.2f}{identity}  "
                        if p.get("activity") else "")
            if truth is not None and name in truth.truths:
                truth.observe(name, p)
                truth.count(name, _recent(base, ap["site"], ap["ap"]) if len(page["data"]) <= 20
                            else [p])
            labelled = truth.text(name, p) if truth is not None else ""
            say(f"{name:<10s} seq {p['seq']:>5d}  {_presence_text(p)}  {activity}"
                f"{rate:6.1f} B/s{versus}  level {p['rate_level']}  gaps {ap.get('gaps', 0)}"
                f"{labelled}")
        for _ in range(10):
            if children.stop_now:
                return
            time.sleep(0.2)


def _recent(base: str, site: str, ap: str) -> list[dict[str, Any]]:
    """The AP's last predictions (every second, not only the latest the lines show)."""
    query = urllib.parse.urlencode({"site": site, "ap": ap, "limit": 100})
    try:
        return list(_get(f"{base}/api/v1/predictions?{query}").get("data", []))
    except (OSError, urllib.error.URLError, ValueError):
        return []


def _presence_text(p: dict[str, Any]) -> str:
    """``occupied  motion +3.2`` (or calibrating) for a demo line."""
    presence = p.get("presence")
    score = p.get("motion_score")
    if presence is None or score is None:
        return f"{'calibrating':<8s} {'':<14s}"
    state = "motion" if p.get("motion") else "still"
    return f"{'occupied' if presence else 'empty':<8s} {state:<6s} {score:+5.1f}  "
