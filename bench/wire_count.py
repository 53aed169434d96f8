"""Bytes on the wire between MQTT clients and a broker: a counting TCP proxy.

Clients connect to the proxy, which forwards every byte to the broker and back unchanged and
splits the two byte streams into MQTT packets as they pass: bytes and packets per direction
and kind (CONNECT, PUBLISH by the last topic level, PUBACK by the topic level of the PUBLISH
it acknowledges, PINGREQ, ...), per connection, with the client id from CONNECT. Topic
aliases (MQTT 5) are followed, so an aliased PUBLISH is still attributed to its topic.

TCP/IP is not visible to a proxy: it reads the kernel's own counters of the client-side
socket (``TCP_INFO``: segments in and out, whether TCP timestamps were negotiated), so the
TCP/IP estimate rests on counted segments times the header size (IPv4 20 + TCP 20, + 12 with
timestamps); link-layer framing is not counted. On loopback the segmentation of small
messages is that of any network (one segment per write, delayed ACKs); a slow link can
coalesce more.

Used by ``bench/edge.py``; run on its own as ``python bench/wire_count.py BROKER_PORT`` it
prints the counts of each connection when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Connection", "MqttSplitter", "WireCounter", "tcp_info", "tcpip_header_bytes"]

_TYPES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
          7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
          12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH"}
# MQTT 5 property identifier -> value size (-1: string/binary with a 2-byte length, -2: a
# string pair, 0: variable byte integer), for the properties a PUBLISH may carry.
_PROPERTY_SIZE = {0x01: 1, 0x02: 4, 0x03: -1, 0x08: -1, 0x09: -1, 0x0B: 0, 0x23: 2, 0x26: -2}
TCP_INFO_TIMESTAMPS = 1  # tcpi_options bit


def _varint(data: bytes | memoryview, at: int) -> tuple[int, int] | None:
    """(value, next offset) of an MQTT variable byte integer, None when incomplete."""
    value, shift = 0, 0
    for i in range(at, min(at + 4, len(data))):
        value |= (data[i] & 0x7F) << shift
        if not data[i] & 0x80:
            return value, i + 1
        shift += 7
    if len(data) - at >= 4:
        raise ValueError(f"malformed remaining length at byte {at}")
    return None


def tcp_info(sock: Any) -> dict[str, int] | None:
    """Segments in and out, bytes, and the TCP options of a live Linux TCP socket (None where
    TCP_INFO is not available)."""
    if not hasattr(socket, "TCP_INFO"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(raw) < 144:
        return None
    bytes_acked, bytes_received, segs_out, segs_in = struct.unpack_from("<QQII", raw, 120)
    return {"options": raw[5], "bytes_acked": bytes_acked, "bytes_received": bytes_received,
            "segs_out": segs_out, "segs_in": segs_in}


@dataclass
class Connection:
    """What crossed one proxied connection. ``up``: client to broker, ``down``: back."""

    opened: float = field(default_factory=time.time)
    closed: float | None = None
    client_id: str = ""
    version: int = 0
    bytes: dict[str, dict[str, int]] = field(
        default_factory=lambda: {"up": defaultdict(int), "down": defaultdict(int)})
    packets: dict[str, dict[str, int]] = field(
        default_factory=lambda: {"up": defaultdict(int), "down": defaultdict(int)})
    aliased_publishes: int = 0
    topic_alias_maximum: int | None = None  # from CONNACK
    tcp: dict[str, int] | None = None  # TCP_INFO of the client-side socket, last seen
    # (time, TCP_INFO, MQTT bytes so far both ways, exchanges completed: PUBACKs and PINGRESPs
    # to the client) at each PUBACK of a segment message: a window of whole exchanges between
    # two of them.
    seg_acks: list[tuple[float, dict[str, int] | None, int, int]] = field(default_factory=list)

    def total(self, direction: str | None = None) -> int:
        ways = ("up", "down") if direction is None else (direction,)
        return sum(sum(self.bytes[w].values()) for w in ways)

    def as_dict(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "mqtt_version": self.version,
                "opened": self.opened, "closed": self.closed,
                "topic_alias_maximum": self.topic_alias_maximum,
                "aliased_publishes": self.aliased_publishes,
                "bytes": {w: dict(v) for w, v in self.bytes.items()},
                "packets": {w: dict(v) for w, v in self.packets.items()},
                "tcp": self.tcp}


class MqttSplitter:
    """Splits the two byte streams of one connection into MQTT packets and counts them."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._buffers = {"up": bytearray(), "down": bytearray()}
        self._aliases: dict[int, str] = {}  # client to broker aliases
        self._pending: dict[int, str] = {}  # packet id -> kind of an unacknowledged PUBLISH
        self.on_packet: Any = None  # callback(direction, kind) after each packet

    def feed(self, direction: str, data: bytes) -> None:
        buf = self._buffers[direction]
        buf += data
        while len(buf) >= 2:
            parsed = _varint(buf, 1)
            if parsed is None:
                return
            length, start = parsed
            end = start + length
            if len(buf) < end:
                return
            packet = bytes(buf[:end])
            del buf[:end]
            kind = self._kind(direction, packet, start)
            self.conn.bytes[direction][kind] += len(packet)
            self.conn.packets[direction][kind] += 1
            if self.on_packet is not None:
                self.on_packet(direction, kind)

    def _kind(self, direction: str, packet: bytes, start: int) -> str:
        name = _TYPES.get(packet[0] >> 4, "RESERVED")
        if name == "CONNECT":
            self._connect(packet, start)
        elif name == "CONNACK" and self.conn.version == 5:
            self._connack(packet, start)
        elif name == "PUBLISH":
            topic, packet_id = self._publish(direction, packet, start)
            kind = f"PUBLISH {topic.rsplit('/', 1)[-1]}"
            if packet_id is not None:
                self._pending[packet_id] = kind.split(" ", 1)[1]
            return kind
        elif name == "PUBACK":
            packet_id = struct.unpack_from(">H", packet, start)[0]
            return f"PUBACK {self._pending.pop(packet_id, '?')}"
        return name

    def _connect(self, packet: bytes, at: int) -> None:
        (n,) = struct.unpack_from(">H", packet, at)
        at += 2 + n
        self.conn.version = packet[at]
        at += 1 + 1 + 2  # level, flags, keepalive
        if self.conn.version == 5:
            length, at = _varint(packet, at) or (0, at)
            at += length
        (n,) = struct.unpack_from(">H", packet, at)
        self.conn.client_id = packet[at + 2: at + 2 + n].decode(errors="replace")

    def _connack(self, packet: bytes, at: int) -> None:
        at += 2  # flags, reason code
        parsed = _varint(packet, at) if at < len(packet) else None
        if parsed is None:
            self.conn.topic_alias_maximum = 0
            return
        length, at = parsed
        end = at + length
        self.conn.topic_alias_maximum = 0
        while at < end:
            ident = packet[at]
            at += 1
            if ident == 0x22:  # Topic Alias Maximum
                self.conn.topic_alias_maximum = struct.unpack_from(">H", packet, at)[0]
            at = self._skip_connack_property(ident, packet, at)

    @staticmethod
    def _skip_connack_property(ident: int, packet: bytes, at: int) -> int:
        sizes = {0x11: 4, 0x21: 2, 0x24: 1, 0x25: 1, 0x27: 4, 0x22: 2, 0x28: 1, 0x29: 1,
                 0x2A: 1, 0x13: 2, 0x12: -1, 0x1A: -1, 0x1C: -1, 0x1F: -1, 0x15: -1,
                 0x16: -1, 0x26: -2}
        size = sizes.get(ident)
        if size is None:
            raise ValueError(f"unknown CONNACK property 0x{ident:02x}")
        if size > 0:
            return at + size
        for _ in range(-size):
            (n,) = struct.unpack_from(">H", packet, at)
            at += 2 + n
        return at

    def _publish(self, direction: str, packet: bytes, at: int) -> tuple[str, int | None]:
        qos = (packet[0] >> 1) & 3
        (n,) = struct.unpack_from(">H", packet, at)
        topic = packet[at + 2: at + 2 + n].decode(errors="replace")
        at += 2 + n
        packet_id = None
        if qos:
            (packet_id,) = struct.unpack_from(">H", packet, at)
            at += 2
        if self.conn.version == 5:
            parsed = _varint(packet, at)
            length, at = parsed if parsed else (0, at)
            end = at + length
            while at < end:
                ident = packet[at]
                at += 1
                size = _PROPERTY_SIZE.get(ident)
                if size is None:
                    raise ValueError(f"unknown PUBLISH property 0x{ident:02x}")
                if ident == 0x23 and direction == "up":
                    alias = struct.unpack_from(">H", packet, at)[0]
                    self.conn.aliased_publishes += 1
                    if topic:
                        self._aliases[alias] = topic
                    else:
                        topic = self._aliases.get(alias, f"?alias{alias}")
                if size > 0:
                    at += size
                elif size == 0:
                    at = (_varint(packet, at) or (0, at))[1]
                else:
                    for _ in range(-size):
                        (m,) = struct.unpack_from(">H", packet, at)
                        at += 2 + m
        return topic, packet_id if direction == "up" else None


class WireCounter:
    """A counting TCP proxy on a free port of 127.0.0.1 to ``broker_port``, in its own thread
    with its own event loop."""

    def __init__(self, broker_port: int, host: str = "127.0.0.1") -> None:
        self.broker = (host, broker_port)
        self.connections: list[Connection] = []
        self.lock = threading.Lock()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="wire-counter", daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> WireCounter:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the counting proxy did not start")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def by_client(self) -> dict[str, list[Connection]]:
        out: dict[str, list[Connection]] = defaultdict(list)
        with self.lock:
            for conn in self.connections:
                out[conn.client_id].append(conn)
        return out

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection()
        with self.lock:
            self.connections.append(conn)
        splitter = MqttSplitter(conn)
        sock = writer.get_extra_info("socket")
        exchanges = 0

        def on_packet(direction: str, kind: str) -> None:
            nonlocal exchanges
            if direction == "down" and kind.startswith(("PUBACK", "PINGRESP")):
                exchanges += 1
                if kind == "PUBACK seg":
                    conn.seg_acks.append((time.time(), tcp_info(sock), conn.total(), exchanges))

        try:
            up_reader, up_writer = await asyncio.open_connection(*self.broker)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       direction: str) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)  # forwarded first: counting adds no delay to the packet
                    await dst.drain()
                    splitter.feed(direction, data)
                    # The kernel's counts after each chunk: the last ones stand at the close.
                    conn.tcp = tcp_info(sock) or conn.tcp
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        splitter.on_packet = on_packet
        await asyncio.gather(pump(reader, up_writer, "up"), pump(up_reader, writer, "down"))
        conn.closed = time.time()


def tcpip_header_bytes(tcp: dict[str, int] | None) -> int:
    """IPv4 + TCP header bytes per segment of a connection (timestamps option if negotiated)."""
    return 40 + (12 if tcp and tcp["options"] & TCP_INFO_TIMESTAMPS else 0)


if __name__ == "__main__":
    counter = WireCounter(int(sys.argv[1])).start()
    print(f"proxy on 127.0.0.1:{counter.port}", flush=True)
    seen = 0
    try:
        while True:
            time.sleep(1)
            with counter.lock:
                done = [c for c in counter.connections if c.closed][seen:]
            for conn in done:
                print(conn.as_dict(), flush=True)
            seen += len(done)
    except KeyboardInterrupt:
        counter.stop()
