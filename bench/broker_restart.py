"""A broker restart under 24 real-time APs, with the edges reconnecting before the cloud.

Real processes (tests/_outage.py): Mosquitto with the deployment's persistence and queue
settings, the cloud service with a persistent non-shared subscription, one edge process
replaying 24 APs at their recorded rate. The cloud is frozen (SIGSTOP) across the outage, so
every edge reconnects and flushes its spool into the broker first; the broker queues it for
the cloud's offline session. Runs:

- ``graceful``: SIGTERM, 30 s down (the broker writes its state on the way out);
- ``crash``: SIGKILL, 30 s down, more than one autosave interval after the cloud subscribed;
- ``crash_before_first_autosave``: SIGKILL 5 s after the cloud came up, before any autosave
  holds its session: what a crash costs in that window;
- ``queue_default_1000`` / ``queue_deployed``: level 2 (one segment a message), the cloud held
  60 s after the restart, with Mosquitto's default queue limit (1000 messages) and with the
  deployed byte limit;
- ``queue_memory``: what a queued message costs the broker: 100,000 messages with the mean
  payload of the ``graceful`` run (level 1) queued for one offline session; RSS growth, the
  persistence file written at a clean stop, and how long that stop took.

Each run reports segments encoded, predicted, lost (no prediction) and duplicated (a second
prediction for one segment), whether every edge reconnected before the cloud, what a second
offline session (the probe) had queued for it (messages, payload bytes) and the broker's RSS.

    nice -n 10 python bench/broker_restart.py      # ~12 min; bench/results/broker_restart.json
    python bench/broker_restart.py --only graceful --aps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from _broker import Mosquitto  # noqa: E402
from _outage import run_outage  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

RUNS = {
    "graceful": {"kind": "graceful", "outage_s": 30.0, "hold_s": 10.0},
    "crash": {"kind": "crash", "outage_s": 30.0, "hold_s": 10.0, "settle_s": 40.0},
    "crash_before_first_autosave": {"kind": "crash", "outage_s": 30.0, "hold_s": 10.0,
                                    "crash_after_cloud_s": 5.0},
    "queue_default_1000": {"kind": "graceful", "outage_s": 30.0, "hold_s": 60.0, "level": 2,
                           "broker_settings": {"max_queued_messages": None,
                                               "max_queued_bytes": None}},
    "queue_deployed": {"kind": "graceful", "outage_s": 30.0, "hold_s": 60.0, "level": 2},
}


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def queue_memory(payload_bytes: int, n: int = 100_000) -> dict[str, Any]:
    """``n`` segment messages of ``payload_bytes`` queued for one offline session."""
    with tempfile.TemporaryDirectory(prefix="queue-memory-") as work:
        broker = Mosquitto(Path(work) / "broker")
        broker.start()
        try:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            done = threading.Event()
            cloud = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cloud",
                                protocol=mqtt.MQTTv5)
            cloud.on_subscribe = lambda *a: done.set()
            cloud.on_connect = lambda c, *a: c.subscribe("csi/v1/+/+/seg", qos=1)
            cloud.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
            cloud.loop_start()
            done.wait(10)
            cloud.disconnect()
            cloud.loop_stop()
            time.sleep(0.5)
            assert broker.pid is not None
            before = _rss_kb(broker.pid)
            aps = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="aps",
                              protocol=mqtt.MQTTv5)
            aps.connect("127.0.0.1", broker.port)
            aps.loop_start()
            payload = bytes(payload_bytes)
            for start in range(0, n, 1000):
                infos = [aps.publish(f"csi/v1/site{i % 5}/ap{i % 24}/seg", payload, qos=1)
                         for i in range(start, min(n, start + 1000))]
                for info in infos:
                    info.wait_for_publish(30)
            aps.disconnect()
            aps.loop_stop()
            time.sleep(0.5)
            after = _rss_kb(broker.pid)
            t0 = time.monotonic()
            broker.stop()
            stop_s = time.monotonic() - t0
            db = Path(work) / "broker" / "mosquitto.db"
            size = db.stat().st_size
        finally:
            broker.stop()
    return {"messages": n, "payload_bytes": payload_bytes,
            "rss_growth_bytes_per_message": round((after - before) * 1024 / n),
            "persistence_bytes_per_message": round(size / n),
            "clean_stop_s": round(stop_s, 2),
            "note": "RSS growth and the persistence file size over the queued messages; the "
                    "clean stop writes the persistence file"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aps", type=int, default=24)
    parser.add_argument("--only", action="append", choices=sorted([*RUNS, "queue_memory"]),
                        help="run only these (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" /
                        "broker_restart.json")
    args = parser.parse_args()
    names = args.only or [*RUNS, "queue_memory"]
    runs: dict[str, Any] = {}
    previous: dict[str, Any] = {}
    if args.out.exists() and args.only:
        previous = json.loads(args.out.read_text()).get("runs", {})
    for name in names:
        started = time.monotonic()
        if name == "queue_memory":
            graceful = runs.get("graceful") or previous.get("graceful")
            mean = (round(graceful["probe_queued_payload_bytes"]
                          / graceful["probe_queued_messages"]) if graceful else 60)
            runs[name] = {**queue_memory(mean), "wall_s": round(time.monotonic() - started, 1)}
            print(f"{name}: {runs[name]}", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix=f"outage-{name}-") as work:
            result = run_outage(Path(work), aps=args.aps, **RUNS[name])  # type: ignore[arg-type]
        runs[name] = {**result.as_dict(), "wall_s": round(time.monotonic() - started, 1)}
        r = runs[name]
        print(f"{name}: encoded {r['encoded']}, predicted {r['predicted']}, lost {r['lost']}, "
              f"duplicated {r['duplicated']}, edges first {r['edges_reconnected_first']}, "
              f"probe queued {r['probe_queued_messages']} msgs / "
              f"{r['probe_queued_payload_bytes']} B", flush=True)
    args.out.write_text(json.dumps({
        "benchmark": "broker restart under load, edges reconnecting before the cloud",
        "command": "python bench/broker_restart.py",
        "host": {"python": platform.python_version(), "machine": platform.machine(),
                 "mosquitto": "2.0 (system package)"},
        "aps": args.aps,
        "runs": {**previous, **runs},
    }, indent=2) + "\n")
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
