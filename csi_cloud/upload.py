"""Uploaded recordings -> wire payloads, parsed in a separate worker process.

A recording upload is untrusted input handed to native parsers (csiread for Intel 5300 logs,
h5py, scipy's MAT reader), and one of them can take the interpreter down (csiread segfaults on
some corrupt input). So the whole edge chain of an upload, read -> preprocess -> int8 encoder ->
entropy coder -> wire payloads, runs in one spawned worker process
(:class:`RecordingParser`); a worker that dies or hangs is killed and replaced, and the caller
gets :class:`ParserCrashedError` / :class:`ParserTimeoutError` instead of a dead service. The
API process then decodes and classifies the payloads exactly as it does live ones.

A hostile file must not take the host's memory or the worker's time either:

- every reader checks the sizes a file declares (HDF5 dataset shapes, MAT array dimensions
  and decompressed sizes, ``.npz`` member sizes) against ``max_decoded_bytes`` before it
  allocates (:mod:`csi_edge.limits`); the job answers ``too_large`` naming the value;
- the worker runs under ``RLIMIT_AS``: it may grow by ``memory_bytes`` beyond its size once
  started, so an allocation no check foresaw fails with ``MemoryError`` (also ``too_large``)
  instead of the host's out-of-memory killer choosing a victim;
- each job runs under the wall-time limit enforced by the service (the worker is killed) and
  an ``RLIMIT_CPU`` soft limit the kernel enforces on its own (SIGXCPU), so a worker stuck in
  native code dies even when nothing is left to kill it;
- the worker dies with the service, whatever killed it: the kernel kills it when the
  service's thread that started it ends (``PR_SET_PDEATHSIG`` on Linux), and a thread
  waiting on the parent's sentinel ends it too. The multiprocessing resource tracker ends on
  its own once neither holds its pipe.

This module is imported by the worker, so it imports nothing heavy at the top: no torch, no
FastAPI, only ``csi_edge`` inside the worker function.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = [
    "DEFAULT_MAX_DECODED_BYTES",
    "DEFAULT_MEMORY_BYTES",
    "DEFAULT_TIMEOUT_S",
    "ParserBusyError",
    "ParserCrashedError",
    "ParserTimeoutError",
    "RecordingParser",
    "encode_recording",
]

log = logging.getLogger("csi_cloud.upload")

#: Defaults of :class:`RecordingParser` (the service's uploads are at most 64 MiB).
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MEMORY_BYTES = 2 * 2**30
DEFAULT_MAX_DECODED_BYTES = 512 * 2**20

_U32 = 1 << 32
_U48 = 1 << 48
_ENCODE_CHUNK = 64  # segments per encoder call (bounds the worker's memory)
_encoders: dict[tuple[str, str], Any] = {}  # worker-process cache: (folder, id) -> EdgeEncoder


def _error(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": kind, "message": message, **extra}


def encode_recording(path: str, model_folder: str, model_id: str, level: int,
                     epoch: int = 1) -> dict[str, Any]:
    """Worker: a recording file -> the wire payloads an edge on this model would send.

    Never raises (exceptions of this project do not survive pickling): returns
    ``{"ok": True, "payloads": [bytes], "segments": n, "dropped": {...}, "recording": {...}}``
    or ``{"ok": False, "error": kind, "message": ...}`` with kind ``format`` (the file is not
    a readable recording), ``too_large`` (it declares more than the decoded-byte limit, or
    needs more memory than the worker may use), ``spec_mismatch`` (it does not fit the model,
    with ``recording`` describing the file) or ``internal``.
    """
    import numpy as np

    from csi_edge import CSIError, SpecMismatchError, read_recording
    from csi_edge.bundle import EdgeEncoder, SegmentCodes, encode_message_codes
    from csi_edge.codec import Payload, SegmentRecord, encode_payload, message_groups
    from csi_edge.limits import DeclaredSizeError
    from csi_edge.preprocess import Preprocessor

    recording: dict[str, Any] | None = None
    try:
        key = (model_folder, model_id)
        encoder = _encoders.get(key)
        if encoder is None:
            encoder = EdgeEncoder(model_folder)
            if encoder.manifest.id != model_id:
                return _error("internal", f"bundle folder {model_folder} holds model "
                                          f"{encoder.manifest.id[:12]}…, not {model_id[:12]}…")
            _encoders.clear()  # one model at a time is enough for uploads
            _encoders[key] = encoder
        frames = read_recording(path)
        recording = {
            "format": frames.format, "device": frames.info.device, "frames": len(frames),
            "antennas": frames.antennas, "subcarriers": len(frames.info.subcarriers),
            "bandwidth_mhz": frames.info.bandwidth_mhz,
            "duration_s": round(frames.duration_s, 3), "rate_hz": round(frames.rate_hz, 2),
        }
        try:
            batch = Preprocessor(encoder.spec).process(frames)
        except SpecMismatchError as exc:
            return _error("spec_mismatch", str(exc), recording=recording)
        manifest = encoder.manifest
        spec = manifest.input_spec
        dropped = batch.dropped.as_dict()
        if not len(batch):
            return _error("no_segments", f"the recording ({recording['frames']} frames over "
                                         f"{recording['duration_s']} s) yields no complete "
                                         f"segment of {spec.segment_s:g} s at "
                                         f"{spec.nominal_rate_hz:g} Hz "
                                         f"(frames left out: {dropped or 'none'})",
                          recording=recording)
        # Segment timing exactly as the edge agent stamps it: one grid from the first segment.
        segment_ms = round(spec.segment_s * 1000)
        index = batch.index.astype(np.int64)
        base_ms = round(float(batch.start_time[0]) * 1000) - int(index[0]) * segment_ms
        if base_ms < 0 or base_ms + int(index[-1]) * segment_ms >= _U48:
            base_ms = 0  # a clock the wire format cannot carry: count from 0 instead
        codes: list[SegmentCodes] = []
        for start in range(0, len(batch), _ENCODE_CHUNK):
            symbols, profile = encoder.encode(batch.data[start : start + _ENCODE_CHUNK])
            codes.extend(encoder.codes(s, p, level)
                         for s, p in zip(symbols, profile, strict=True))
        # Messages of consecutive segments, as many per message as the level says.
        payloads = [encode_payload(Payload(
            level=level, model_id=encoder.model_id, epoch=epoch, first_seq=group[0] % _U32,
            timestamp_ms=base_ms + int(index[group[0]]) * segment_ms,
            segments=tuple(SegmentRecord(float(batch.quality[i])) for i in group),
            codes=encode_message_codes([codes[i] for i in group], manifest, encoder.tables)))
            for group in message_groups(index.tolist(), manifest.level(level).segments_per_message)]
        return {"ok": True, "payloads": payloads, "segments": len(batch), "dropped": dropped,
                "recording": recording}
    except DeclaredSizeError as exc:
        return _error("too_large", str(exc), recording=recording)
    except CSIError as exc:
        return _error("format", str(exc), recording=recording)
    except Exception as exc:  # a parser's own error on input it does not expect
        log.warning("parsing %s failed", path, exc_info=True)
        return _error("format", f"{type(exc).__name__}: {exc}", recording=recording)


# -- inside the worker process ------------------------------------------------------------


def _vm_size() -> int:
    """This process's virtual memory size in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _init_worker(service_pid: int, memory_bytes: int | None) -> None:
    """Worker initializer: end with the service, then the address-space limit.

    The worker ends when the service is gone, however it ended (a SIGKILL included), so
    neither it nor multiprocessing's resource tracker (which exits once the last process
    holding its pipe is gone) outlives the service: the kernel's parent-death signal, SIGKILL
    because the worker may be busy in native code holding the GIL, and a watch thread as a
    second line where that signal is not available.

    The limit counts from the worker's size once started (interpreter, numpy, thread stacks
    already mapped), so it bounds what a file can make it allocate, whatever the platform's
    baseline is.
    """
    from csi_edge.lifetime import die_with_parent, watch_parent

    die_with_parent(service_pid, signal.SIGKILL)
    watch_parent(service_pid)
    if memory_bytes is not None:
        import resource

        limit = _vm_size() + memory_bytes
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _run_job(worker: Callable[..., dict[str, Any]], cpu_s: float | None,
             max_decoded_bytes: int | None, args: tuple[Any, ...]) -> dict[str, Any]:
    """One job in the worker: a kernel-enforced CPU-time limit for its duration, the decoded
    byte limit for every reader it calls, and ``MemoryError`` turned into ``too_large``."""
    import contextlib
    import resource

    from csi_edge.limits import decoded_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if cpu_s is not None:
        used = resource.getrusage(resource.RUSAGE_SELF)
        spent = used.ru_utime + used.ru_stime
        cpu_limit = math.ceil(spent + cpu_s) + 1
        if hard == resource.RLIM_INFINITY or cpu_limit < hard:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, hard))
    try:
        with (decoded_limit(max_decoded_bytes) if max_decoded_bytes is not None
              else contextlib.nullcontext()):
            return worker(*args)
    except MemoryError:
        return _error("too_large", "the recording needs more memory than the parser may use")
    finally:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


# -- in the service -----------------------------------------------------------------------


def _exit_codes(processes: list[Any], timeout_s: float) -> list[int]:
    """The exit codes of ``processes`` once they are reaped, waiting up to ``timeout_s``.

    The pool's own manager thread reaps a dead worker too. When its ``waitpid`` wins,
    ours fails with ECHILD and ``join`` returns with ``exitcode`` still ``None`` until that
    thread has stored the code on the shared ``Popen``: so join again until it shows.
    """
    deadline = time.monotonic() + timeout_s
    for process in processes:
        while process.exitcode is None and time.monotonic() < deadline:
            process.join(timeout=0.05)
            if process.exitcode is None:  # reaped elsewhere: join returns at once, so pause
                time.sleep(0.01)
    return [process.exitcode for process in processes if process.exitcode is not None]


class ParserCrashedError(RuntimeError):
    """The worker process died while parsing (e.g. a segfault in a native parser)."""


class ParserTimeoutError(RuntimeError):
    """The worker took longer than the parser's time limit (it was killed)."""


class ParserBusyError(RuntimeError):
    """Too many uploads are waiting for the worker."""


class RecordingParser:
    """One spawned worker process that runs :func:`encode_recording`, replaced when it dies.

    Jobs run one at a time; ``max_waiting`` more may wait (per event loop), beyond that
    :class:`ParserBusyError`. ``timeout_s`` counts from when a job starts running (wall time,
    and CPU time enforced by the kernel in the worker). ``memory_bytes``: how much the worker
    may grow beyond its size once started (``RLIMIT_AS``); ``max_decoded_bytes``: what a
    file may declare (:mod:`csi_edge.limits`). ``None`` lifts a limit. Limits changed later
    apply to workers started later (``memory_bytes``) or to the next job (the others).
    """

    def __init__(self, worker: Callable[..., dict[str, Any]] = encode_recording, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_waiting: int = 8,
                 memory_bytes: int | None = DEFAULT_MEMORY_BYTES,
                 max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES) -> None:
        self.worker = worker
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self.memory_bytes = memory_bytes
        self.max_decoded_bytes = max_decoded_bytes
        self.crashes = 0
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                               tuple[asyncio.Semaphore, list[int]]] = \
            weakref.WeakKeyDictionary()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker, initargs=(os.getpid(), self.memory_bytes))
            return self._pool

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        """Kill the pool's worker (it crashed or hangs) so the next job gets a fresh one."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        processes = dict(getattr(pool, "_processes", None) or {})
        for process in processes.values():
            if process.is_alive():
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes.values():
            process.join(5)

    def _gate(self) -> tuple[asyncio.Semaphore, list[int]]:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = (asyncio.Semaphore(1), [0])
        return gate

    async def run(self, *args: Any) -> dict[str, Any]:
        """``worker(*args)`` in the worker process."""
        semaphore, waiting = self._gate()
        if waiting[0] > self.max_waiting:
            raise ParserBusyError(f"{waiting[0]} uploads are already waiting for the parser")
        waiting[0] += 1
        try:
            async with semaphore:
                return await self._run(args)
        finally:
            waiting[0] -= 1

    async def _run(self, args: tuple[Any, ...]) -> dict[str, Any]:
        pool = self._executor()
        # CPU time may run ahead of wall time in threaded native code: twice the limit.
        job = functools.partial(_run_job, self.worker, 2 * self.timeout_s,
                                self.max_decoded_bytes, args)
        try:
            future: Future[dict[str, Any]] = pool.submit(job)
        except (BrokenProcessPool, RuntimeError):  # broken or shut down meanwhile
            self._discard(pool)
            pool = self._executor()
            future = pool.submit(job)
        workers = list((getattr(pool, "_processes", None) or {}).values())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except BrokenProcessPool as exc:
            self.crashes += 1
            self._discard(pool)
            codes = await asyncio.to_thread(_exit_codes, workers, 2.0)
            detail = f" (exit code {codes[0]})" if codes else ""
            log.warning("upload parser worker died%s", detail)
            raise ParserCrashedError(f"the parser process died on this file{detail}") from exc
        except TimeoutError as exc:
            self._discard(pool)
            raise ParserTimeoutError(f"parsing took longer than {self.timeout_s:g} s") from exc
        except asyncio.CancelledError:
            # The client went away: a job still running would hold the worker; kill it.
            if not future.done():
                self._discard(pool)
            raise

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
