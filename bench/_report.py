"""Benches render their results into the shipped reports (models/<name>/report.md) between
their own begin/end markers: one function puts a section there, replacing the old one;
another puts each bundle's section of a results file and writes the file."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["put_bundle_sections", "put_section", "save_results"]

ROOT = Path(__file__).resolve().parents[1]


def put_section(path: Path, begin: str, end: str, body: str) -> None:
    """Write ``body`` between ``begin`` and ``end`` in ``path`` (appended where absent)."""
    text = path.read_text()
    section = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def put_bundle_sections(entries: Mapping[str, Mapping[str, Any]], begin: str, end: str,
                        render: Callable[[str, Mapping[str, Any]], str], needs: str
                        ) -> list[str]:
    """Put ``render(name, entry)`` into ``models/<name>/report.md`` for each entry holding
    the key ``needs`` (a skipped one does not) whose bundle is there; returns the paths."""
    written = []
    for name, entry in entries.items():
        path = ROOT / "models" / name / "report.md"
        if not path.is_file() or needs not in entry:
            continue
        put_section(path, begin, end, render(name, entry))
        written.append(str(path.relative_to(ROOT)))
    return written


def save_results(report: dict[str, Any], out: Path,
                 sections: Callable[[dict[str, Any]], list[str]] | None) -> None:
    """Write ``report`` to ``out`` (JSON), then, unless ``sections`` is None, the report
    sections it renders; say each path written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    for path in sections(report) if sections is not None else []:
        print(f"wrote {path}")
