"""Model rollout on the edge: fetch a bundle's edge part from the cloud and check it.

The cloud serves ``GET /api/v1/models/{id}/edge`` as a zip holding ``bundle.json`` and the
edge weights it names, and lists what it serves at ``GET /api/v1/models``. A ``switch_model``
command is obeyed only when every check passes, in this order:

1. the URL is under the configured cloud base URL (:func:`check_under_base`: same scheme, host
   and port, path below the base path, no credentials, query, fragment or dot segments); no
   other address is ever contacted, and redirects are not followed, so a command cannot make
   the edge probe other hosts or ports (and nothing about them reaches its status);
2. the id is 64 lowercase hex characters and the cloud's model list names it
   (:func:`cloud_lists`);
3. the zip unpacks into ``models_dir/{id}``, its manifest hashes to that id and the weights to
   their hash (``load_manifest(parts=("edge",))``), nothing half-written is left behind;
4. the encoder loads in ONNX Runtime and codes a segment at every rate level
   (:func:`check_runs`).

Any failure raises :class:`RolloutError`; the caller keeps its current model.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from ._errors import CSIError
from .bundle import BundleError, EdgeEncoder, encode_segment_codes, load_manifest
from .messages import BadMessageError, loads_bounded

__all__ = ["RolloutError", "check_runs", "check_under_base", "cloud_lists", "edge_archive",
           "fetch_bundle", "model_url", "models_url"]

_ALLOWED = {"bundle.json", "edge.onnx"}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LIST_MAX_BYTES = 4 << 20


class RolloutError(CSIError):
    """A bundle announced for rollout could not be fetched or did not check out."""


def model_url(cloud_url: str, model_id: str) -> str:
    return f"{cloud_url.rstrip('/')}/api/v1/models/{model_id}/edge"


def models_url(cloud_url: str) -> str:
    """The cloud's list of the bundles it serves."""
    return f"{cloud_url.rstrip('/')}/api/v1/models"


def check_under_base(url: object, base: str) -> str:
    """``url`` if it lies under the cloud base URL ``base``, else :class:`RolloutError`.

    Same scheme (http or https), host and port (default ports made explicit), and a path equal
    to or below the base path; user info, a query, a fragment or ``.``/``..`` segments (also
    percent-encoded) are refused, so the URL cannot leave the base however it is resolved.
    """
    if not isinstance(url, str):
        raise RolloutError(f"url {url!r:.80} is not a string")
    shown = url if len(url) <= 120 else url[:120] + "…"
    refuse = RolloutError(f"url {shown!r} is not under the cloud base URL {base!r}; "
                          "models are fetched from the cloud only")
    try:
        u, b = urlsplit(url), urlsplit(base)
        u_port = u.port or _DEFAULT_PORTS.get(u.scheme)
        b_port = b.port or _DEFAULT_PORTS.get(b.scheme)
    except ValueError:
        raise refuse from None
    if (u.scheme not in _DEFAULT_PORTS or u.scheme != b.scheme or not u.hostname
            or u.hostname.lower() != (b.hostname or "").lower() or u_port != b_port
            or u.username is not None or u.password is not None or u.query or u.fragment
            or "#" in url or "?" in url or "\\" in url):
        raise refuse
    path = unquote(u.path)
    segments = path.split("/")
    if any(seg in (".", "..") for seg in segments) or "//" in path:
        raise refuse
    root = unquote(b.path).rstrip("/")
    if not (path == root or path.startswith(root + "/")):
        raise refuse
    return url


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are answered as errors: a redirect could lead off the cloud base URL."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, f"redirect refused ({msg})", headers,
                                     fp)


_OPENER = urllib.request.build_opener(_NoRedirect)


def _get(url: str, *, max_bytes: int, timeout_s: float, accept: str,
         token: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with _OPENER.open(request, timeout=timeout_s) as response:
        data: bytes = response.read(max_bytes + 1)
    return data


def cloud_lists(base: str, model_id: str, *, timeout_s: float = 30.0,
                token: str | None = None) -> None:
    """:class:`RolloutError` unless the cloud at ``base`` lists ``model_id`` among the bundles
    it serves (``GET {base}/api/v1/models``)."""
    url = models_url(base)
    try:
        data = _get(url, max_bytes=_LIST_MAX_BYTES, timeout_s=timeout_s,
                    accept="application/json", token=token)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RolloutError(f"cannot read the cloud's model list {url}: {exc}") from exc
    if len(data) > _LIST_MAX_BYTES:
        raise RolloutError(f"the cloud's model list {url} is over {_LIST_MAX_BYTES} bytes")
    try:
        page = loads_bounded(data, max_bytes=_LIST_MAX_BYTES, max_depth=64)
    except BadMessageError as exc:
        raise RolloutError(f"the cloud's model list {url} is not valid: {exc}") from exc
    items = page.get("data") if isinstance(page, dict) else None
    if not isinstance(items, list):
        raise RolloutError(f"the cloud's model list {url} has no 'data' list")
    ids = {item.get("id") for item in items if isinstance(item, dict)}
    if model_id not in ids:
        raise RolloutError(f"model {model_id[:12]}… is not among the {len(ids)} model(s) the "
                           f"cloud serves ({url})")


def check_runs(encoder: EdgeEncoder) -> None:
    """:class:`RolloutError` unless the encoder codes a (zero) segment at every rate level:
    the ONNX session runs, its outputs have the manifest's shapes, the entropy coder takes
    them."""
    spec = encoder.spec
    shape = (1, spec.segment_frames, spec.antennas * spec.channels, len(spec.subcarriers))
    try:
        symbols, profile = encoder.encode(np.zeros(shape, np.float32))
        for level in encoder.manifest.levels:
            codes = encoder.codes(symbols[0], profile[0], level.level)
            encode_segment_codes(codes, encoder.manifest, encoder.tables)
    except Exception as exc:  # ONNX Runtime and numpy fail in their own ways on a bad model
        raise RolloutError(f"model {encoder.manifest.id[:12]}… does not run: "
                           f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def edge_archive(folder: str | Path) -> bytes:
    """The zip the cloud serves for a bundle folder: ``bundle.json`` and the edge weights."""
    folder = Path(folder)
    manifest = load_manifest(folder, parts=("edge",))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(folder / "bundle.json", "bundle.json")
        archive.write(folder / manifest.files["edge"].path, manifest.files["edge"].path)
    return buffer.getvalue()


def fetch_bundle(url: str, model_id: str, models_dir: str | Path, *, max_bytes: int = 50_000_000,
                 timeout_s: float = 30.0, token: str | None = None) -> Path:
    """Download, unpack and verify a bundle's edge part; return its folder (redirects are
    refused; the caller checks ``url`` with :func:`check_under_base` first)."""
    if len(model_id) != 64 or any(c not in "0123456789abcdef" for c in model_id):
        raise RolloutError(f"model id {model_id!r} is not 64 lowercase hex characters")
    target = Path(models_dir) / model_id
    if target.is_dir():
        try:
            load_manifest(target, parts=("edge",))
            return target
        except BundleError:
            shutil.rmtree(target, ignore_errors=True)
    try:
        data = _get(url, max_bytes=max_bytes, timeout_s=timeout_s, accept="application/zip",
                    token=token)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RolloutError(f"cannot fetch model {model_id[:12]}… from {url}: {exc}") from exc
    if len(data) > max_bytes:
        raise RolloutError(f"model {model_id[:12]}… from {url} is over {max_bytes} bytes")
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_id[:12]}-", dir=models_dir))
    try:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = archive.namelist()
                bad = [n for n in names if n not in _ALLOWED]
                if bad or "bundle.json" not in names:
                    raise RolloutError(f"archive from {url} holds {names}, expected "
                                       f"{sorted(_ALLOWED)}")
                total = sum(info.file_size for info in archive.infolist())
                if total > max_bytes:
                    raise RolloutError(f"archive from {url} unpacks to {total} bytes")
                for name in names:
                    (staging / name).write_bytes(archive.read(name))
        except zipfile.BadZipFile as exc:
            raise RolloutError(f"{url} did not send a zip archive: {exc}") from exc
        try:
            manifest = load_manifest(staging, parts=("edge",))
        except BundleError as exc:
            raise RolloutError(f"model from {url} does not check out: {exc}") from exc
        if manifest.id != model_id:
            raise RolloutError(f"{url} sent model {manifest.id[:12]}…, not the announced "
                               f"{model_id[:12]}…")
        try:
            staging.rename(target)
        except OSError:
            # Another fetch of the same id (another stream) finished first: use its copy.
            try:
                load_manifest(target, parts=("edge",))
            except BundleError as exc:
                raise RolloutError(f"cannot put model {model_id[:12]}… in place at "
                                   f"{target}: {exc}") from exc
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
