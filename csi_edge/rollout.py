"""Model rollout on the edge: fetch a bundle's edge part from the cloud and check it.

The cloud serves ``GET /api/v1/models/{id}/edge`` as a zip holding ``bundle.json`` and the
edge weights it names. The edge unpacks it into ``models_dir/{id}``, checks the manifest hashes
to the announced id and the weights to their hash (``load_manifest(parts=("edge",))``), and
only then offers it for use. Any failure raises :class:`RolloutError` and leaves nothing
half-written in ``models_dir``.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from ._errors import CSIError
from .bundle import BundleError, load_manifest

__all__ = ["RolloutError", "edge_archive", "fetch_bundle", "model_url"]

_ALLOWED = {"bundle.json", "edge.onnx"}


class RolloutError(CSIError):
    """A bundle announced for rollout could not be fetched or did not check out."""


def model_url(cloud_url: str, model_id: str) -> str:
    return f"{cloud_url.rstrip('/')}/api/v1/models/{model_id}/edge"


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
    """Download, unpack and verify a bundle's edge part; return its folder."""
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
        request = urllib.request.Request(url, headers={"Accept": "application/zip"})
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data = response.read(max_bytes + 1)
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
