"""Data types of the dataset registry: labelled examples, an index of a folder, a dataset spec."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from csi_edge._errors import CSIError

__all__ = [
    "LABEL_KEYS",
    "DatasetIndex",
    "DatasetSpec",
    "Duplicate",
    "Example",
    "IgnoredFile",
    "LabelKey",
    "ParsedLabels",
    "UnknownDatasetError",
]

LabelKey = Literal["activity", "identity", "room", "session", "recording_id", "format", "dataset"]
# Example fields that hold a string label; splits and counts accept only these.
LABEL_KEYS: tuple[str, ...] = (
    "activity", "identity", "room", "session", "recording_id", "format", "dataset",
)


class UnknownDatasetError(CSIError, LookupError):
    """A dataset name the registry does not know; the message lists the known names."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown dataset {name!r}; known datasets: {', '.join(known)}")


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled recording (or one labelled time range of a recording).

    ``recording_id`` is the truncated sha256 of the file content: byte-identical files share
    it, and splits keep every example of one recording on the same side.
    """

    path: Path
    activity: str
    identity: str | None
    room: str | None
    session: str
    recording_id: str
    format: str
    dataset: str = ""
    start: float | None = None  # labelled range on the recording's clock; None = whole file
    end: float | None = None

    def label(self, key: str) -> str | None:
        """The value of one label field (``activity``, ``identity``, ``room``, ``session``...)."""
        if key not in LABEL_KEYS:
            raise ValueError(f"unknown label key {key!r}; choose one of {', '.join(LABEL_KEYS)}")
        return getattr(self, key)


@dataclass(frozen=True, slots=True)
class IgnoredFile:
    """A file under the data folder that did not become an example, and why."""

    path: Path
    reason: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A byte-identical copy left out of the index (the first path in sorted order is kept)."""

    removed: Path
    kept: Path
    recording_id: str
    same_labels: bool = True  # False: the copies sit under different labels (a labelling error)


@dataclass(frozen=True, slots=True)
class DatasetIndex:
    """The examples found in one folder for one dataset, plus what was left out."""

    name: str
    root: Path
    label_key: str  # the task label: "activity", or "identity" for person identification
    examples: tuple[Example, ...]
    duplicates: tuple[Duplicate, ...] = ()
    ignored: tuple[IgnoredFile, ...] = ()

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    @property
    def duplicates_removed(self) -> int:
        return len(self.duplicates)

    @property
    def recordings(self) -> int:
        """Unique recordings (files); more than one example may come from one file."""
        return len({e.recording_id for e in self.examples})

    def counts(self, key: str | None = None) -> dict[str, int]:
        """Examples per value of ``key`` (default: the task label), sorted by value."""
        key = key or self.label_key
        counter = Counter(str(e.label(key)) for e in self.examples)
        return dict(sorted(counter.items()))


@dataclass(frozen=True, slots=True)
class ParsedLabels:
    """Labels a dataset layout gives one file (or one time range of it)."""

    activity: str
    identity: str | None
    room: str | None
    session: str
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """What the registry knows about a dataset: provenance, layout, label meaning."""

    name: str
    title: str
    description: str
    source_url: str
    license: str  # as stated by the source
    citation: str
    format: str  # reader format name (csi_edge.readers.FORMATS)
    label_key: str  # Example field that is the task label
    labels: tuple[str, ...] | None  # the closed label set, None where it is open
    label_meaning: str
    layout: str  # expected folder layout, shown in errors
    how_to_get: str
    # Labels from a file's path relative to the data folder, or the reason it is not an example.
    parse: Callable[[tuple[str, ...]], ParsedLabels | str] = field(repr=False, compare=False)
    # Optional second step for formats whose labels live inside the file (project recordings):
    # called once per unique file, after deduplication.
    expand: Callable[[Path, ParsedLabels], list[ParsedLabels] | str] | None = field(
        default=None, repr=False, compare=False
    )
