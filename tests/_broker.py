"""A real Mosquitto broker on a free port, restartable, for tests.

Its persistence and queue settings are the deployment's own (``deploy/mosquitto/mosquitto.conf``:
``autosave_interval``, ``max_queued_messages``, ``max_queued_bytes``), so a
test of a broker restart or of a queue measures what a deployment gets. Clients are anonymous
and free to choose their client id (the deployment's ``use_username_as_clientid`` needs user
names: tests/test_mosquitto_acl.py runs the full deployment config).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from csi_edge.lifetime import preexec_die_with

__all__ = ["DEPLOY_CONF", "Mosquitto", "deploy_settings", "free_port", "mosquitto_binary"]

DEPLOY_CONF = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "mosquitto.conf"
# Not max_packet_size: tests send oversized payloads on purpose, to see the cloud refuse them.
_DEPLOYED = ("autosave_interval", "max_queued_messages", "max_queued_bytes")


def deploy_settings() -> dict[str, str]:
    """The persistence and queue settings of the deployment's mosquitto.conf."""
    out: dict[str, str] = {}
    for line in DEPLOY_CONF.read_text().splitlines():
        key, _, value = line.strip().partition(" ")
        if key in _DEPLOYED:
            out[key] = value.strip()
    missing = set(_DEPLOYED) - set(out)
    if missing:
        raise RuntimeError(f"{DEPLOY_CONF} lacks {sorted(missing)}")
    return out


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """``mosquitto -c`` on 127.0.0.1:port with on-disk persistence (sessions survive restart).

    ``extra`` lines go into the config file (ACLs, password files ...); ``preexec`` runs in
    the child before mosquitto starts (a bench pins it to a CPU).
    ``settings`` override the deployment's persistence and queue settings (None: Mosquitto's
    default). ``stop()`` is a clean stop (SIGTERM: the persistence file is written), ``kill()``
    a crash (SIGKILL: only the last autosave survives).
    """

    def __init__(self, folder: Path, port: int | None = None, extra: str = "",
                 settings: dict[str, str | None] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed")
        self.binary = binary
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config = folder / "mosquitto.conf"
        # The deployment's persistence and queue settings, ``settings`` overriding them (a
        # value of None leaves a setting at Mosquitto's default).
        merged: dict[str, str | None] = {**deploy_settings(), **(settings or {})}
        self.settings = {k: v for k, v in merged.items() if v is not None}
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {folder}/\n"
            + "".join(f"{k} {v}\n" for k, v in self.settings.items())
            # Started as root, mosquitto drops to user ``mosquitto``, which cannot write the
            # test's folder: the sessions would silently not survive a restart.
            + ("user root\n" if os.geteuid() == 0 else "")
            + f"{extra}\n")
        self.log = folder / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.preexec = preexec

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        with self.log.open("ab") as log:
            # A broker of the tests stops with the run, however the run ends (the ``preexec``
            # of a test replaces it).
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT,
                                         preexec_fn=self.preexec or preexec_die_with(os.getpid()))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        """Stop cleanly (SIGTERM: persistence is written)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        if "Error saving in-memory database" in log:
            # A restart would lose every session: tests relying on it would pass or fail by race.
            raise RuntimeError(f"mosquitto could not write its persistence file:\n{log[-600:]}")

    def kill(self) -> None:
        """Crash (SIGKILL): nothing is written; a restart loads the last autosave."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
