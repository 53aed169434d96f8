"""Upload-and-predict: a recording file, or raw wire payloads, in; per-segment predictions out.

``POST /api/v1/predict`` changes nothing (no token): the segments go through a fresh
:class:`~csi_cloud.ingest.Ingestor` under the pseudo AP ``upload/upload``, never the live
per-AP state, and nothing is stored or published.

* ``multipart/form-data`` with ``file`` (any recording format the edge reads), optional
  ``model`` (id, id prefix or name; default the active model) and ``level`` (0..3, default 1).
  The body is streamed to a temporary file under ``max_upload_bytes`` (413 beyond); the file
  is read, preprocessed and edge-encoded into wire payloads in a separate worker process
  (:mod:`csi_cloud.upload`) under memory and time limits: a parser crash (segfault) costs the
  worker, not the service, and the request gets a 422 naming the problem; a file declaring
  more decoded data than the parser may allocate (an HDF5 shape, a zlib bomb) gets a 413
  naming the declared size.
* ``application/json`` ``{"payloads": ["<base64>", ...]}``: payloads as an edge publishes
  them; each refused one is reported by index and reason (the live ingest's reasons).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import contextlib
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from csi_edge import CSIError, detect_format
from csi_edge.readers import SUFFIXES

from ...ingest import BatchResult, Ingestor
from ...records import DecodedRecord, PresenceRecord
from ...registry import UnknownModelError
from ...upload import (
    ParserBusyError,
    ParserCrashedError,
    ParserTimeoutError,
    RecordingParser,
)
from ..deps import CloudDep
from ..facade import Cloud
from ..schemas import (
    PayloadsIn,
    PredictionOut,
    PredictOut,
    RecordingInfo,
    RejectedPayload,
    upload_form_schema,
)

__all__ = ["PARSER", "router"]

router = APIRouter(tags=["predict"])

PARSER = RecordingParser()
atexit.register(PARSER.close)

MAX_SEGMENTS = 20_000  # per /predict request (5.5 hours of 1 s segments)
_MAX_FILENAME = 200


class _TooLargeError(Exception):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"request body is over the limit of {limit} bytes")


async def _limited(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request body, failing as soon as it passes ``limit`` bytes (chunked bodies too)."""
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _TooLargeError(limit)
        yield chunk


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


def _too_large(exc: _TooLargeError) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc))


class _UploadIngestor(Ingestor):
    """A throwaway ingestor that also remembers which payload each rejection belongs to."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = -1
        self.rejected_at: list[RejectedPayload] = []

    def _decode(self, result: BatchResult, site: str, ap: str, data: bytes,
                received: float) -> list[DecodedRecord | PresenceRecord]:
        self.position += 1
        before = len(result.rejected)
        records = super()._decode(result, site, ap, data, received)
        self.rejected_at.extend(RejectedPayload(index=self.position, reason=reason,
                                                detail=detail)
                                for *_, reason, detail in result.rejected[before:])
        return records


def _output(cloud: Cloud, result: BatchResult, ingestor: _UploadIngestor,
            payloads: list[bytes], dropped: dict[str, int],
            recording: RecordingInfo | None) -> PredictOut:
    predictions = [PredictionOut.model_validate(p.as_dict()) for p in result.predictions]
    models = {p.model for p in predictions}
    levels = {p.rate_level for p in predictions}
    model = next(iter(models)) if len(models) == 1 else None
    duplicates = sum(state.counters["duplicates"] for state in ingestor.aps.values())
    if duplicates:
        dropped = {**dropped, "duplicate_segment": int(duplicates)}
    return PredictOut(
        model=model,
        model_name=cloud.model(model).manifest.name if model else None,
        level=next(iter(levels)) if len(levels) == 1 else None,
        segments=len(predictions), dropped=dropped, rejected=ingestor.rejected_at,
        predictions=predictions, payload_bytes=sum(len(p) for p in payloads),
        recording=recording)


@router.post(
    "/predict", response_model=PredictOut,
    summary="Predict over an uploaded recording or raw segment payloads (changes nothing)",
    openapi_extra={"requestBody": upload_form_schema()},
    responses={413: {"description": "body over the upload limit, or a recording that "
                                    "declares more decoded data than the parser may allocate"},
               415: {"description": "neither multipart/form-data nor application/json"},
               422: {"description": "the file cannot be read, does not fit the model, or the "
                                    "request is malformed"},
               429: {"description": "too many uploads waiting for the parser"}})
async def predict(request: Request, cloud: CloudDep) -> PredictOut:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = cloud.settings.max_upload_bytes
    if media == "multipart/form-data":
        return await _predict_upload(request, cloud, limit)
    if media == "application/json":
        return await _predict_payloads(request, cloud, limit)
    raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                        f"content type {media or 'none'!r}: send multipart/form-data with a "
                        "'file', or application/json with 'payloads'")


# -- raw payloads -------------------------------------------------------------------------


async def _predict_payloads(request: Request, cloud: Cloud, limit: int) -> PredictOut:
    try:
        body = b"".join([chunk async for chunk in _limited(request, limit)])
    except _TooLargeError as exc:
        raise _too_large(exc) from None
    try:
        parsed = PayloadsIn.model_validate_json(body)
    except ValidationError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            exc.errors(include_url=False, include_context=False,
                                       include_input=False)) from None
    payloads = []
    for i, text in enumerate(parsed.payloads):
        try:
            payloads.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise _unprocessable(f"payloads[{i}] is not valid base64: {exc}") from None
    # Byte 16 of a payload is its segment count: bound the work before decoding anything.
    segments = sum(p[16] for p in payloads if len(p) > 16)
    if segments > MAX_SEGMENTS:
        raise _unprocessable(f"the payloads claim {segments} segments, more than the "
                             f"{MAX_SEGMENTS} one request may hold")
    result, ingestor = await cloud.classify_apart(payloads, _UploadIngestor)
    dropped = Counter(r.reason for r in ingestor.rejected_at)
    return _output(cloud, result, ingestor, payloads, dict(sorted(dropped.items())), None)


# -- recording upload ---------------------------------------------------------------------


def _filename(upload: UploadFile) -> str:
    name = Path((upload.filename or "").replace("\\", "/")).name
    return name[:_MAX_FILENAME] or "upload"


def _level(value: str | None) -> int:
    if value is None or value == "":
        return 1
    if value.strip() not in ("0", "1", "2", "3"):
        raise _unprocessable(f"level {value[:20]!r} is not a rate level 0..3")
    return int(value)


async def _predict_upload(request: Request, cloud: Cloud, limit: int) -> PredictOut:
    try:
        async with contextlib.aclosing(_limited(request, limit)) as stream:
            form = await MultiPartParser(request.headers, stream, max_files=1, max_fields=8,
                                         max_part_size=4096).parse()
    except _TooLargeError as exc:
        raise _too_large(exc) from None
    except MultiPartException as exc:
        raise _unprocessable(f"malformed multipart body: {exc.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise _unprocessable("form field 'file' must be a file upload (a recording)")
        model_field, level_field = form.get("model"), form.get("level")
        if not isinstance(model_field, str | None) or not isinstance(level_field, str | None):
            raise _unprocessable("form fields 'model' and 'level' must be text")
        level = _level(level_field)
        try:
            model = cloud.model(model_field or cloud.active_model)
        except UnknownModelError:
            served = ", ".join(f"{m.name} ({m.id[:12]})" for m in cloud.manifests())
            raise _unprocessable(f"no model {model_field!r}; served: {served}") from None
        manifest = model.manifest
        if level >= len(manifest.levels):
            raise _unprocessable(f"level {level} not in model {manifest.name!r} "
                                 f"(levels 0..{len(manifest.levels) - 1})")
        name = _filename(upload)
        suffix = Path(name).suffix.lower()
        fd, tmp = tempfile.mkstemp(prefix="csi-upload-",
                                   suffix=suffix if suffix in SUFFIXES else "")
        try:
            with os.fdopen(fd, "wb") as out:
                await asyncio.to_thread(shutil.copyfileobj, upload.file, out, 1 << 20)
            return await _predict_file(cloud, Path(tmp), name, model.id, level)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    finally:
        await form.close()


async def _predict_file(cloud: Cloud, path: Path, name: str, model_id: str,
                        level: int) -> PredictOut:
    def named(message: str) -> str:
        return message.replace(str(path), name)

    try:  # a look at the first bytes, safe in this process: refuse what no reader takes
        fmt = detect_format(path)
    except CSIError as exc:
        raise _unprocessable(named(str(exc))) from None
    manifest = cloud.model(model_id).manifest
    try:
        job = await PARSER.run(str(path), str(cloud.model_folder(model_id)), model_id,
                               level)
    except ParserCrashedError as exc:
        raise _unprocessable(f"{name}: cannot parse this {fmt} file, {exc} (a corrupt or "
                             "hostile file); the service carries on") from None
    except ParserTimeoutError as exc:
        raise _unprocessable(f"{name}: {exc}; the parser was stopped") from None
    except ParserBusyError as exc:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, f"{exc}; retry later",
                            headers={"Retry-After": "5"}) from None
    recording = RecordingInfo(**job["recording"]) if job.get("recording") else None
    if not job["ok"]:
        message = named(job["message"])
        if job["error"] == "spec_mismatch":
            spec = manifest.input_spec
            has = (f"{recording.device}, {recording.antennas} antenna(s), "
                   f"{recording.subcarriers} subcarriers" if recording else fmt)
            raise _unprocessable(
                f"recording {name!r} ({has}) does not fit model {manifest.name!r} "
                f"({model_id[:12]}…: {spec.source_kind}, {spec.antennas} antenna(s), "
                f"{len(spec.subcarriers)} subcarriers, band {spec.band!r}): {message}")
        text = f"{name}: {message}" if name not in message else message
        if job["error"] == "too_large":  # refused before allocating it (or at the rlimit)
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, text)
        raise _unprocessable(text)
    payloads: list[bytes] = job["payloads"]
    if job["segments"] > MAX_SEGMENTS:
        raise _unprocessable(f"{name}: {job['segments']} segments, more than the "
                             f"{MAX_SEGMENTS} one request may hold; split the recording")
    result, ingestor = await cloud.classify_apart(payloads, _UploadIngestor)
    return _output(cloud, result, ingestor, payloads, job["dropped"], recording)
