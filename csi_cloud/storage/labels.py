"""Labels on store files no longer written, and the recovery of a file whose writer died."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from csi_edge import recording as layout

from .reader import store_counts
from .writer import lock_path

__all__ = ["LabelResult", "label_closed", "recover", "writer_gone"]

log = logging.getLogger("csi_cloud.storage")

_FRAME_DATASETS = ("timestamp", "amplitude", "phase", "rssi", "seq")


@dataclass(slots=True)
class LabelResult:
    """What :meth:`RecordingStore.label_range` did: files labelled, and files it could not."""

    files: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: bool = False  # kept for files the AP opens later


def label_closed(path: Path, label: layout.Label) -> None:
    """Append a label to a file no longer written (recovered first if its writer died)."""
    try:
        f = h5py.File(path, "r+", libver=layout.LIBVER)
    except OSError as exc:
        if "already open" not in str(exc) or not writer_gone(path):
            raise
        recover(path)
        f = h5py.File(path, "r+", libver=layout.LIBVER)
    with f:
        frames, labels, _ = store_counts(f, path)
        if "committed" not in f:  # no commit record yet: one now (SWMR mode creates nothing)
            f.create_dataset("committed", data=np.array([frames, labels], dtype=np.int64))
        f.swmr_mode = True
        layout.put_rows(f["labels"], labels, layout.label_rows([label]))
        layout.commit(f, [(f["committed"], (frames, labels + 1))])


def writer_gone(path: Path) -> bool:
    """True when no process holds the file's writer lock (its writer died)."""
    lock = lock_path(path)
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also releases the lock if we got it
    with contextlib.suppress(OSError):
        lock.unlink()
    return True


def recover(path: str | Path) -> None:
    """Rewrite a file left by a killed writer as a clean one holding exactly its committed
    content (atomically replaced), so it can be opened for writing again."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.recover")
    with layout.open_recording(path) as src, h5py.File(tmp, "w", libver=layout.LIBVER) as dst:
        frames, labels, segments = store_counts(src, path)
        for k, v in src.attrs.items():
            dst.attrs[k] = v

        def copy(ds: h5py.Dataset, parent: h5py.Group, name: str, n: int | None) -> None:
            data = ds[()] if n is None else ds[:n]
            kwargs: dict[str, Any] = {"maxshape": ds.maxshape, "chunks": ds.chunks,
                                      "dtype": ds.dtype}
            if ds.compression:
                kwargs.update(compression=ds.compression, compression_opts=ds.compression_opts,
                              shuffle=ds.shuffle)
            parent.create_dataset(name, data=data, **kwargs)

        for name, ds in src.items():
            if isinstance(ds, h5py.Dataset):
                n = (frames if name in _FRAME_DATASETS else labels if name == "labels"
                     else None)
                copy(ds, dst, name, n)
        if "segments" in src:
            g = dst.create_group("segments")
            for name, ds in src["segments"].items():
                copy(ds, g, name, None if name == "committed" else segments)
    os.replace(tmp, path)
    log.info("recovered %s (frames, labels, segments committed: %d, %d, %d)", path,
             frames, labels, segments)
