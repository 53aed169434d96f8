"""The service's recorder: rotation of each AP's files, listing, and label propagation."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np

from csi_edge import CSIError
from csi_edge import recording as layout

from ..model.compression import CloudModel
from ..records import DecodedRecord
from .labels import LabelResult, label_closed
from .reader import RecordingFile, file_info
from .writer import Inverse, OpenFile

__all__ = ["RecordingStore", "safe_name"]

log = logging.getLogger("csi_cloud.storage")
# What reading or labelling one file can raise: logged and reported, never fatal to the store.
_FILE_ERRORS = (OSError, RuntimeError, KeyError, ValueError, CSIError)


def safe_name(name: str) -> str:
    """A site or AP name as one safe path component."""
    text = quote(name, safe="")
    if text.startswith("."):
        text = "%2E" + text[1:]
    return text or "%00"


def _stamp(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y%m%dT%H%M%SZ")


class RecordingStore:
    """The service's recorder: see the module docstring. Thread-safe."""

    def __init__(self, folder: str | Path, *, reconstruction: bool = True,
                 max_bytes: int = 256 * 2**20, max_s: float = 3600.0,
                 fsync_s: float = 1.0, flush_s: float = 0.0) -> None:
        if max_bytes <= 0 or not max_s > 0:
            raise ValueError(f"max_bytes ({max_bytes}) and max_s ({max_s}) must be positive")
        self.folder = Path(folder)
        self.reconstruction = reconstruction
        self.max_bytes = int(max_bytes)
        self.max_s = float(max_s)
        self.fsync_s = float(fsync_s)
        self.flush_s = float(flush_s)
        self._lock = threading.RLock()
        self._open: dict[tuple[str, str], OpenFile] = {}
        self._inverse: dict[str, Inverse | None] = {}
        self._pending: dict[tuple[str, str], list[layout.Label]] = {}
        self._info_cache: dict[Path, tuple[tuple[int, int], RecordingFile]] = {}
        self._closed_lock = threading.RLock()  # files no longer written: info cache, labels
        self._closed = False
        self.written = 0

    # -- paths --

    def ap_folder(self, site: str, ap: str) -> Path:
        return self.folder / safe_name(site) / safe_name(ap)

    def _new_path(self, site: str, ap: str, start_ms: int) -> Path:
        folder = self.ap_folder(site, ap)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{safe_name(site)}_{safe_name(ap)}_{_stamp(start_ms)}"
        path = folder / f"{stem}.h5"
        i = 0
        while path.exists():
            i += 1
            path = folder / f"{stem}-{i}.h5"
        return path

    # -- writing --

    def _inverse_for(self, model: CloudModel) -> Inverse | None:
        if not self.reconstruction:
            return None
        if model.id not in self._inverse:
            inv = Inverse(model)
            if not inv.ok:
                spec = model.manifest.input_spec
                log.warning("model %s (%s, %s normalisation): its reconstruction cannot be "
                            "turned back into amplitude; only the codes are recorded",
                            model.manifest.name, spec.features, spec.normalisation)
            self._inverse[model.id] = inv if inv.ok else None
        return self._inverse[model.id]

    def _needs_new(self, current: OpenFile, record: DecodedRecord) -> bool:
        if current.full or current.model_id != record.model.id:
            return True
        if current.count and record.timestamp_ms < current.end_ms - current.segment_ms // 2:
            return True  # capture time went back (a new epoch with an earlier clock)
        span_ms = record.timestamp_ms + current.segment_ms - current.start_ms
        return span_ms > self.max_s * 1000

    def _open_file(self, site: str, ap: str, record: DecodedRecord) -> OpenFile:
        path = self._new_path(site, ap, record.timestamp_ms)
        opened = OpenFile(path, site, ap, record.model, self._inverse_for(record.model),
                           record.timestamp_ms, self.fsync_s)
        key = (site, ap)
        start = record.timestamp_ms / 1000
        pending = [lab for lab in self._pending.get(key, []) if lab.end > start]
        for lab in pending:
            opened.add_label(lab)
        if key in self._pending:
            self._pending[key] = pending
        log.info("recording %s/%s to %s", site, ap, path)
        return opened

    def _close_file(self, key: tuple[str, str]) -> None:
        current = self._open.pop(key, None)
        if current is not None:
            current.close()

    def append(self, segments: Iterable[DecodedRecord]) -> None:
        """Write a batch of decoded segments (any APs); each file is committed once per batch
        (with ``flush_s`` > 0: once per ``flush_s`` seconds)."""
        by_ap: dict[tuple[str, str], list[DecodedRecord]] = {}
        for record in segments:
            by_ap.setdefault((record.site, record.ap), []).append(record)
        if not by_ap:
            return
        errors: list[BaseException] = []
        with self._lock:
            if self._closed:
                raise RuntimeError("recording store is closed")
            recon = self._reconstructions(by_ap)
            for key, records in by_ap.items():
                try:
                    self._append_ap(key, records, recon)
                except Exception as exc:  # one AP's broken file must not stop the others
                    log.exception("recording %s/%s failed; starting a new file", *key)
                    broken = self._open.pop(key, None)
                    if broken is not None:
                        with contextlib.suppress(Exception):
                            broken.close()
                    errors.append(exc)
            self._commit_due(errors)
            self._close_idle()
        if errors:
            raise errors[0]

    def _reconstructions(self, by_ap: dict[tuple[str, str], list[DecodedRecord]]
                         ) -> dict[int, np.ndarray | None]:
        """Reconstruction per record (by id); computed here where the record lacks one."""
        out: dict[int, np.ndarray | None] = {}
        missing: dict[str, list[DecodedRecord]] = {}
        for records in by_ap.values():
            for r in records:
                if self._inverse_for(r.model) is None:
                    out[id(r)] = None
                elif r.reconstruction is not None:
                    out[id(r)] = r.reconstruction
                else:
                    missing.setdefault(r.model.id, []).append(r)
        for group in missing.values():
            _, _, recon = group[0].model.reconstruct([r.codes for r in group])
            for r, x in zip(group, recon, strict=True):
                out[id(r)] = x
        return out

    def _append_ap(self, key: tuple[str, str], records: list[DecodedRecord],
                   recon: dict[int, np.ndarray | None]) -> None:
        current = self._open.get(key)
        for record in records:
            if current is None or self._needs_new(current, record):
                if current is not None:
                    self._close_file(key)  # commits what it still holds
                current = self._open[key] = self._open_file(*key, record)
            current.queue(record, recon[id(record)])
        self.written += len(records)

    def _commit_due(self, errors: list[BaseException]) -> None:
        """Commit every file whose queued segments are due (all of them with flush_s 0)."""
        now = time.monotonic()
        for key, f in list(self._open.items()):
            if not f.pending or now - f.last_commit < self.flush_s:
                continue
            try:
                f.commit()
            except Exception as exc:
                log.exception("recording %s/%s failed; starting a new file", *key)
                self._open.pop(key, None)
                with contextlib.suppress(Exception):
                    f.close()
                errors.append(exc)
                continue
            if f.size() >= self.max_bytes:
                f.full = True

    def _close_idle(self) -> None:
        now = time.monotonic()
        for key in [k for k, f in self._open.items() if now - f.last_write > self.max_s]:
            self._close_file(key)

    def flush(self) -> None:
        with self._lock:
            for f in self._open.values():
                f.commit(force_fsync=True)

    def close(self) -> None:
        """Close every open file (flushed and synced). Safe to call twice."""
        with self._lock:
            self._closed = True
            for key in list(self._open):
                try:
                    self._close_file(key)
                except Exception:
                    log.exception("closing the recording of %s/%s failed", *key)

    # -- listing --

    def files(self, site: str, ap: str) -> list[RecordingFile]:
        """Every recording file of an AP, oldest first (files that cannot be read are left
        out and logged)."""
        with self._lock:
            current = self._open.get((site, ap))
            if current is not None and current.pending:
                current.commit()
            open_info = current.info() if current is not None else None
        return self._files(site, ap, open_info)

    def _files(self, site: str, ap: str, open_info: RecordingFile | None) -> list[RecordingFile]:
        # Closed files are read under their own lock: the ingest never waits for this.
        folder = self.ap_folder(site, ap)
        with self._closed_lock:
            out = []
            seen = set()
            for path in sorted(folder.glob("*.h5")):
                seen.add(path)
                if open_info is not None and path == open_info.path:
                    out.append(open_info)
                    continue
                try:
                    out.append(self._cached_info(path))
                except _FILE_ERRORS as exc:
                    log.warning("recording %s cannot be read: %s", path, exc)
            for gone in [p for p in self._info_cache if p.parent == folder and p not in seen]:
                del self._info_cache[gone]
            return out

    def _cached_info(self, path: Path) -> RecordingFile:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._info_cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        info = file_info(path)
        self._info_cache[path] = (stamp, info)
        return info

    # -- labels --

    def label_range(self, site: str, ap: str, start: float, end: float,
                    activity: str | None = None, identity: str | None = None) -> LabelResult:
        """Add a label to every file of the AP overlapping ``[start, end)``; a range reaching
        past the AP's newest data is also kept for the files it opens later."""
        label = layout.check_label(start, end, activity, identity)
        result = LabelResult()
        key = (site, ap)
        with self._lock:  # the file being written, and labels for files still to come
            current = self._open.get(key)
            open_info = None
            if current is not None:
                if current.pending:
                    current.commit()
                open_info = current.info()
                if label.end > current.start_ms / 1000:  # it is still growing
                    try:
                        current.add_label(label)
                        current.commit()
                        result.files.append(current.path)
                    except _FILE_ERRORS as exc:
                        log.warning("label not added to %s: %s", current.path, exc)
                        result.failed[str(current.path)] = str(exc)
            infos = self._files(site, ap, open_info)
            ends = [f.end for f in infos if f.end is not None]
            if not ends or label.end > max(ends):
                self._pending.setdefault(key, []).append(label)
                result.pending = True
        with self._closed_lock:
            for info in infos:
                if (info.open or info.start is None or info.end is None
                        or not (label.start < info.end and label.end > info.start)):
                    continue
                try:
                    label_closed(info.path, label)
                    self._info_cache.pop(info.path, None)
                    result.files.append(info.path)
                except _FILE_ERRORS as exc:
                    log.warning("label not added to %s: %s", info.path, exc)
                    result.failed[str(info.path)] = str(exc)
        result.files.sort()
        return result
