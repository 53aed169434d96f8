"""Many simulated APs at real rate: real wire payloads over MQTT 3.1.1, QoS 1, as edges send.

Each AP publishes one segment a second on ``{prefix}/{site}/ap{k}/seg``; the payloads carry
real entropy-coded segments of the committed Fition samples (the int8 edge encoder, rate level
2: one segment a message), each AP's own sequence numbers and capture times. The APs share a
few MQTT connections, spread over the given brokers. Like an edge's spool, a message counts as
sent only when its PUBACK came: when a connection breaks, the client reconnects to the next
broker in its list (as behind a load balancer) and publishes again, in order, whatever was not
acknowledged.

    python tests/_loadgen.py --broker mqtt://127.0.0.1:1883 [--broker ...] --aps 200 \\
        --seconds 60 --out sent.json

``sent.json``: per message ``[ap, seq, first publish time, PUBACK time, attempts]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEVEL = 2


def segment_codes() -> tuple[bytes, Callable[[list[int]], bytes]]:
    """The model id prefix, and the one coder stream (wire version 2) of a message of the
    committed Fition samples' segments at the given positions (taken round-robin)."""
    from csi_edge import read_recording
    from csi_edge.bundle import EdgeEncoder, SegmentCodes, encode_message_codes
    from csi_edge.preprocess import Preprocessor

    encoder = EdgeEncoder(ROOT / "models" / "fition")
    codes: list[SegmentCodes] = []
    for path in sorted((ROOT / "datasets" / "samples" / "fition").rglob("*.pcap")):
        batch = Preprocessor(encoder.spec).process(read_recording(path))
        symbols, profile = encoder.encode(batch.data)
        codes += [encoder.codes(s, p, LEVEL) for s, p in zip(symbols, profile, strict=True)]

    def stream(positions: list[int]) -> bytes:
        return encode_message_codes([codes[i % len(codes)] for i in positions],
                                    encoder.manifest, encoder.tables)

    return encoder.model_id, stream


class _Connection:
    """One MQTT connection carrying some APs' messages, failing over between brokers."""

    def __init__(self, name: str, brokers: list[tuple[str, int]], prefix: str) -> None:
        self.name = name
        self.brokers = brokers
        self.prefix = prefix
        self.pending: asyncio.Queue[tuple[str, int, bytes]] = asyncio.Queue()
        self.unacked: dict[tuple[str, int], bytes] = {}
        self.records: dict[tuple[str, int], list[float]] = {}  # first publish, puback, tries
        self.reconnects = 0
        self._tasks: set[asyncio.Future[None]] = set()
        self.broken = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        import aiomqtt

        k = 0
        while True:
            host, port = self.brokers[k % len(self.brokers)]
            self.broken = asyncio.Event()
            try:
                async with aiomqtt.Client(host, port, identifier=self.name, keepalive=5,
                                          protocol=aiomqtt.ProtocolVersion.V311,
                                          clean_session=True, timeout=10,
                                          max_inflight_messages=1000) as client:
                    # What was not acknowledged on the previous connection, in order, first.
                    for (ap, seq), data in sorted(self.unacked.items(),
                                                  key=lambda item: item[0][1]):
                        self._spawn(client, ap, seq, data)
                    while not (stop.is_set() and self.pending.empty() and not self.unacked):
                        if self.broken.is_set():
                            raise aiomqtt.MqttError("a publish failed")
                        try:
                            ap, seq, data = await asyncio.wait_for(self.pending.get(), 0.2)
                        except TimeoutError:
                            continue
                        self.unacked[(ap, seq)] = data
                        self._spawn(client, ap, seq, data)
                    return
            except aiomqtt.MqttError:
                self.reconnects += 1
                k += 1
                await asyncio.sleep(0.3)

    def _spawn(self, client: object, ap: str, seq: int, data: bytes) -> None:
        task = asyncio.ensure_future(self._publish(client, ap, seq, data, self.broken))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, client: object, ap: str, seq: int, data: bytes,
                       broken: asyncio.Event) -> None:
        record = self.records.setdefault((ap, seq), [time.time(), 0.0, 0])
        record[2] += 1
        try:
            await client.publish(f"{self.prefix}/{ap}/seg", data, qos=1)  # type: ignore[attr-defined]
        except Exception:
            broken.set()  # resent, in order, after reconnecting
            return
        record[1] = time.time()
        self.unacked.pop((ap, seq), None)


async def generate(brokers: list[str], aps: int, seconds: float, site: str = "load",
                   prefix: str = "csi/v1", epoch: int = 1, connections: int = 4,
                   stop_file: Path | None = None,
                   segments_per_message: int = 1) -> dict[str, object]:
    """``segments_per_message`` k: each AP sends its segments k at a time, every k seconds,
    as the edge does at its lowest rate levels (one message per k segments; a message is keyed
    by its first segment's sequence number in ``sent``)."""
    from csi_edge.codec import Payload, SegmentRecord, encode_payload

    model_id, stream = segment_codes()
    addresses = []
    for url in brokers:
        parts = urlsplit(url)
        addresses.append((parts.hostname or "127.0.0.1", parts.port or 1883))
    conns = [_Connection(f"loadgen-{epoch}-{c}",
                         addresses[c % len(addresses):] + addresses[:c % len(addresses)],
                         f"{prefix}/{site}") for c in range(connections)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(conn.run(stop)) for conn in conns]
    start = time.time() + 0.5
    base_ms = int(start * 1000)
    total = int(aps * seconds)
    last_report = time.time()
    for n in range(total):
        if time.time() - last_report > 5:
            last_report = time.time()
            print(f"{time.strftime('%H:%M:%S')} queued {n}, unacked "
                  f"{[len(c.unacked) for c in conns]}, pending "
                  f"{[c.pending.qsize() for c in conns]}, reconnects "
                  f"{[c.reconnects for c in conns]}", file=sys.stderr, flush=True)
        k, seq = n % aps, n // aps
        delay = start + n / aps - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if stop_file is not None and stop_file.exists():
            break
        if (seq + 1) % segments_per_message:
            continue  # the message goes with its last segment
        first = seq + 1 - segments_per_message
        payload = encode_payload(Payload(
            LEVEL, model_id, epoch, first, base_ms + 1000 * first,
            tuple(SegmentRecord(1.0) for _ in range(first, seq + 1)),
            codes=stream([k * 7 + s for s in range(first, seq + 1)])))
        conns[k % connections].pending.put_nowait((f"ap{k}", first, payload))
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    sent = [[ap, seq, *record] for conn in conns for (ap, seq), record in conn.records.items()]
    return {"site": site, "aps": aps, "epoch": epoch, "sent": sent,
            "reconnects": sum(c.reconnects for c in conns)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", action="append", required=True)
    parser.add_argument("--aps", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--site", default="load")
    parser.add_argument("--epoch", type=int, default=1)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--segments-per-message", type=int, default=1,
                        help="each AP sends this many segments a message (every so many s)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.segments_per_message < 1:
        parser.error(f"--segments-per-message {args.segments_per_message}: at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    result = asyncio.run(generate(args.broker, args.aps, args.seconds, site=args.site,
                                  epoch=args.epoch, connections=args.connections,
                                  segments_per_message=args.segments_per_message))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
