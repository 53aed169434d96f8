"""The registry: named datasets, and indexing a folder into labelled examples.

Indexing reads names and folders, checks each candidate's first bytes against the dataset's
format and hashes its content; it never decodes CSI, so a full dataset indexes in well under
a second.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from csi_edge._errors import FormatError, NoRecordingsError
from csi_edge.readers import detect_format

from ._layouts import SPECS
from ._model import (
    DatasetIndex,
    DatasetSpec,
    Duplicate,
    Example,
    IgnoredFile,
    ParsedLabels,
    UnknownDatasetError,
)

__all__ = ["DATASETS", "RECORDING_ID_CHARS", "get_dataset", "index_dataset", "list_datasets"]

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in SPECS}
RECORDING_ID_CHARS = 16  # hex digits of sha256 kept: 64 bits, no collision at these sizes
_SHOWN_REASONS = 3


def _normalise(name: str) -> str:
    # "NTU-Fi_HAR" (the SenseFi folder name) and "ntu_fi_har" both mean "ntu-fi-har".
    return name.strip().lower().replace("_", "-")


def get_dataset(name: str) -> DatasetSpec:
    """The spec of a dataset by name; :class:`UnknownDatasetError` lists the known names."""
    spec = DATASETS.get(_normalise(name))
    if spec is None:
        raise UnknownDatasetError(name, list_datasets())
    return spec


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return sorted(DATASETS)


def _files(root: Path) -> list[Path]:
    """Every regular file under ``root``, sorted; hidden files and folders are skipped."""
    found: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        # Hidden entries are tool state (.git, .DS_Store), never recordings.
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found.extend(Path(folder) / n for n in names if not n.startswith("."))
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(root).parts)


def _recording_id(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:RECORDING_ID_CHARS]


def _check_format(path: Path, expected: str) -> str | None:
    """Why the file's content is not of the expected format, or None if it is."""
    try:
        found = detect_format(path)
    except FormatError as exc:
        return exc.problem
    return None if found == expected else f"content is {found}, not {expected}"


def _not_found(spec: DatasetSpec, root: Path, files: int, ignored: list[IgnoredFile]) -> str:
    if files == 0:
        return f"no {spec.title} recordings: the folder holds no files"
    shown = "; ".join(
        f"{i.path.relative_to(root).as_posix()}: {i.reason}" for i in ignored[:_SHOWN_REASONS]
    )
    more = f" (and {len(ignored) - _SHOWN_REASONS} more)" if len(ignored) > _SHOWN_REASONS else ""
    return (
        f"no {spec.title} recordings among {files} files; expected {spec.layout}; "
        f"not recognised: {shown}{more}"
    )


def index_dataset(name: str, data_dir: str | Path) -> DatasetIndex:
    """Index ``data_dir`` as dataset ``name``: labelled examples, duplicates, ignored files.

    Byte-identical files are kept once (the first by sorted path). Raises
    :class:`NoRecordingsError` naming the folder when it holds no recognised recording.
    """
    spec = get_dataset(name)
    root = Path(os.path.abspath(data_dir))  # normalised, symlinks kept as named
    if not root.exists():
        raise NoRecordingsError(root, f"no such folder (looking for {spec.title} recordings)")
    if not root.is_dir():
        raise NoRecordingsError(root, f"is not a folder (looking for {spec.title} recordings)")
    files = _files(root)
    ignored: list[IgnoredFile] = []
    candidates: list[tuple[Path, ParsedLabels, str]] = []
    for path in files:
        parsed = spec.parse((root.name, *path.relative_to(root).parts))
        if isinstance(parsed, str):
            ignored.append(IgnoredFile(path, parsed))
            continue
        problem = _check_format(path, spec.format)
        if problem is not None:
            ignored.append(IgnoredFile(path, problem))
            continue
        candidates.append((path, parsed, _recording_id(path)))

    first: dict[str, tuple[Path, ParsedLabels]] = {}
    duplicates: list[Duplicate] = []
    unique: list[tuple[Path, ParsedLabels, str]] = []
    for path, parsed, rid in candidates:  # sorted by path, so the first copy is kept
        if rid in first:
            kept, kept_labels = first[rid]
            same = (kept_labels.activity, kept_labels.identity, kept_labels.room) == (
                parsed.activity, parsed.identity, parsed.room
            )
            duplicates.append(Duplicate(path, kept, rid, same_labels=same))
            continue
        first[rid] = (path, parsed)
        unique.append((path, parsed, rid))

    examples: list[Example] = []
    for path, parsed, rid in unique:
        labels = spec.expand(path, parsed) if spec.expand is not None else [parsed]
        if isinstance(labels, str):
            ignored.append(IgnoredFile(path, labels))
            continue
        examples.extend(
            Example(
                path=path,
                activity=lab.activity,
                identity=lab.identity,
                room=lab.room,
                session=lab.session,
                recording_id=rid,
                format=spec.format,
                dataset=spec.name,
                start=lab.start,
                end=lab.end,
            )
            for lab in labels
        )
    if not examples:
        raise NoRecordingsError(root, _not_found(spec, root, len(files), ignored))
    return DatasetIndex(
        name=spec.name,
        root=root,
        label_key=spec.label_key,
        examples=tuple(examples),
        duplicates=tuple(duplicates),
        ignored=tuple(sorted(ignored, key=lambda i: i.path.relative_to(root).parts)),
    )
