"""Generated docs stay in step with the code."""

from __future__ import annotations

from pathlib import Path

from csi_cloud.configdoc import render, render_wire

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_configuration_reference_is_current() -> None:
    assert (DOCS / "configuration.md").read_text() == render(), \
        "run: python -m csi_cloud.configdoc > docs/configuration.md"


def test_wire_format_doc_is_current() -> None:
    assert (DOCS / "wire-format.md").read_text() == render_wire(), \
        "run: python -m csi_cloud.configdoc wire > docs/wire-format.md"


def test_cloud_doc_names_every_rejection_reason_ingest_gives() -> None:
    from csi_edge.codec import DECODE_REASONS

    checks = (DOCS / "cloud.md").read_text().split("- **Checks**", 1)[1].split("\n- ", 1)[0]
    missing = [r for r in sorted({*DECODE_REASONS, "unknown_model", "bad_level", "bad_codes"})
               if f"`{r}`" not in checks]
    assert not missing, f"docs/cloud.md's checks miss {missing}"


def test_the_beyond_report_section_takes_every_figure_from_its_results() -> None:
    """bench/beyond.py writes its report section from bench/results/beyond.json: every figure
    in it moves when the results move, so none is typed into the prose."""
    import importlib.util
    import json
    import re
    from typing import Any

    root = DOCS.parent
    spec = importlib.util.spec_from_file_location("bench_beyond", root / "bench" / "beyond.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def moved(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, str):  # figures in the results' own words move too
            return re.sub(r"\d+", lambda m: str(int(m.group()) + 7), value)
        return value * 1.37 if type(value) in (int, float) else value

    results = {**json.loads((root / "bench" / "results" / "beyond.json").read_text()),
               "date": "DATE"}
    typed = []
    for line, other in zip(bench._report(results).splitlines(),
                           bench._report(moved(results)).splitlines(), strict=True):
        figures = re.findall(r"\d+(?:\.\d+)?", line)
        if len(figures) != len(re.findall(r"\d+(?:\.\d+)?", other)):
            continue  # a format that changed with the value: the figure moved
        typed += [a for a, b in zip(figures, re.findall(r"\d+(?:\.\d+)?", other), strict=True)
                  if a == b and float(a) != 0 and ("." in a or float(a) >= 10)]
    assert not typed, f"figures typed into the bench/beyond.py report prose: {typed}"
