"""Benches render their results into the shipped reports (models/<name>/report.md) between
their own begin/end markers: one function puts a section there, replacing the old one;
another puts each bundle's section of a results file and writes the file."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["environment", "put_bundle_sections", "put_section", "save_results"]

# The packages whose arithmetic reaches a result: the edge codes (onnxruntime), the network
# (torch), the head's transform (numba), the anchors (scikit-learn, aeon), the rest (numpy,
# scipy) and the readers (csiread).
_NUMERIC_PACKAGES = ("numpy", "scipy", "torch", "onnxruntime", "numba", "scikit-learn", "aeon",
                     "csiread")
# x86 instruction sets the numeric kernels pick their code paths by.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")

ROOT = Path(__file__).resolve().parents[1]


def environment() -> dict[str, Any]:
    """What a results file's figures were computed with: Python, the numeric packages'
    versions and the CPU with its instruction sets. The same code, bundles and recordings
    give slightly different float results on another CPU or package version, and a code
    rounded to the other side of a step changes a prediction now and then (docs/trust.md,
    "Between machines"), so a figure is only comparable with one computed alike."""
    packages: dict[str, str | None] = {}
    for name in _NUMERIC_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    cpu, flags = platform.processor() or platform.machine(), set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: the model name from platform alone
        pass
    return {"python": platform.python_version(), "packages": packages, "cpu": cpu,
            "isa": [f for f in _ISA_FLAGS if f in flags]}


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
    """Write ``report`` to ``out`` (JSON, with its :func:`environment` unless it has one),
    then, unless ``sections`` is None, the report
    sections it renders; say each path written."""
    report.setdefault("environment", environment())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    for path in sections(report) if sections is not None else []:
        print(f"wrote {path}")
