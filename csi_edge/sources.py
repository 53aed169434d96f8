"""CSI sources of the edge agent: each is an async iterator of :class:`CSIFrames` chunks.

URIs:
  ``nexmon-udp://HOST:PORT``            live Nexmon CSI packets (one UDP datagram each)
  ``file:///PATH[?loop=1&speed=max]``   replay of a recording, or of every recording in a
                                        folder (sorted, recursive), at its real rate
  ``esp32-serial:///dev/ttyUSB0?baud=921600`` ESP32-CSI-Tool lines from a serial port
  ``stdin``                             ESP32-CSI-Tool lines from standard input

A source never raises for one bad packet, line or file: it counts it in ``dropped`` by reason
and reports the first offending value of each reason through ``problems``. It raises only
when it cannot start (a port taken, no readable recording at all) or has nothing left to give
(a looping replay whose every file has become unreadable): the agent then reports the stream
failed instead of spinning on nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from ._errors import CSIError, MalformedPacketError
from .frames import CSIFrames, DropCounter
from .readers import detect_format, read_recording
from .readers.esp32 import Esp32Frame, Esp32LineParser, frames_from_records, iter_lines
from .readers.nexmon import LiveStreamFilter, decode_payload, decode_payloads

__all__ = [
    "EspLineSource",
    "FileSource",
    "FrameSource",
    "NexmonUdpSource",
    "ProblemLog",
    "SourceError",
    "open_source",
    "source_kind",
]

log = logging.getLogger("csi_edge.sources")

# Live sources hand frames on in chunks this long (bounded latency, few wake-ups).
_LIVE_CHUNK_S = 0.1
_REPLAY_CHUNK_S = 0.1
_MAX_REPLAY_CHUNK_S = 5.0


class SourceError(CSIError):
    """A source cannot start: bad URI, port taken, nothing readable."""


class ProblemLog:
    """Counts problems by reason and logs the first of each reason with its offending value."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.first: dict[str, str] = {}

    def report(self, reason: str, detail: str) -> None:
        if reason not in self.first:
            self.first[reason] = detail
            log.warning("%s: %s: %s (further ones only counted)", self.where, reason, detail)


class FrameSource(Protocol):
    uri: str
    dropped: DropCounter
    problems: ProblemLog

    def frames(self) -> AsyncIterator[CSIFrames]: ...

    @property
    def kind(self) -> str | None:
        """The reader kind (``RadioInfo.device``) this source yields, if known before data."""


@dataclass(frozen=True, slots=True)
class _Uri:
    scheme: str
    host: str
    port: int | None
    path: str
    query: dict[str, str]


def _parse(uri: str) -> _Uri:
    if uri in ("stdin", "-", "stdin://"):
        return _Uri("stdin", "", None, "", {})
    parts = urlsplit(uri)
    if not parts.scheme:
        raise SourceError(f"source {uri!r} has no scheme: use nexmon-udp://, file://, "
                          "esp32-serial:// or stdin")
    try:
        port = parts.port
    except ValueError as exc:
        raise SourceError(f"source {uri!r}: bad port ({exc})") from exc
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return _Uri(parts.scheme, parts.hostname or "", port, unquote(parts.path), query)


def source_kind(uri: str) -> str | None:
    """The device kind a source URI will yield, where the URI alone says (else None)."""
    scheme = _parse(uri).scheme
    return {"nexmon-udp": "nexmon", "esp32-serial": "esp32", "stdin": "esp32"}.get(scheme)


def open_source(uri: str, *, speed: float | None = 1.0, loop: bool = False,
                timestamps: str = "now", udp_warmup: int = 100) -> FrameSource:
    """The source for a URI. File options in the URI (``?loop=1&speed=max``) win."""
    parsed = _parse(uri)
    if parsed.scheme == "nexmon-udp":
        if parsed.port is None:
            raise SourceError(f"source {uri!r} needs a port, e.g. nexmon-udp://0.0.0.0:5500")
        return NexmonUdpSource(uri, parsed.host or "0.0.0.0", parsed.port, warmup=udp_warmup)
    if parsed.scheme == "file":
        if "speed" in parsed.query:
            value = parsed.query["speed"]
            if value in ("max", "real"):
                speed = None if value == "max" else 1.0
            else:
                try:
                    speed = float(value)
                except ValueError:
                    speed = float("nan")
                if not speed > 0:  # also NaN
                    raise SourceError(f"source {uri!r}: speed {value!r} is not real, max or a "
                                      "positive number")
        if "loop" in parsed.query:
            loop = parsed.query["loop"].lower() in ("1", "true", "yes")
        return FileSource(uri, Path(parsed.path), speed=speed, loop=loop, timestamps=timestamps)
    if parsed.scheme in ("esp32-serial", "stdin"):
        return EspLineSource(uri)
    raise SourceError(f"source {uri!r}: unknown scheme {parsed.scheme!r} (nexmon-udp://, "
                      "file://, esp32-serial:// or stdin)")


class FileSource:
    """Replays recordings at their real rate (``speed`` times real time, or as fast as possible
    with ``speed=None``). A folder plays each supported file in turn, as one continuous stream.

    Timestamps: ``now`` shifts the capture times so the replay starts now; ``recorded`` keeps
    the first file's times. Later files (and loops) always follow on one frame interval after
    the previous one ended, so the stream stays continuous.
    """

    def __init__(self, uri: str, path: Path, *, speed: float | None = 1.0, loop: bool = False,
                 timestamps: str = "now") -> None:
        self.uri = uri
        self.path = path
        self.speed = speed
        self.loop = loop
        self.timestamps = timestamps
        self.dropped = DropCounter()
        self.problems = ProblemLog(uri)
        self.files = self._list_files()
        self.first: CSIFrames | None = None
        self._first_index = 0
        self.passes = 0
        # Recordings started after the first one, over every pass: a new value is a new
        # recording (the agent's ``loop_new_epoch`` starts an epoch on it).
        self.plays = 0

    def _list_files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if not self.path.is_dir():
            raise SourceError(f"source {self.uri!r}: {str(self.path)!r} does not exist")
        suffixes = {".pcap", ".dat", ".csv", ".txt", ".h5", ".hdf5", ".mat", ".npz"}
        files = sorted(p for p in self.path.rglob("*") if p.is_file()
                       and p.suffix.lower() in suffixes)
        if not files:
            raise SourceError(f"source {self.uri!r}: no recording file in {str(self.path)!r}")
        return files

    @property
    def kind(self) -> str | None:
        return self.open_first().info.device

    def open_first(self) -> CSIFrames:
        """The first readable recording (read once, kept for the first pass)."""
        if self.first is None:
            for index, path in enumerate(self.files):
                frames = self._read(path)
                if frames is not None:
                    self.first, self._first_index = frames, index
                    break
            else:
                raise SourceError(f"source {self.uri!r}: none of {len(self.files)} file(s) is a "
                                  f"readable recording ({'; '.join(self.problems.first.values())})")
        return self.first

    def _read(self, path: Path) -> CSIFrames | None:
        try:
            frames = read_recording(path, detect_format(path))
        except (CSIError, OSError, ValueError, RuntimeError) as exc:
            # Not only CSIError: a library may fail its own way on a corrupt file (h5py raises
            # RuntimeError for a broken HDF5 superblock), and one bad file must not end a replay.
            detail = str(exc) if isinstance(exc, CSIError) else f"{path}: {exc!r}"
            self.dropped["bad_file"] += 1
            self.problems.report("bad_file", detail)
            return None
        return frames

    async def frames(self) -> AsyncIterator[CSIFrames]:
        first: CSIFrames | None = self.open_first()
        start_wall = time.monotonic()
        origin: float | None = None  # stream time that plays at start_wall
        next_start: float | None = None  # where the next file's first frame goes
        started = False  # a recording has started playing
        while True:
            start = self._first_index if self.passes == 0 else 0
            played = False
            for index in range(start, len(self.files)):
                if self.passes == 0 and index == self._first_index:
                    frames: CSIFrames | None = first
                else:
                    frames = await asyncio.to_thread(self._read, self.files[index])
                if frames is None or len(frames) == 0:
                    continue
                self.dropped.update(frames.dropped)
                t = frames.timestamp
                if next_start is None:
                    shift = 0.0 if self.timestamps == "recorded" else time.time() - float(t[0])
                else:
                    shift = next_start - float(t[0])
                t = t + shift
                step = float(np.median(np.diff(t))) if t.size > 1 else 0.02
                next_start = float(t[-1]) + step
                if origin is None:
                    origin = float(t[0])
                frames = replace(frames, timestamp=t, dropped=DropCounter())
                played = True
                if started:
                    self.plays += 1
                started = True
                async for chunk in self._paced(frames, start_wall, origin):
                    yield chunk
            if not played:
                # Every file gone or unreadable (a folder removed under a looping replay): a
                # stream that would spin on nothing is a dead source.
                raise SourceError(f"source {self.uri!r}: no readable recording left in "
                                  f"{str(self.path)!r} ({len(self.files)} file(s) tried: "
                                  f"{'; '.join(self.problems.first.values())})"[:500])
            self.passes += 1
            first = None
            self.first = None  # free it; later passes read from disk
            if not self.loop:
                return

    async def _paced(self, frames: CSIFrames, start_wall: float,
                     origin: float) -> AsyncIterator[CSIFrames]:
        t = frames.timestamp
        chunk_s = _REPLAY_CHUNK_S if self.speed is not None else _MAX_REPLAY_CHUNK_S
        edges = np.arange(t[0], t[-1] + chunk_s, chunk_s)
        bounds = [*np.searchsorted(t, edges[1:], side="left").tolist(), t.size]
        begin = 0
        for end in bounds:
            if end <= begin:
                continue
            if self.speed is not None:
                due = start_wall + (float(t[end - 1]) - origin) / self.speed
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
            yield frames.take(np.arange(begin, end))
            begin = end


class _DatagramQueue(asyncio.DatagramProtocol):
    def __init__(self, wake: asyncio.Event) -> None:
        self.items: list[tuple[bytes, float]] = []
        self.wake = wake

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.items.append((data, time.time()))
        self.wake.set()

    def error_received(self, exc: Exception) -> None:  # pragma: no cover - ICMP errors
        log.debug("udp error: %s", exc)


class NexmonUdpSource:
    """Live Nexmon CSI: UDP datagrams decoded and filtered to one stream (see
    :class:`~csi_edge.readers.nexmon.LiveStreamFilter`), handed on every ~0.1 s."""

    kind = "nexmon"

    def __init__(self, uri: str, host: str, port: int, warmup: int = 100) -> None:
        self.uri = uri
        self.host = host
        self.port = port
        self.dropped = DropCounter()
        self.problems = ProblemLog(uri)
        self.filter = LiveStreamFilter(warmup=warmup, source=uri)
        self.packets = 0
        self.bound: tuple[str, int] | None = None

    async def frames(self) -> AsyncIterator[CSIFrames]:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _DatagramQueue(wake), local_addr=(self.host, self.port))
        except OSError as exc:
            raise SourceError(f"source {self.uri!r}: cannot listen on "
                              f"{self.host}:{self.port}: {exc.strerror or exc}") from exc
        self.bound = transport.get_extra_info("sockname")[:2]
        log.info("listening for Nexmon CSI on udp %s:%d", *self.bound)
        try:
            while True:
                await wake.wait()
                wake.clear()
                await asyncio.sleep(_LIVE_CHUNK_S)  # gather a chunk
                items, protocol.items = protocol.items, []
                frames = self._decode(items)
                if frames is not None:
                    yield frames
        finally:
            transport.close()

    def _decode(self, items: list[tuple[bytes, float]]) -> CSIFrames | None:
        payloads: list[bytes] = []
        stamps: list[float] = []
        for data, stamp in items:
            self.packets += 1
            try:
                decode_payload(data, stamp)
            except MalformedPacketError as exc:
                self.dropped[exc.reason] += 1
                self.problems.report(exc.reason, exc.detail)
                continue
            payloads.append(data)
            stamps.append(stamp)
        if not payloads:
            return None
        before = DropCounter(self.filter.dropped)
        frames = self.filter.push(decode_payloads(payloads, stamps), payloads)
        for reason, count in (self.filter.dropped - before).items():
            self.dropped[reason] += count
            self.problems.report(reason, f"stream kept: {self.filter.key}")
        return frames


class EspLineSource:
    """ESP32-CSI-Tool ``CSI_DATA`` lines from a serial port or stdin (read on a thread).

    The transmitter with most frames among the first ``warmup`` frames is kept, as the file
    reader does for a whole file.
    """

    kind = "esp32"

    def __init__(self, uri: str, warmup: int = 20,
                 lines: Callable[[], object] | None = None) -> None:
        self.uri = uri
        self.dropped = DropCounter()
        self.problems = ProblemLog(uri)
        self.parser = Esp32LineParser()
        self.warmup = warmup
        self.mac: str | None = None
        self._lines = lines

    async def frames(self) -> AsyncIterator[CSIFrames]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        stop = threading.Event()
        failure: list[BaseException] = []

        def read() -> None:
            try:
                for line in iter_lines(self.uri if self.uri != "stdin://" else "stdin"):
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, line)
            except BaseException as exc:  # reported to the reader task below
                failure.append(exc)
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(queue.put_nowait, None)

        thread = threading.Thread(target=read, name=f"esp32 {self.uri}", daemon=True)
        thread.start()
        pending: list[Esp32Frame] = []
        deadline = time.monotonic() + _LIVE_CHUNK_S
        try:
            while True:
                try:
                    line = await asyncio.wait_for(queue.get(),
                                                  max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    line = ""
                if line is None:
                    break
                if line:
                    before = DropCounter(self.parser.dropped)
                    frame = self.parser.feed(line)
                    for reason, count in (self.parser.dropped - before).items():
                        self.dropped[reason] += count
                        self.problems.report(reason, self.parser.first_problem.get(reason, ""))
                    if frame is not None:
                        pending.append(frame)
                if time.monotonic() >= deadline:
                    deadline = time.monotonic() + _LIVE_CHUNK_S
                    frames = self._frames(pending)
                    if frames is not None:
                        pending = []
                        yield frames
            frames = self._frames(pending, final=True)
            if frames is not None:
                yield frames
            if failure:
                raise SourceError(f"source {self.uri!r}: {failure[0]}") from failure[0]
        finally:
            stop.set()

    def _frames(self, pending: list[Esp32Frame], final: bool = False) -> CSIFrames | None:
        if not pending:
            return None
        if self.mac is None:
            if len(pending) < self.warmup and not final:
                return None
            macs = [f.mac for f in pending]
            self.mac = max(set(macs), key=macs.count)
        try:
            frames = frames_from_records(pending, self.uri, mac=self.mac, fmt="esp32-serial")
        except CSIError as exc:
            reason = "no_frame_of_stream"
            self.dropped[reason] += len(pending)
            self.problems.report(reason, str(exc))
            pending.clear()
            return None
        # frames_from_records counts into a copy of the counter it is given: its drops come
        # back on the frames, and are moved into this source's counter.
        for reason, count in frames.dropped.items():
            self.dropped[reason] += count
            self.problems.report(reason, f"stream kept: transmitter {self.mac}")
        frames.dropped.clear()
        pending.clear()
        return frames if len(frames) else None
