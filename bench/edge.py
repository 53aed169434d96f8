"""Edge agent cost: CPU and memory per segment, concurrent AP streams per core, bytes per AP.

    python bench/edge.py [--quick] [--out bench/results/edge.json]

Everything runs against a Mosquitto broker that the bench starts on a free port (temp config:
``listener PORT 127.0.0.1``, ``allow_anonymous true``) pinned to CPU 1; agents are ``csi edge``
subprocesses (the real CLI) pinned to CPU 0. A paho-mqtt monitor (on CPU 1) subscribes to
``csi/v1/+/+/status`` and ``csi/v1/+/+/seg`` and timestamps every message. Four parts:

1. ``cpu``: one agent streams Nexmon 80 MHz recordings at ``--speed max`` (the full
   ``../shared/data/fition`` folder when present, else the committed samples repeated), one
   stream, level 1. CPU (user + sys) and peak RSS of the child come from ``os.wait4``. CPU per
   segment is given with start-up (total / segments) and without it (difference against a run
   over one 10 s sample file, divided by the difference in segments); the encoder share comes
   from the agent's own counters (``encoder_s / segments_encoded``, ONNX + entropy coding).
2. ``streams``: one agent process on one core runs N real-time streams (level 1, status every
   5 s), each looping one sample recording rotated by a different offset (8 files x 8
   rotations, timestamps rewritten so the loop stays continuous). After every stream is online
   and a warm-up, a window is measured: CPU of the agent from /proc, per-stream counters from
   the status messages, and end-to-end latency of every segment message (arrival at the
   monitor minus the capture time of the end of its last segment). N is sustained when the
   agent uses < 90 % of the core, the segments encoded (summed over streams) are >= 95 % of
   what the recordings' natural segment rates give (gaps and dropped empty segments make that
   0.8-1.0 segments/s; each stream >= 50 %), every spool stays near empty (<= 2k+1 segments for
   k segments per message), the median latency is <= 1 s, every stream gets a message through
   within 1 s, and 99 % of messages arrive within k + 1 + (longest gap in the recordings,
   2.9 s) + 0.5 s of capture (a message short of k segments is held k + 1 s; the segment
   before a gap completes when the gap ends).
   N grows along a ladder until one fails.
3. ``bytes``: one agent, four real-time streams over the committed samples (no loop), one per
   rate level 0..3, default settings, each stream's connection through a counting TCP proxy
   (``bench/wire_count.py``) to the broker: every MQTT packet both ways (PUBLISH, PUBACK,
   status, pings, CONNECT ...) measured on the wire. Steady state per AP = segment exchanges
   and pings per second of recording + one measured status exchange per status heartbeat;
   TCP/IP reported apart (kernel TCP segment counts x header size, see ``tcpip``); the
   latency batching adds (first segment of a message) from the monitor; all compared with
   the raw Nexmon CSI stream it replaces (256 subcarriers x 4 bytes + 18-byte header per
   packet). ``--only-bytes`` runs this part alone (about 90 s) and ``--before GIT_REF`` runs
   that commit's agent beside it (``bytes_before``).
4. ``install``: a fresh venv, ``pip install '<repo>[edge]'`` (not editable), site-packages size
   by distribution, torch absent, ``import csi_edge.agent`` without torch, and one short
   ``csi edge`` run from that venv against the bench broker.

Options: ``--quick`` (~2 min: shorter windows and ladder), ``--ladder 50,100,...``,
``--window S``, ``--skip-install``, ``--profile N`` (cProfile of an in-process agent with N
real-time streams; the full run profiles 200 streams for 20 s, ``--quick`` only when the
stream target is missed). Runtime on the 2-core VM: about 6 min, ``--quick`` about 1.5 min.
``--quick`` writes to the temp folder unless ``--out`` is given, so it never replaces the full
run's ``bench/results/edge.json``. Each stream-count run records ``agent_core_other_utilisation``
(CPU used on the agent's core by other processes during the window); runs above 5 % are listed
in ``streams.disturbed_runs``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import itertools
import json
import os
import platform
import pstats
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wire_count import WireCounter, tcpip_header_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _broker import Mosquitto

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples" / "fition"
FULL = ROOT.parent / "shared" / "data" / "fition"
MODEL = ROOT / "models" / "fition"
PREFIX = "csi/v1"
AGENT_CPU, BROKER_CPU = 0, 1
TARGET_STREAMS = 200
STOP_WAIT_S = 30.0  # after SIGTERM (drain_timeout_s is 5 s), then SIGKILL
NEXMON_80MHZ_PACKET = 256 * 4 + 18  # UDP payload of one Nexmon CSI packet, 80 MHz
UDP_IPV4 = 8 + 20
# TCP/IP per segment: IPv4 20 + TCP 20 (low) or + 12 bytes of timestamp option (high, Linux).
TCP_LOW, TCP_HIGH = 40, 52


# -- helpers ---------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# The CPUs this bench may use, read before it pins itself (children are pinned explicitly).
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def two_cores() -> bool:
    return hasattr(os, "sched_setaffinity") and {AGENT_CPU, BROKER_CPU} <= set(CPUS)


def pinner(cpu: int) -> Callable[[], None] | None:
    """A preexec_fn pinning the child to ``cpu`` (None where pinning is unavailable)."""
    if not two_cores():
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    env.pop("CSI_EDGE_STREAMS", None)
    return env


def csi_command() -> list[str]:
    script = Path(sys.executable).parent / "csi"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from csi_cloud.cli import main; main()"]


def proc_cpu_s(pid: int) -> float:
    """user + sys CPU seconds of a live process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_busy_s(cpu: int) -> float:
    """Busy seconds of one CPU since boot (all processes), from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            ticks = [int(v) for v in line.split()[1:]]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    return 0.0


def proc_rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


@dataclass
class Exit:
    code: int
    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    maxrss_mb: float


def wait_child(proc: subprocess.Popen[bytes], started: float, timeout_s: float) -> Exit:
    """Reap ``proc`` with os.wait4 (its own rusage); SIGKILL it ``timeout_s`` from now.

    ``wall_s`` counts from ``started``."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Exit(proc.returncode, time.monotonic() - started, usage.ru_utime + usage.ru_stime,
                usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024)


def raise_nofile() -> dict[str, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft": soft, "hard": hard}


def machine_info() -> dict[str, Any]:
    import numpy as np
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mosquitto = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(CPUS) or None,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "mosquitto": (mosquitto.stdout or mosquitto.stderr).splitlines()[0].strip(),
        "agent_cpu": AGENT_CPU if two_cores() else None,
        "broker_and_monitor_cpu": BROKER_CPU if two_cores() else None,
    }


# -- broker and monitor ---------------------------------------------------------------------


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(found, os.X_OK):
        raise SystemExit("mosquitto is not installed")
    return found


class Broker(Mosquitto):
    """The harness's Mosquitto (tests/_broker.py) pinned to the broker CPU, queueing up to
    100 000 messages per session, no byte limit."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, settings={"max_queued_messages": "100000",
                                           "max_queued_bytes": None, "autosave_interval": None},
                         preexec=pinner(BROKER_CPU))

    def cpu_s(self) -> float:
        assert self.proc is not None
        return proc_cpu_s(self.proc.pid)


@dataclass
class StreamLog:
    """What the monitor saw of one stream."""

    status: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    # (arrival, capture end of the message's last segment, segments, payload bytes)
    messages: list[tuple[float, float, int, int]] = field(default_factory=list)


class Monitor:
    """paho-mqtt subscriber to every stream's status and segment messages."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        from csi_edge.codec import decode_payload

        self._decode = decode_payload
        self.lock = threading.Lock()
        self.streams: dict[str, StreamLog] = defaultdict(StreamLog)
        self.bad_payloads = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"edge-bench-{os.getpid()}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"{PREFIX}/+/+/status", 1), (f"{PREFIX}/+/+/seg", 0)])
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        parts = msg.topic.split("/")
        name, kind = f"{parts[-3]}/{parts[-2]}", parts[-1]
        if kind == "status":
            try:
                body = json.loads(msg.payload)
            except ValueError:
                return
            with self.lock:
                self.streams[name].status.append((now, body))
        elif kind == "seg":
            try:
                payload = self._decode(bytes(msg.payload))
            except Exception:
                self.bad_payloads += 1
                return
            n = len(payload.segments)
            end = (payload.timestamp_ms + n * 1000) / 1000  # 1 s segments (bundle fition)
            with self.lock:
                self.streams[name].messages.append((now, end, n, len(msg.payload)))

    def get(self, name: str) -> StreamLog:
        with self.lock:
            return self.streams[name]

    def online(self, names: Sequence[str], since: float) -> int:
        with self.lock:
            return sum(1 for n in names if any(
                body.get("online") and body.get("time", 0) >= since
                for _, body in self.streams[n].status))

    def final_status(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            statuses = self.streams[name].status
            return statuses[-1][1] if statuses else None

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- recordings ------------------------------------------------------------------------------


_PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 10**6), b"\xa1\xb2\xc3\xd4": (">", 10**6),
               b"\x4d\x3c\xb2\xa1": ("<", 10**9), b"\xa1\xb2\x3c\x4d": (">", 10**9)}


def rotate_pcap(src: Path, dst: Path, fraction: float) -> None:
    """Write ``src`` starting ``fraction`` of the way in, the skipped packets moved to the end
    with their times shifted so the file (and a loop of it) stays continuous."""
    data = src.read_bytes()
    order, scale = _PCAP_MAGIC[data[:4]]
    records: list[tuple[int, bytes]] = []  # (time in ticks, record without its timestamp)
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, incl, _orig = struct.unpack_from(f"{order}IIII", data, pos)
        end = pos + 16 + incl
        if end > len(data):
            break
        records.append((sec * scale + frac, data[pos + 8:end]))
        pos = end
    k = int(len(records) * fraction)
    ticks = [t for t, _ in records]
    step = int(statistics.median(b - a for a, b in itertools.pairwise(ticks)))
    shift = ticks[-1] + step - ticks[0]
    rotated = records[k:] + [(t + shift, rest) for t, rest in records[:k]]
    out = bytearray(data[:24])
    for t, rest in rotated:
        out += struct.pack(f"{order}II", t // scale, t % scale) + rest
    dst.write_bytes(bytes(out))


def sample_files() -> list[Path]:
    files = sorted(SAMPLES.rglob("*.pcap"))
    if not files:
        raise SystemExit(f"no sample recordings under {SAMPLES}")
    return files


def recording_stats(files: Sequence[Path]) -> dict[str, Any]:
    """Stream duration as the agent's file source plays it (each file's span plus one frame
    interval), frames kept for the stream, all CSI packets, and segments per file."""
    import numpy as np

    from csi_edge import read_recording
    from csi_edge.bundle import load_manifest
    from csi_edge.preprocess import Preprocessor
    from csi_edge.readers._pcap import read_udp_payloads

    spec = load_manifest(MODEL, verify=False).input_spec
    duration = max_gap = 0.0
    frames = packets = segments = 0
    per_file: dict[str, float] = {}
    for path in files:
        rec = read_recording(path)
        t = rec.timestamp
        step = float(np.median(np.diff(t))) if t.size > 1 else 0.02
        span = float(t[-1] - t[0]) + step
        n = len(Preprocessor(spec).push(rec))
        duration += span
        max_gap = max(max_gap, float(np.diff(t).max()) if t.size > 1 else 0.0)
        frames += len(rec)
        segments += n
        packets += len(read_udp_payloads(path).timestamps)
        per_file[path.name] = n / span
    return {"files": len(files), "duration_s": duration, "max_gap_s": max_gap, "frames": frames,
            "csi_packets": packets, "segments": segments, "segments_per_s_by_file": per_file}


# -- part 1: CPU and memory per segment --------------------------------------------------------


def run_max(broker: Broker, monitor: Monitor, source: Path, site: str, work: Path,
            level: int = 1) -> dict[str, Any]:
    spool = Path(tempfile.mkdtemp(prefix="spool-", dir=work))
    cmd = [*csi_command(), "edge", "--source", f"file://{source}", "--speed", "max",
           "--no-loop", "--site", site, "--ap", "ap", "--broker", broker.url, "--spool-dir",
           str(spool), "--level", str(level), "--model", str(MODEL), "--log-level", "ERROR"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=pinner(AGENT_CPU), env=child_env())
    result = wait_child(proc, started, 600)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    shutil.rmtree(spool, ignore_errors=True)
    status = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the final (offline) status, published before exit
        status = monitor.final_status(f"{site}/ap")
        if status is not None and not status.get("online"):
            break
        time.sleep(0.05)
    if result.code != 0 or status is None:
        raise SystemExit(f"agent run failed (exit {result.code}): {stderr[-2000:]}")
    counters = status["counters"]
    return {"exit": result.code, "wall_s": result.wall_s, "cpu_s": result.cpu_s,
            "user_s": result.user_s, "sys_s": result.sys_s, "maxrss_mb": result.maxrss_mb,
            "segments": counters["segments_encoded"], "segments_sent": counters["segments_sent"],
            "frames_in": counters["frames_in"], "encoder_s": counters["encoder_s"]}


def long_input(work: Path, quick: bool) -> tuple[Path, str]:
    if FULL.is_dir() and any(FULL.rglob("*.pcap")) and not quick:
        return FULL, f"{FULL} ({sum(1 for _ in FULL.rglob('*.pcap'))} recordings)"
    folder = work / "samples-repeated"
    folder.mkdir(exist_ok=True)
    repeats = 10 if quick else 50
    for r in range(repeats):
        for path in sample_files():
            (folder / f"r{r:02d}_{path.name}").symlink_to(path)
    return folder, f"committed samples x {repeats} ({repeats * len(sample_files())} files)"


def part_cpu(broker: Broker, monitor: Monitor, work: Path, repeats: int,
             quick: bool) -> dict[str, Any]:
    big, big_what = long_input(work, quick)
    tiny = sample_files()[0]
    runs: dict[str, list[dict[str, Any]]] = {"long": [], "tiny": []}
    for r in range(repeats):
        for name, source in (("tiny", tiny), ("long", big)):
            run = run_max(broker, monitor, source, f"cpu{name}{r}", work)
            runs[name].append(run)
            log(f"cpu {name:4s} run {r}: {run['segments']} segments, {run['cpu_s']:.2f} s CPU, "
                f"{run['wall_s']:.2f} s wall, peak RSS {run['maxrss_mb']:.0f} MB")

    def med(name: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[name]))

    seg_long, seg_tiny = med("long", "segments"), med("tiny", "segments")
    cpu_long, cpu_tiny = med("long", "cpu_s"), med("tiny", "cpu_s")
    marginal_ms = 1000 * (cpu_long - cpu_tiny) / (seg_long - seg_tiny)
    encoder_ms = 1000 * med("long", "encoder_s") / seg_long
    return {
        "what": "one csi edge process, one stream, --speed max, level 1, pinned to one core; "
                "user+sys CPU and ru_maxrss from os.wait4 (median of runs)",
        "input_long": big_what,
        "input_tiny": f"{tiny.relative_to(ROOT)} (for the start-up cost)",
        "segments": seg_long,
        "frames": med("long", "frames_in"),
        "cpu_s": cpu_long,
        "wall_s": med("long", "wall_s"),
        "cpu_ms_per_segment_with_startup": 1000 * cpu_long / seg_long,
        "cpu_ms_per_segment_without_startup": marginal_ms,
        "startup_cpu_s": cpu_tiny - seg_tiny * marginal_ms / 1000,
        "encoder_ms_per_segment": encoder_ms,
        "encoder_share_of_marginal": encoder_ms / marginal_ms,
        "other_ms_per_segment": marginal_ms - encoder_ms,
        "other_is": "pcap read + Nexmon decode, preprocessing, SQLite spool, MQTT publish, "
                    "asyncio",
        "peak_rss_mb": max(r["maxrss_mb"] for r in runs["long"]),
        "peak_rss_mb_tiny": max(r["maxrss_mb"] for r in runs["tiny"]),
        "real_time_factor_one_core": seg_long / max(cpu_long - cpu_tiny, 1e-9),
        "runs": runs,
    }


# -- part 2: concurrent real-time streams ----------------------------------------------------


def toml_str(value: str) -> str:
    return json.dumps(value)


def write_config(path: Path, broker: Broker | str, spool: Path,
                 streams: Sequence[dict[str, Any]], status_interval_s: float | None) -> None:
    """A TOML config; ``status_interval_s`` (the status heartbeat) None keeps the agent's
    default; ``broker`` a Broker or a URL (the counting proxy)."""
    url = broker if isinstance(broker, str) else broker.url
    lines = [f"broker = {toml_str(url)}", f"model = {toml_str(str(MODEL))}",
             f"spool_dir = {toml_str(str(spool))}", 'speed = "real"', "level = 1"]
    if status_interval_s is not None:
        lines.append(f"status_heartbeat_s = {status_interval_s}")
    lines.append("")
    for s in streams:
        lines += ["[[streams]]", f"site = {toml_str(s['site'])}", f"ap = {toml_str(s['ap'])}",
                  f"source = {toml_str(s['source'])}"]
        if "level" in s:
            lines.append(f"level = {s['level']}")
        lines.append("")
    path.write_text("\n".join(lines))


class RotatedFiles:
    """Sample recordings rotated by 0, 1/8, ... 7/8 of their length, made on demand."""

    def __init__(self, folder: Path, rotations: int = 8) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files = sample_files()
        self.rotations = rotations
        self.natural: dict[Path, float] = {}

    def get(self, k: int) -> tuple[Path, Path]:
        """(rotated file, original) for stream ``k``."""
        src = self.files[k % len(self.files)]
        r = (k // len(self.files)) % self.rotations
        dst = self.folder / f"{src.stem}_rot{r}.pcap"
        if not dst.exists():
            rotate_pcap(src, dst, r / self.rotations)
        return dst, src


def evaluate_window(monitor: Monitor, names: Sequence[str], t_a: float, t_b: float,
                    natural: dict[str, float], k_live: int, max_gap_s: float) -> dict[str, Any]:
    """Keep-up checks over [t_a, t_b] (wall clock, seconds since the epoch).

    Per stream: counters from the first and last status inside the window, and the latency of
    every segment message that arrived in it. The encode rate is compared with the natural
    segment rate of the stream's recording (segments of one pass over its duration): gaps in
    a recording make that 0.8-1.0 segments/s, and over a short window one stream's count
    depends on where its gap falls, so the rate check is on the sum over streams, with a
    per-stream floor. The real-time check is the latency: its median over all messages must
    stay low (an overloaded event loop delays every stream alike), every stream must get at
    least one message through quickly (none starves), and the 99th percentile must stay within
    what the message grouping allows (a message short of k segments is held k + 1 s, and the
    segment before a gap in a recording completes only when the gap ends). The maximum and a
    per-stream median are only reported: one late message out of thousands (a GC pause, an
    SQLite checkpoint, another job on the core) is not a stream falling behind, and over a
    short window a stream has few messages, several of them held.
    """
    ratios, rates, buffered, behind, lat_all, lat_max, lat_med, lat_min = ([] for _ in range(8))
    encoded_sum = expected_sum = 0.0
    missing = 0
    for name in names:
        stream = monitor.get(name)
        within = [(t, b) for t, b in stream.status if b.get("online") and t_a <= b["time"] <= t_b]
        if len(within) < 2:
            missing += 1
            continue
        (_, first), (_, last) = within[0], within[-1]
        c0, c1 = first["counters"], last["counters"]
        span = last["time"] - first["time"]
        encoded = c1["segments_encoded"] - c0["segments_encoded"]
        sent = c1["segments_sent"] - c0["segments_sent"]
        rates.append(encoded / span)
        ratios.append(encoded / span / natural[name])
        encoded_sum += encoded
        expected_sum += span * natural[name]
        buffered.append(c1["segments_buffered"])
        behind.append(encoded - sent)
        lat = [arrival - end for arrival, end, _, _ in stream.messages if t_a <= arrival <= t_b]
        if lat:
            lat_all += lat
            lat_max.append(max(lat))
            lat_med.append(statistics.median(lat))
            lat_min.append(min(lat))
        else:
            missing += 1
    lat_limit = k_live + 1 + max_gap_s + 0.5
    lat_fast_limit = 1.0
    spool_limit = 2 * k_live + 1
    aggregate = encoded_sum / expected_sum if expected_sum else 0.0

    def q(values: Sequence[float], p: float) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    checks = {
        "every_stream_reported": missing == 0,
        "encode_rate_sum_ge_95pct_of_natural": aggregate >= 0.95,
        "every_stream_rate_ge_50pct_of_natural": bool(ratios) and min(ratios) >= 0.5,
        "spool_near_empty": bool(buffered) and max(buffered) <= spool_limit,
        "latency_median_le_limit": bool(lat_all) and statistics.median(lat_all)
        <= lat_fast_limit,
        "every_stream_fastest_latency_le_limit": bool(lat_min) and max(lat_min)
        <= lat_fast_limit,
        "latency_p99_le_limit": bool(lat_all) and (q(lat_all, 0.99) or 0.0) <= lat_limit,
    }

    return {
        "streams_missing_data": missing,
        "segments_encoded_in_window": encoded_sum,
        "encode_rate_sum_vs_natural": aggregate,
        "encode_rate_per_stream": {"min": min(rates, default=None),
                                   "median": q(rates, 0.5), "max": max(rates, default=None)},
        "encode_rate_vs_natural_per_stream": {"min": min(ratios, default=None),
                                              "median": q(ratios, 0.5),
                                              "max": max(ratios, default=None)},
        "segments_buffered_max": max(buffered, default=None),
        "encoded_minus_sent_max": max(behind, default=None),
        "latency_s": {"median": q(lat_all, 0.5), "p95": q(lat_all, 0.95),
                      "p99": q(lat_all, 0.99), "max": max(lat_max, default=None),
                      "worst_stream_median": max(lat_med, default=None),
                      "worst_stream_fastest": max(lat_min, default=None)},
        "limits": {"latency_p99_s": lat_limit, "latency_median_s": lat_fast_limit,
                   "latency_fastest_message_per_stream_s": lat_fast_limit,
                   "segments_buffered": spool_limit,
                   "encode_rate_sum_vs_natural": 0.95, "encode_rate_per_stream_vs_natural": 0.5},
        "checks": checks,
        "keeps_up": all(checks.values()),
    }


def run_streams(n: int, broker: Broker, monitor: Monitor, files: RotatedFiles, work: Path,
                warmup_s: float, window_s: float, status_interval_s: float,
                max_gap_s: float) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"streams{n}-", dir=work))
    site = f"n{n}"
    streams, natural = [], {}
    for k in range(n):
        path, original = files.get(k)
        streams.append({"site": site, "ap": f"ap{k}", "source": f"file://{path}?loop=1"})
        natural[f"{site}/ap{k}"] = files.natural[original]
    config = run_dir / "edge.toml"
    write_config(config, broker, run_dir / "spool", streams, status_interval_s)
    names = [f"{site}/ap{k}" for k in range(n)]
    agent_log = run_dir / "agent.log"
    start_wall, started = time.time(), time.monotonic()
    with agent_log.open("wb") as out:
        proc = subprocess.Popen([*csi_command(), "edge", "--config", str(config), "--log-level",
                                 "WARNING"], stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=pinner(AGENT_CPU), env=child_env())
    result: dict[str, Any] = {"streams": n}
    try:
        deadline = time.monotonic() + 60 + 0.2 * n
        while monitor.online(names, start_wall) < n:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = agent_log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{monitor.online(names, start_wall)}/{n} streams online; "
                                   f"agent exit {proc.poll()}: {tail}")
            time.sleep(0.2)
        result["startup_s"] = time.monotonic() - started
        result["startup_cpu_s"] = proc_cpu_s(proc.pid)
        time.sleep(warmup_s)
        t_a, cpu_a, mq_a = time.time(), proc_cpu_s(proc.pid), broker.cpu_s()
        core_a = core_busy_s(AGENT_CPU)
        time.sleep(window_s)
        t_b, cpu_b, mq_b = time.time(), proc_cpu_s(proc.pid), broker.cpu_s()
        core_b = core_busy_s(AGENT_CPU)
        result["load_average"] = os.getloadavg()
        result["rss_mb"] = proc_rss_mb(proc.pid)
        time.sleep(0.5)  # let the last messages of the window arrive
    finally:
        stop_at = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        end = wait_child(proc, started, STOP_WAIT_S)
        result["stop_s"] = time.monotonic() - stop_at
        time.sleep(0.3)
        # Streams whose last status says offline: each publishes it when its MQTT session ends.
        result["streams_offline_after_stop"] = sum(
            1 for name in names if (monitor.final_status(name) or {}).get("online") is False)
    wall = t_b - t_a
    util = (cpu_b - cpu_a) / wall
    window = evaluate_window(monitor, names, t_a, t_b, natural, k_live=2, max_gap_s=max_gap_s)
    sustained = util < 0.9 and window["keeps_up"]
    result.update({
        "window_s": wall,
        "agent_cpu_utilisation": util,
        "agent_cpu_ms_per_stream_second": 1000 * (cpu_b - cpu_a) / (n * wall),
        "broker_cpu_utilisation": (mq_b - mq_a) / wall,
        # Other processes on the agent's core (other jobs on the machine): > ~0.05 means the
        # window was disturbed.
        "agent_core_other_utilisation": max(0.0, (core_b - core_a - (cpu_b - cpu_a)) / wall),
        "peak_rss_mb": end.maxrss_mb,
        "exit": end.code,
        "exit_note": (f"did not exit within {STOP_WAIT_S:g} s of SIGTERM: SIGKILL"
                      if end.code == -9 else "SIGTERM"),
        **window,
        "sustained": sustained,
    })
    errors = [line for line in agent_log.read_text(errors="replace").splitlines()
              if " ERROR " in line]
    result["agent_errors"] = errors[:5]
    if end.code == -9:  # did not stop in time after SIGTERM: keep what it said last
        result["agent_log_tail"] = agent_log.read_text(errors="replace").splitlines()[-20:]
    shutil.rmtree(run_dir / "spool", ignore_errors=True)
    return result


def part_streams(broker: Broker, monitor: Monitor, work: Path, ladder: Sequence[int],
                 warmup_s: float, window_s: float, status_interval_s: float) -> dict[str, Any]:
    files = RotatedFiles(work / "rotated")
    per_file = {p: recording_stats([p]) for p in files.files}
    stats = {p: r["segments_per_s_by_file"][p.name] for p, r in per_file.items()}
    max_gap = max(r["max_gap_s"] for r in per_file.values())
    files.natural = stats
    runs = []
    best = 0
    for n in ladder:
        log(f"streams: N={n} (warm-up {warmup_s:g} s, window {window_s:g} s)")
        try:
            run = run_streams(n, broker, monitor, files, work, warmup_s, window_s,
                              status_interval_s, max_gap)
        except RuntimeError as exc:
            run = {"streams": n, "sustained": False, "error": str(exc)[-2000:]}
        runs.append(run)
        if "error" in run:
            log(f"streams: N={n} failed: {run['error'][:300]}")
        else:
            log(f"streams: N={n}: agent CPU {100 * run['agent_cpu_utilisation']:.1f} % "
                f"({run['agent_cpu_ms_per_stream_second']:.3f} ms per stream-second), broker "
                f"{100 * run['broker_cpu_utilisation']:.1f} %, latency median "
                f"{run['latency_s']['median']:.2f} s p95 {run['latency_s']['p95']:.2f} s max "
                f"{run['latency_s']['max']:.2f} s, "
                f"rate/natural {run['encode_rate_sum_vs_natural']:.3f}, spool max "
                f"{run['segments_buffered_max']}, RSS {run['peak_rss_mb']:.0f} MB, stop "
                f"{run['stop_s']:.1f} s (exit {run['exit']}, {run['streams_offline_after_stop']} "
                f"streams said offline), other load on its core "
                f"{100 * run['agent_core_other_utilisation']:.0f} % -> "
                f"{'sustained' if run['sustained'] else 'NOT sustained'}")
        if not run["sustained"]:
            break
        best = n
    sustained_runs = [r for r in runs if r.get("sustained")]
    measured = [r for r in runs if "peak_rss_mb" in r]
    rss_per_stream = ((measured[-1]["peak_rss_mb"] - measured[0]["peak_rss_mb"])
                      / (measured[-1]["streams"] - measured[0]["streams"])
                      if len(measured) >= 2 else None)
    per_stream = (sustained_runs[-1]["agent_cpu_ms_per_stream_second"] if sustained_runs
                  else None)
    return {
        "what": "one csi edge process pinned to one core, N real-time streams (level 1, "
                f"status every {status_interval_s:g} s) each looping a rotated sample "
                "recording; broker and monitor on the other core",
        "criteria": "agent CPU < 90 % of the core; segments encoded in the window, summed "
                    "over streams, >= 95 % of what the recordings' natural segment rates give "
                    "(each stream >= 50 %); latency (message arrival minus capture end of its "
                    "last segment): median over all messages <= 1 s, every stream's fastest "
                    "message <= 1 s, 99th percentile <= k + 1 + longest recording gap + "
                    "0.5 s; every stream: segments_buffered <= 2k+1 (k = 2 "
                    "segments per message at level 1; a message short of k segments is held "
                    "k + 1 s; the segment before a gap completes when the gap ends)",
        "longest_recording_gap_s": max_gap,
        "natural_segments_per_s_by_file": {p.name: v for p, v in stats.items()},
        "ladder": list(ladder),
        "max_streams_sustained": best,
        "max_streams_sustained_is_lower_bound": bool(runs) and runs[-1].get("sustained", False),
        "cpu_ms_per_stream_second": per_stream,
        "projected_streams_at_90pct": int(900 / per_stream) if per_stream else None,
        "peak_rss_mb_per_stream": rss_per_stream,
        "target_streams": TARGET_STREAMS,
        "target_met": best >= TARGET_STREAMS,
        "disturbed_runs": [r["streams"] for r in runs
                           if r.get("agent_core_other_utilisation", 0.0) > 0.05],
        "runs": runs,
    }


# -- part 3: bytes per AP and rate level ---------------------------------------------------------


def _sum_kinds(conns: Sequence[Any]) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes and packets by MQTT packet kind, both directions, over ``conns``."""
    size: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    for conn in conns:
        for way in ("up", "down"):
            for kind, n in conn.bytes[way].items():
                size[kind] += n
            for kind, n in conn.packets[way].items():
                count[kind] += n
    return dict(size), dict(count)


def _tcp_window(conns: Sequence[Any]) -> dict[str, Any] | None:
    """TCP segments counted by the kernel between the first and the last PUBACK of a segment
    message of the longest connection: whole message exchanges, no set-up or tear-down."""
    conn = max(conns, key=lambda c: len(c.seg_acks), default=None)
    if conn is None or len(conn.seg_acks) < 3:
        return None
    (t0, tcp0, mqtt0, n0), (t1, tcp1, mqtt1, n1) = conn.seg_acks[0], conn.seg_acks[-1]
    if tcp0 is None or tcp1 is None:
        return None
    segs = (tcp1["segs_in"] - tcp0["segs_in"]) + (tcp1["segs_out"] - tcp0["segs_out"])
    return {"seconds": t1 - t0, "exchanges": n1 - n0, "mqtt_bytes": mqtt1 - mqtt0,
            "tcp_segments": segs, "tcp_segments_per_exchange": segs / (n1 - n0),
            "header_bytes_per_segment": tcpip_header_bytes(tcp1)}


def _latency(log: StreamLog) -> dict[str, float | None]:
    """Arrival at the monitor minus capture end of the message's last segment (``median``,
    ``p95``, ``max``), and of its first segment (``first_segment_median``: what batching k
    segments a message adds, about k - 1 segment lengths), s (1 s segments)."""
    lags = sorted(arrival - end for arrival, end, _, _ in log.messages)
    first = sorted(arrival - end + n - 1 for arrival, end, n, _ in log.messages)
    if not lags:
        return {"median": None, "p95": None, "max": None, "first_segment_median": None}
    return {"median": statistics.median(lags), "p95": lags[min(len(lags) - 1,
                                                                int(0.95 * len(lags)))],
            "max": lags[-1], "first_segment_median": statistics.median(first)}


def part_bytes(broker: Broker, monitor: Monitor, work: Path, files: Sequence[Path],
               site: str = "bytes", agent_src: Path | None = None,
               counter: WireCounter | None = None) -> dict[str, Any]:
    """Four real-time streams (levels 0..3) through the counting proxy (bench/wire_count.py);
    ``agent_src``: run the agent of that source tree instead (an earlier version)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{site}-", dir=work))
    folder = run_dir / "recordings"
    folder.mkdir()
    for path in files:
        (folder / path.name).symlink_to(path)
    stats = recording_stats(files)
    streams = [{"site": site, "ap": f"level{lv}", "source": f"file://{folder}", "level": lv}
               for lv in range(4)]
    own = counter is None
    counter = counter or WireCounter(broker.port).start()
    config = run_dir / "edge.toml"
    write_config(config, counter.url, run_dir / "spool", streams, None)
    agent_log = run_dir / "agent.log"
    env = child_env()
    if agent_src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(agent_src), env.get("PYTHONPATH", "")])
    log(f"bytes ({site}): 4 real-time streams (levels 0..3) over {len(files)} recordings, "
        f"{stats['duration_s']:.0f} s" + (f", agent from {agent_src}" if agent_src else ""))
    started = time.monotonic()
    with agent_log.open("wb") as out:
        proc = subprocess.Popen([*csi_command(), "edge", "--config", str(config), "--log-level",
                                 "WARNING"], stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=pinner(AGENT_CPU), env=env, cwd=run_dir)
    end = wait_child(proc, started, stats["duration_s"] + 120)
    time.sleep(0.5)
    if own:
        counter.stop()
    if end.code != 0:
        raise SystemExit(f"bytes run failed: {agent_log.read_text()[-2000:]}")
    duration = stats["duration_s"]
    raw = stats["frames"] / duration * NEXMON_80MHZ_PACKET
    raw_udp = stats["frames"] / duration * (NEXMON_80MHZ_PACKET + UDP_IPV4)
    by_client = counter.by_client()
    levels = []
    for lv in range(4):
        name = f"{site}/level{lv}"
        status = monitor.final_status(name)
        assert status is not None and not status["online"], f"no final status for {name}"
        c = status["counters"]
        heartbeat = float(status["status_interval_s"])
        conns = by_client[f"csi-edge-{site}-level{lv}"]
        size, count = _sum_kinds(conns)
        seg = size.get("PUBLISH seg", 0) + size.get("PUBACK seg", 0)
        n_seg = count.get("PUBLISH seg", 0)
        st = size.get("PUBLISH status", 0) + size.get("PUBACK status", 0)
        n_st = count.get("PUBLISH status", 0)
        ping = size.get("PINGREQ", 0) + size.get("PINGRESP", 0)
        setup = sum(v for k, v in size.items() if not k.startswith(("PUBLISH", "PUBACK", "PING")))
        status_msg = st / max(n_st, 1)
        # Steady state: segment messages and pings as measured per second of stream, the status
        # as one measured status exchange per heartbeat (the run is shorter than one).
        mqtt = (seg + ping) / duration + status_msg / heartbeat
        window = _tcp_window(conns)
        tcp_in_run = sum((cn.tcp or {}).get("segs_in", 0) + (cn.tcp or {}).get("segs_out", 0)
                         for cn in conns)
        header = window["header_bytes_per_segment"] if window else TCP_HIGH
        per_msg = window["tcp_segments_per_exchange"] if window else 3.0
        exchanges_per_s = n_seg / duration + 1 / heartbeat
        pings_per_s = count.get("PINGREQ", 0) / duration
        tcpip = header * (per_msg * exchanges_per_s + 2 * pings_per_s)
        levels.append({
            "level": lv,
            "segments": c["segments_encoded"],
            "segments_sent": c["segments_sent"],
            "messages": n_seg,
            "segments_per_message": c["segments_sent"] / max(n_seg, 1),
            "payload_bytes_per_segment": c["payload_bytes"] / max(c["segments_sent"], 1),
            "payload_bytes_per_s": c["payload_bytes"] / duration,
            "mqtt_segment_bytes_per_s": seg / duration,
            "mqtt_bytes_per_segment_message": seg / max(n_seg, 1),
            "mqtt_overhead_bytes_per_segment_message": (seg - c["payload_bytes"]) / max(n_seg, 1),
            "status_heartbeat_s": heartbeat,
            "status_messages_in_run": n_st,
            "status_bytes_per_message": status_msg,
            "status_bytes_per_s": status_msg / heartbeat,
            "ping_bytes_in_run": ping,
            "pings_in_run": count.get("PINGREQ", 0),
            "connection_bytes_in_run": setup,
            "mqtt_bytes_per_s": mqtt,
            "mqtt_bytes_per_s_in_run": sum(size.values()) / duration,
            "topic_alias_maximum": max((cn.topic_alias_maximum or 0 for cn in conns), default=0),
            "aliased_publishes": sum(cn.aliased_publishes for cn in conns),
            "agent_wire_counter_bytes_per_s": (c["wire_bytes"] + c["status_wire_bytes"])
            / duration,
            "tcp_window": window,
            "tcp_segments_in_run": tcp_in_run,
            "tcpip_bytes_per_s": tcpip,
            "tcpip_bytes_per_s_in_run": tcp_in_run * header / duration,
            "total_bytes_per_s": mqtt + tcpip,
            "bytes_by_kind_in_run": size,
            "packets_by_kind_in_run": count,
            "latency_s": _latency(monitor.get(name)),
            "reduction_vs_raw_csi": {"payload": raw / (c["payload_bytes"] / duration),
                                     "total": raw_udp / (mqtt + tcpip)},
            "encoder_ms_per_segment": c["encoder_ms_per_segment"],
        })
        lvl = levels[-1]
        log(f"bytes ({site}): level {lv}: payload {lvl['payload_bytes_per_s']:.1f} B/s, MQTT "
            f"{mqtt:.1f} B/s (segments {seg / duration:.1f}, status {status_msg:.0f} B every "
            f"{heartbeat:g} s), TCP/IP {tcpip:.1f} B/s")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "what": "one csi edge process, 4 streams at --speed real (one per rate level) over the "
                "same recordings, no loop, default settings, each stream on its own MQTT "
                "connection through a counting TCP proxy (bench/wire_count.py) to the broker: "
                "every MQTT packet both ways measured on the wire, per kind. Per second of "
                "recording (= wall time of a real-time replay). mqtt_bytes_per_s is the steady "
                "state: segment PUBLISH + PUBACK and pings as measured over the run, plus one "
                "measured status exchange per status heartbeat (the run is shorter than a "
                "heartbeat; connection set-up, the first and the final status are one-off: "
                "mqtt_bytes_per_s_in_run includes them)",
        "agent": "this tree" if agent_src is None else str(agent_src),
        "recordings": [str(p.relative_to(ROOT)) for p in files],
        "duration_s": duration,
        "frames_kept": stats["frames"],
        "csi_packets_in_files": stats["csi_packets"],
        "wall_s": end.wall_s,
        "raw_csi": {
            "packets_per_s": stats["frames"] / duration,
            "bytes_per_packet": NEXMON_80MHZ_PACKET,
            "bytes_per_s": raw,
            "bytes_per_s_with_udp_ipv4": raw_udp,
            "assumption": "Nexmon 80 MHz UDP payload = 18-byte header + 256 subcarriers x "
                          "4 bytes (int16 I/Q), for each frame the stream keeps; "
                          "'with_udp_ipv4' adds 8 + 20 bytes of UDP/IPv4 header per packet "
                          "(no Ethernet/802.11 framing)",
        },
        "tcpip": {
            "how": "TCP segments counted by the kernel (TCP_INFO segs_in + segs_out of the "
                   "proxy's socket to the agent) between the first and the last PUBACK of a "
                   "segment message, per exchange in that window (PUBLISH + PUBACK, "
                   "PINGREQ + PINGRESP), times the IPv4 + TCP "
                   "header (40 bytes, 52 with the timestamps option when negotiated), times "
                   "message exchanges per second (segment messages + one status per heartbeat) "
                   "plus 2 segments per keep-alive ping",
            "not_counted": "link-layer framing (Ethernet 38 B or 802.11 per frame), TCP "
                           "handshake; on loopback each write is one segment and ACKs are "
                           "delayed as on any link",
        },
        "levels": levels,
    }


# -- part 4: install size of the edge extra --------------------------------------------------


_SIZES = r"""
import json, sys, importlib.metadata as md, pathlib
site = pathlib.Path(sys.argv[1])
out = {}
for dist in md.distributions():
    size = 0
    for f in dist.files or ():
        p = pathlib.Path(dist.locate_file(f))
        if p.is_file() and site in p.resolve().parents:
            size += p.stat().st_size
    out[dist.metadata["Name"]] = size
print(json.dumps(out))
"""

_NO_TORCH = (
    "import sys, csi_edge.agent, csi_edge.cli, csi_edge.sources, csi_edge.spool\n"
    "from csi_edge.bundle import EdgeEncoder\n"
    "EdgeEncoder(sys.argv[1])\n"
    "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'csi_cloud'))\n"
    "print(bad); sys.exit(1 if bad else 0)\n"
)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def part_install(work: Path, broker: Broker, monitor: Monitor) -> dict[str, Any]:
    venv = work / "edge-venv"
    started = time.monotonic()
    log("install: fresh venv + pip install '.[edge]'")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    base_size = dir_size(site)
    pip = subprocess.run([str(py), "-m", "pip", "install", "--no-cache-dir", "--quiet",
                          f"{ROOT}[edge]"], capture_output=True, text=True)
    if pip.returncode != 0:
        return {"error": f"pip install failed: {pip.stderr[-3000:]}"}
    install_s = time.monotonic() - started
    sizes = json.loads(subprocess.run([str(py), "-c", _SIZES, str(site)], capture_output=True,
                                      text=True, check=True).stdout)
    total = dir_size(site)
    names = {n.lower().replace("_", "-") for n in sizes}
    no_torch = subprocess.run([str(py), "-c", _NO_TORCH, str(MODEL)], capture_output=True,
                              text=True, cwd=work)
    missing = [m for m in ("aiomqtt", "paho-mqtt") if m not in names]
    result: dict[str, Any] = {
        "what": "fresh venv (python -m venv), pip install --no-cache-dir '<repo>[edge]' "
                "(non-editable); sizes are apparent file sizes",
        "install_s": install_s,
        "site_packages_mb": total / 1e6,
        "site_packages_mb_without_pip_setuptools": (total - base_size) / 1e6,
        "distributions": len(sizes),
        "largest_mb": {k: round(v / 1e6, 2) for k, v in
                       sorted(sizes.items(), key=lambda kv: -kv[1])[:10]},
        "torch_installed": "torch" in names,
        "import_csi_edge_agent_without_torch": no_torch.returncode == 0,
        "import_check_output": (no_torch.stdout + no_torch.stderr).strip()[-500:],
        "missing_runtime_dependencies": missing,
    }
    result["agent_run_edge_extra_only"] = install_agent_run(venv, broker, monitor, work, "x")
    if missing:
        log(f"install: {missing} not installed by the edge extra; adding aiomqtt to retry")
        subprocess.run([str(py), "-m", "pip", "install", "--no-cache-dir", "--quiet",
                        "aiomqtt"], check=True, capture_output=True)
        result["site_packages_mb_with_aiomqtt"] = dir_size(site) / 1e6
        result["agent_run_with_aiomqtt"] = install_agent_run(venv, broker, monitor, work, "y")
    shutil.rmtree(venv, ignore_errors=True)
    log(f"install: {result['site_packages_mb']:.0f} MB site-packages, torch installed: "
        f"{result['torch_installed']}, missing: {missing}")
    return result


def install_agent_run(venv: Path, broker: Broker, monitor: Monitor, work: Path,
                      tag: str) -> dict[str, Any]:
    """One short speed-max run of the edge-only install's ``csi edge`` against the broker."""
    spool = Path(tempfile.mkdtemp(prefix="spool-", dir=work))
    site = f"install{tag}"
    run = subprocess.run([str(venv / "bin" / "csi"), "edge", "--source",
                          f"file://{sample_files()[0]}", "--speed", "max", "--site", site,
                          "--ap", "ap", "--broker", broker.url, "--spool-dir", str(spool),
                          "--model", str(MODEL), "--log-level", "ERROR"],
                         capture_output=True, text=True, timeout=120, cwd=work)
    time.sleep(0.3)
    status = monitor.final_status(f"{site}/ap")
    shutil.rmtree(spool, ignore_errors=True)
    return {"exit": run.returncode,
            "segments_sent": status["counters"]["segments_sent"] if status else 0,
            "stderr_tail": run.stderr.strip()[-400:]}


# -- profile -------------------------------------------------------------------------------------


def profile_worker(config: Path, seconds: float, out: Path) -> None:
    """In-process agent under cProfile for ``seconds`` (run as a pinned subprocess)."""
    from csi_edge.agent import EdgeAgent
    from csi_edge.settings import load_settings

    async def main() -> None:
        agent = EdgeAgent(load_settings(config))
        agent.check()
        loop = asyncio.get_running_loop()
        loop.call_later(seconds, agent.request_stop)
        await agent.run()

    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(main())
    profiler.disable()
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    out.write_text(buffer.getvalue())


def part_profile(n: int, broker: Broker, work: Path, seconds: float) -> dict[str, Any]:
    files = RotatedFiles(work / "rotated")
    run_dir = Path(tempfile.mkdtemp(prefix="profile-", dir=work))
    streams = [{"site": "prof", "ap": f"ap{k}", "source": f"file://{files.get(k)[0]}?loop=1"}
               for k in range(n)]
    config = run_dir / "edge.toml"
    write_config(config, broker, run_dir / "spool", streams, 5.0)
    out = run_dir / "profile.txt"
    log(f"profile: {n} streams in-process under cProfile for {seconds:g} s")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--profile-worker", str(config),
                             str(seconds), str(out)], preexec_fn=pinner(AGENT_CPU),
                            env=child_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    end = wait_child(proc, started, seconds + 180)
    text = out.read_text() if out.exists() else (proc.stderr.read().decode() if proc.stderr
                                                 else "")
    return {"streams": n, "seconds": seconds, "cpu_s": end.cpu_s, "exit": end.code,
            "top": text.splitlines()[:120]}


# -- main --------------------------------------------------------------------------------------


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        timings[name] = round(time.monotonic() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~2 min: short windows, small ladder")
    parser.add_argument("--out", type=Path, default=None,
                        help="[bench/results/edge.json; --quick: TMPDIR/edge-quick.json]")
    parser.add_argument("--ladder", type=str, default=None,
                        help="stream counts to try, comma separated")
    parser.add_argument("--window", type=float, default=None, help="measured window, s")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up before it, s")
    parser.add_argument("--status-interval", type=float, default=None,
                        help="status interval of the streams test, s [5; quick 2]")
    parser.add_argument("--repeat", type=int, default=None, help="runs of part 1")
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--only-bytes", action="store_true",
                        help="run only the bytes part (about 90 s) and replace it in --out")
    parser.add_argument("--before", type=str, default=None, metavar="GIT_REF",
                        help="bytes part: also run the agent of GIT_REF side by side (same "
                             "proxy, broker and recordings) as bytes_before")
    parser.add_argument("--profile", type=int, default=0,
                        help="also cProfile an in-process agent with this many streams")
    parser.add_argument("--profile-worker", nargs=3, metavar=("CONFIG", "SECONDS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile_worker:
        config, seconds, out = args.profile_worker
        profile_worker(Path(config), float(seconds), Path(out))
        return
    quick = args.quick
    out = args.out or (Path(tempfile.gettempdir()) / "edge-quick.json" if quick
                       else ROOT / "bench" / "results" / "edge.json")
    ladder = ([int(v) for v in args.ladder.split(",")] if args.ladder
              else [100, 200, 300] if quick else [50, 100, 200, 300, 350, 400, 500, 600])
    window = args.window or (12.0 if quick else 30.0)
    warmup = args.warmup if args.warmup is not None else (3.0 if quick else 5.0)
    repeat = args.repeat or (1 if quick else 3)
    status_interval = args.status_interval or (2.0 if quick else 5.0)
    started = time.monotonic()
    nofile = raise_nofile()
    if two_cores():
        os.sched_setaffinity(0, {BROKER_CPU})  # the bench itself (monitor) beside the broker
    timings: dict[str, float] = {}
    report: dict[str, Any] = {
        "benchmark": "edge",
        "command": " ".join(["python", *sys.argv]),
        "quick": quick,
        "machine": machine_info(),
        "model": str(MODEL.relative_to(ROOT)),
        "rlimit_nofile": nofile,
        "load_average_at_start": os.getloadavg(),
    }
    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    broker = Broker(work)
    broker.start()
    monitor = Monitor(broker.port)
    if args.only_bytes:
        try:
            with stage("bytes", timings):
                run_bytes(report, broker, monitor, work, quick, args.before)
        finally:
            monitor.stop()
            broker.stop()
            shutil.rmtree(work, ignore_errors=True)
        old = json.loads(out.read_text()) if out.exists() else {}
        for key in ("bytes", "bytes_before"):
            if key in report:
                old[key] = report[key]
        old.setdefault("stage_s", {})["bytes"] = timings["bytes"]
        old["bytes_command"] = report["command"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(old, indent=2, default=float) + "\n")
        summary_bytes(report)
        log(f"wrote the bytes part into {out} in {time.monotonic() - started:.0f} s")
        return
    try:
        with stage("cpu", timings):
            report["cpu"] = part_cpu(broker, monitor, work, repeat, quick)
        with stage("streams", timings):
            report["streams"] = part_streams(broker, monitor, work, ladder, warmup, window,
                                             status_interval)
        profile_n = args.profile or (0 if quick and report["streams"]["target_met"]
                                     else TARGET_STREAMS)
        if profile_n:
            with stage("profile", timings):
                report["profile"] = part_profile(profile_n, broker, work,
                                                 10.0 if quick else 20.0)
        # Part 3 is real time and light: the install (network, pip on the other core) overlaps.
        install: dict[str, Any] = {}
        thread = None
        if not args.skip_install:
            def do_install() -> None:
                try:
                    install.update(part_install(work, broker, monitor))
                except Exception as exc:
                    install["error"] = repr(exc)

            thread = threading.Thread(target=do_install, name="install")
            thread.start()
        with stage("bytes", timings):
            run_bytes(report, broker, monitor, work, quick, args.before)
        if thread is not None:
            with stage("install_wait", timings):
                thread.join()
            report["install"] = install
        report["monitor_bad_payloads"] = monitor.bad_payloads
    finally:
        monitor.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    report["stage_s"] = timings
    report["load_average_at_end"] = os.getloadavg()
    report["runtime_s"] = round(time.monotonic() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    summary(report)
    log(f"wrote {out} in {report['runtime_s']:.0f} s")


def run_bytes(report: dict[str, Any], broker: Broker, monitor: Monitor, work: Path,
              quick: bool, before: str | None) -> None:
    """The bytes part, with the agent of ``before`` (a git ref) run beside it when given."""
    files = sample_files()[:3] if quick else sample_files()
    if before is None:
        report["bytes"] = part_bytes(broker, monitor, work, files)
        return
    src = work / "before-src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", before, "csi_edge",
                              "csi_cloud"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", before], capture_output=True,
                            text=True, check=True).stdout.strip()
    counter = WireCounter(broker.port).start()
    results: dict[str, Any] = {}

    def run(key: str, site: str, agent_src: Path | None) -> None:
        try:
            results[key] = part_bytes(broker, monitor, work, files, site=site,
                                      agent_src=agent_src, counter=counter)
        except BaseException as exc:  # reported below, in the main thread
            results[key] = exc

    threads = [threading.Thread(target=run, args=("bytes_before", "before", src)),
               threading.Thread(target=run, args=("bytes", "bytes", None))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counter.stop()
    for key, value in results.items():
        if isinstance(value, BaseException):
            raise value
        report[key] = value
    report["bytes_before"]["agent"] = f"git {before} ({commit}), run at the same time"


def summary_bytes(report: dict[str, Any]) -> None:
    for key in ("bytes_before", "bytes"):
        if key not in report:
            continue
        print(f"{key}:")
        for lv in report[key]["levels"]:
            print(f"  level {lv['level']}: payload {lv['payload_bytes_per_s']:6.1f} B/s, MQTT "
                  f"{lv['mqtt_bytes_per_s']:6.1f} B/s (status {lv['status_bytes_per_s']:.1f}), "
                  f"+ TCP/IP {lv['tcpip_bytes_per_s']:.1f} B/s = {lv['total_bytes_per_s']:.1f}; "
                  f"latency median {lv['latency_s']['median'] or float('nan'):.2f} s (first "
                  f"segment {lv['latency_s']['first_segment_median'] or float('nan'):.2f} s)")


def summary(report: dict[str, Any]) -> None:
    cpu, streams, data = report["cpu"], report["streams"], report["bytes"]
    print(f"\nCPU per segment: {cpu['cpu_ms_per_segment_with_startup']:.3f} ms with start-up, "
          f"{cpu['cpu_ms_per_segment_without_startup']:.3f} ms without "
          f"(encoder {cpu['encoder_ms_per_segment']:.3f} ms); start-up "
          f"{cpu['startup_cpu_s']:.2f} s CPU; peak RSS {cpu['peak_rss_mb']:.0f} MB")
    print(f"Streams on one core: {streams['max_streams_sustained']} sustained "
          f"(target {TARGET_STREAMS}: {'met' if streams['target_met'] else 'MISSED'}), "
          f"{streams['cpu_ms_per_stream_second']} ms CPU per stream-second"
          + (f"; runs disturbed by other jobs on the agent core: {streams['disturbed_runs']}"
             if streams["disturbed_runs"] else ""))
    hung = [r["streams"] for r in streams["runs"] if r.get("exit") == -9]
    if hung:
        print(f"WARNING: the agent did not exit after SIGTERM (killed) at N = {hung}")
    print(f"Raw CSI: {data['raw_csi']['bytes_per_s']:.0f} B/s "
          f"({data['raw_csi']['packets_per_s']:.1f} packets/s)")
    summary_bytes(report)
    if "install" in report:
        inst = report["install"]
        print(f"Edge install: {inst.get('site_packages_mb', float('nan')):.0f} MB, torch: "
              f"{inst.get('torch_installed')}, missing: {inst.get('missing_runtime_dependencies')}")


if __name__ == "__main__":
    main()
