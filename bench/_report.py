"""Benches render their results into the shipped reports (models/<name>/report.md) between
their own begin/end markers: one function puts a section there, replacing the old one."""

from __future__ import annotations

from pathlib import Path

__all__ = ["put_section"]


def put_section(path: Path, begin: str, end: str, body: str) -> None:
    """Write ``body`` between ``begin`` and ``end`` in ``path`` (appended where absent)."""
    text = path.read_text()
    section = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
