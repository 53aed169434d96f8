"""A JSON-ready summary of one dataset folder: counts per class, per split, per domain."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ._model import DatasetIndex
from ._registry import index_dataset
from ._splits import random_split

__all__ = ["summarize", "summarize_index"]


def _counts(values: list[str | None]) -> dict[str, int] | None:
    """Examples per value; examples without one are not counted (None: no example has one)."""
    counter = Counter(v for v in values if v is not None)
    return dict(sorted(counter.items())) if counter else None


def summarize_index(
    index: DatasetIndex, seed: int = 0, val: float = 0.15, test: float = 0.15
) -> dict[str, Any]:
    """The summary of an index already built (see :func:`summarize`)."""
    key = index.label_key
    classes = index.counts(key)
    split = random_split(index.examples, seed, val=val, test=test, stratify=key)
    splits = {
        part: {c: counts.get(c, 0) for c in classes} for part, counts in split.counts(key).items()
    }
    examples = index.examples
    summary: dict[str, Any] = {
        "dataset": index.name,
        "total": len(examples),
        "classes": classes,
        "splits": splits,
        "label": key,
        "recordings": index.recordings,
        "split_protocol": {
            "seed": seed, "val": val, "test": test, "stratify": key, "group": "recording_id",
        },
        "identities": _counts([e.identity for e in examples]),
        "rooms": _counts([e.room for e in examples]),
        "sessions": _counts([e.session for e in examples]),
        "duplicates_removed": index.duplicates_removed,
        "duplicates": [
            {
                "removed": d.removed.relative_to(index.root).as_posix(),
                "kept": d.kept.relative_to(index.root).as_posix(),
                "same_labels": d.same_labels,
            }
            for d in index.duplicates
        ],
        "ignored_files": [
            {"path": i.path.relative_to(index.root).as_posix(), "reason": i.reason}
            for i in index.ignored
        ],
        "data_dir": str(index.root),
    }
    return summary


def summarize(
    name: str, data_dir: str | Path, seed: int = 0, val: float = 0.15, test: float = 0.15
) -> dict[str, Any]:
    """Index ``data_dir`` as ``name`` and count it.

    Keys: ``dataset``, ``total`` (examples: one per recording except for project
    recordings, which give one per labelled range), ``classes`` (task label -> count),
    ``splits`` (train/val/test -> class -> count, from :func:`random_split` with ``seed``,
    every class listed), then ``label``, ``recordings``, ``split_protocol``, ``identities``,
    ``rooms``, ``sessions`` (None where the dataset has no such label),
    ``duplicates_removed``, ``duplicates``, ``ignored_files`` (path and reason), ``data_dir``.
    Class counts add up to ``total`` and each split's counts add up to its size.
    """
    return summarize_index(index_dataset(name, data_dir), seed=seed, val=val, test=test)
