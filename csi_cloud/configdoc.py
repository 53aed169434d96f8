"""The configuration reference (docs/configuration.md), generated from the settings models.

``python -m csi_cloud.configdoc > docs/configuration.md``; a test keeps the file current.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from csi_edge.settings import EdgeSettings, StreamSettings

from .settings import CloudSettings

__all__ = ["render", "render_wire"]


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    return f"`{json.dumps(value, default=str)}`"


def _type(field: FieldInfo) -> str:
    text = str(field.annotation).replace("typing.", "").replace("pathlib.", "")
    return text.replace("<class '", "").replace("'>", "").replace("|", "\\|")


def _table(model: type[Any], env_prefix: str | None) -> list[str]:
    head = "| setting | environment | type | default | meaning |" if env_prefix else \
        "| field | type | default | meaning |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, field in model.model_fields.items():
        cells = [f"`{name}`"]
        if env_prefix:
            cells.append(f"`{env_prefix}{name.upper()}`")
        cells += [_type(field), _default(field), (field.description or "").replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_wire() -> str:
    """docs/wire-format.md: the codec module's and the segment-code layout's documentation."""
    from csi_edge import bundle, codec

    return "\n".join([
        "# Wire format",
        "",
        "Generated from `csi_edge/codec.py` and `csi_edge/bundle.py` by "
        "`python -m csi_cloud.configdoc wire`; do not edit. Golden-bytes tests in "
        "`tests/test_codec_v2.py` (version 2) and `tests/test_codec.py` (version 1) pin it.",
        "",
        "## The MQTT payload",
        "",
        "```",
        (codec.__doc__ or "").strip(),
        "```",
        "",
        "## Codes of a segment and of a message",
        "",
        "```",
        (bundle.__doc__ or "").strip(),
        "```",
        "",
    ])


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the settings models by `python -m csi_cloud.configdoc`; do not edit.",
        "Precedence: command-line options, then environment variables, then the `--config` "
        "file (TOML or JSON, same names as the first column).",
        "",
        "## Edge agent (`csi edge`)",
        "",
        *_table(EdgeSettings, "CSI_EDGE_"),
        "",
        "### One stream (`streams` entries, `--stream SITE/AP=URI`)",
        "",
        *_table(StreamSettings, None),
        "",
        "## Cloud service (`csi cloud`)",
        "",
        *_table(CloudSettings, "CSI_CLOUD_"),
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    print(render_wire() if sys.argv[1:] == ["wire"] else render(), end="")
