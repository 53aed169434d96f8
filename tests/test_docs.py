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
