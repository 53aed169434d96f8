"""Request and response bodies of ``POST /api/v1/predict`` (upload-and-predict)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .predictions import PredictionOut

__all__ = ["MAX_PAYLOADS", "PayloadsIn", "PredictOut", "RecordingInfo", "RejectedPayload",
           "upload_form_schema"]


MAX_PAYLOADS = 10_000


class PayloadsIn(BaseModel):
    """Raw segment payloads, base64, as an edge publishes them on ``.../seg``."""

    model_config = ConfigDict(extra="forbid")

    payloads: list[str] = Field(min_length=1, max_length=MAX_PAYLOADS,
                                description="base64 (standard alphabet, padded) wire payloads, "
                                            "in the order the edge sent them")


class RejectedPayload(BaseModel):
    index: int = Field(description="position in the request's payload list")
    reason: str = Field(description="why the cloud refused it (the live ingest's reasons: "
                                    "crc_mismatch, unknown_model, bad_codes, ...)")
    detail: str


class RecordingInfo(BaseModel):
    format: str
    device: str
    frames: int
    antennas: int
    subcarriers: int
    bandwidth_mhz: int | None = None
    duration_s: float
    rate_hz: float


class PredictOut(BaseModel):
    model: str | None = Field(description="bundle id the segments were classified with "
                                          "(null: none accepted, or several)")
    model_name: str | None = None
    level: int | None = Field(description="rate level (null: none accepted, or several)")
    segments: int = Field(description="segments classified")
    dropped: dict[str, int] = Field(description="recording: frames left out by reason; "
                                                "payloads: rejected payloads and duplicate "
                                                "segments by reason")
    rejected: list[RejectedPayload] = Field(default_factory=list,
                                            description="payloads refused, by index")
    predictions: list[PredictionOut] = Field(description="one per segment, in stream order; "
                                                         "each over the context of the "
                                                         "segments before it")
    payload_bytes: int = Field(description="wire-format bytes of the payloads (what an edge "
                                           "at this level would have sent)")
    recording: RecordingInfo | None = Field(default=None,
                                            description="what the uploaded file held")


def upload_form_schema() -> dict[str, Any]:
    """The OpenAPI request body: a multipart upload or a JSON list of payloads."""
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": "a recording: Nexmon pcap, Intel 5300 .dat, "
                                                "ESP32 CSV, HDF5 recording, NTU-Fi .mat"},
                        "model": {"type": "string", "description": "bundle id, id prefix "
                                                                   "or name [active model]"},
                        "level": {"type": "integer", "minimum": 0, "maximum": 3, "default": 1,
                                  "description": "rate level to encode at"},
                    },
                },
            },
            "application/json": {"schema": PayloadsIn.model_json_schema()},
        },
    }
