"""The recordings writer in its own process.

HDF5 writes (h5py holds the GIL) and the decoder that turns codes back into CSI amplitude are
the most expensive part of ingest with many APs; done in the service process they stall the
event loop that serves predictions. :class:`RecorderProcess` runs a
:class:`~csi_cloud.storage.RecordingStore` in a child process and mirrors its methods:
``append`` is a non-blocking queue put (the codes only cross the process boundary: a few
dozen bytes a segment); ``label_range`` and ``files`` wait for the child's answer. A child that
dies is started again, and what it had not committed is lost (at most ``flush_s`` seconds).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .records import DecodedRecord

__all__ = ["RecorderProcess"]

log = logging.getLogger("csi_cloud.recorder")

_Row = tuple[Any, ...]


class RecorderProcess:
    def __init__(self, folder: Path, *, models: Path, reconstruction: bool, max_bytes: int,
                 max_s: float, flush_s: float, max_backlog: int = 2000) -> None:
        self.max_backlog = max_backlog  # append calls waiting; beyond it, new ones are dropped
        self._ctx = mp.get_context("spawn")
        self._behind = 0  # segments dropped here: the recorder was behind
        self._failed: Any = self._ctx.Value("q", 0)  # segments the child failed to write
        self._options = {"parent": os.getpid(), "folder": str(folder), "models": str(models),
                         "reconstruction": reconstruction, "max_bytes": max_bytes,
                         "max_s": max_s, "flush_s": flush_s}
        self._lock = threading.Lock()
        self._proc: Any = None
        self._start()

    def _start(self) -> None:
        self._requests: Any = self._ctx.Queue()
        self._replies: Any = self._ctx.Queue()
        self._proc = self._ctx.Process(target=_serve, name="csi-recorder", daemon=True,
                                       args=(self._options, self._requests, self._replies,
                                             self._failed))
        self._proc.start()

    def _alive(self) -> None:
        if not self._proc.is_alive():
            log.error("recorder process exited (code %s); starting a new one",
                      self._proc.exitcode)
            self._start()

    @property
    def dropped_segments(self) -> int:
        """Segments left out of the recordings: dropped while behind, or failed to write."""
        return self._behind + int(self._failed.value)

    def append(self, segments: Sequence[DecodedRecord]) -> None:
        rows = [(r.site, r.ap, r.epoch, r.seq, r.timestamp_ms, r.level, r.quality, r.model.id,
                 r.codes.latent, r.codes.profile, r.code_bytes, r.received) for r in segments]
        if rows:
            self._alive()
            # Never let a slow disk hold ingest up or grow memory without bound.
            if self._requests.qsize() > self.max_backlog:
                self._behind += len(rows)
                if self._behind == len(rows):
                    log.warning("recorder is behind by %d batches: dropping segments from the "
                                "recordings (predictions are unaffected)", self.max_backlog)
                return
            self._requests.put(("append", rows))

    def flush(self) -> None:
        self._call("flush")

    def files(self, site: str, ap: str) -> Any:
        return self._call("files", site, ap)

    def label_range(self, site: str, ap: str, start: float, end: float,
                    activity: str | None, identity: str | None) -> Any:
        return self._call("label_range", site, ap, start, end, activity, identity)

    def _call(self, method: str, *args: Any, timeout_s: float = 60.0) -> Any:
        with self._lock:
            self._alive()
            self._requests.put((method, args))
            try:
                ok, value = self._replies.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"recorder did not answer {method} in {timeout_s} s") from None
        if not ok:
            raise RuntimeError(f"recorder {method} failed: {value}")
        return value

    def close(self) -> None:
        if self._proc is None:
            return
        if self._proc.is_alive():
            self._requests.put(("close", ()))
            self._proc.join(20)
            if self._proc.is_alive():
                self._proc.kill()
        self._proc = None


def _exit_with_parent() -> None:
    """Linux: get SIGTERM when the service dies, even by SIGKILL (no orphaned recorder)."""
    import ctypes
    import signal as _signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, _signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the idle loop notices the parent is gone


def _serve(options: dict[str, Any], requests: Any, replies: Any, failed: Any = None) -> None:
    import torch

    from csi_edge.bundle import SegmentCodes

    from .registry import ModelRegistry
    from .storage import RecordingStore

    _exit_with_parent()
    # The pid the service had, not getppid() now: a service killed while this process was
    # still starting would otherwise leave it waiting under init forever.
    parent = int(options["parent"])
    # Recordings are best effort: the scheduler should favour the process serving predictions.
    os.nice(10)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s recorder: %(message)s")
    registry = ModelRegistry(Path(options["models"]))
    store = RecordingStore(Path(options["folder"]), reconstruction=options["reconstruction"],
                           max_bytes=options["max_bytes"], max_s=options["max_s"],
                           flush_s=options["flush_s"])
    idle_s = max(0.2, float(options["flush_s"]))

    def records(rows: list[_Row]) -> list[DecodedRecord]:
        out = []
        for (site, ap, epoch, seq, ts, level, quality, model_id, latent, profile, code_bytes,
             received) in rows:
            try:
                model = registry.get(model_id)
            except KeyError:
                registry.refresh()  # a bundle added since (a training job)
                model = registry.get(model_id)
            out.append(DecodedRecord(site, ap, epoch, seq, ts, level, quality, model,
                                     SegmentCodes(level, latent, profile), code_bytes,
                                     received))
        return out

    while True:
        try:
            method, args = requests.get(timeout=idle_s)
        except queue.Empty:
            method, args = "idle", ()
        rows: list[_Row] = []
        while method == "append":
            rows.extend(args)
            try:
                method, args = requests.get_nowait()
            except queue.Empty:
                method, args = "", ()
        if rows:
            try:
                store.append(records(rows))
            except Exception:  # one bad group must not end the recordings
                logging.exception("recording %d segment(s) failed", len(rows))
                if failed is not None:
                    with failed.get_lock():
                        failed.value += len(rows)
        if method == "close":
            store.close()
            return
        if method == "idle":
            if os.getppid() != parent:  # the service is gone: commit and stop
                store.close()
                return
            try:
                store.flush()  # commits files that are due
            except Exception:
                logging.exception("flushing recordings failed")
        elif method in ("flush", "files", "label_range"):
            try:
                replies.put((True, getattr(store, method)(*args)))
            except Exception as exc:
                replies.put((False, f"{type(exc).__name__}: {exc}"))
