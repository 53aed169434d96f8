"""Model rollout on the edge against a real HTTP server: fetch, unpack, verify, and refuse
anything that does not check out without leaving a trace in the models folder. Also the
manifest checks that make a bundle id trustworthy."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from csi_edge.agent import EncoderCache
from csi_edge.bundle import BundleError, BundleManifest, EdgeEncoder, bundle_id, load_manifest
from csi_edge.rollout import (
    RolloutError,
    check_runs,
    check_under_base,
    cloud_lists,
    edge_archive,
    fetch_bundle,
    model_url,
    models_url,
)

ROOT = Path(__file__).resolve().parents[1]
FITION = ROOT / "models" / "fition"
WIAR = ROOT / "models" / "wiar"

Route = bytes | tuple[int, bytes] | tuple[int, bytes, dict[str, str]] | Callable[[], bytes]


class Server:
    """A real HTTP server on 127.0.0.1 serving chosen bytes per path, recording requests."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers)))
                route = server.routes.get(self.path, (404, b"no such model"))
                if callable(route):
                    route = route()
                status, body, headers = (*route, {})[:3] if isinstance(route, tuple) \
                    else (200, route, {})
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def serve(self, model_id: str, body: Route) -> str:
        url = model_url(self.base, model_id)
        self.routes[url[len(self.base):]] = body
        return url

    def hits(self, url: str) -> int:
        return sum(path == url[len(self.base):] for path, _ in self.requests)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def fition_id() -> str:
    return load_manifest(FITION).id


@pytest.fixture(scope="module")
def fition_zip() -> bytes:
    return edge_archive(FITION)


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def fition_files() -> dict[str, bytes]:
    return {"bundle.json": (FITION / "bundle.json").read_bytes(),
            "edge.onnx": (FITION / "edge.onnx").read_bytes()}


def leftovers(models_dir: Path) -> list[str]:
    """Everything in the models folder (staging folders start with a dot)."""
    return sorted(p.name for p in models_dir.iterdir()) if models_dir.exists() else []


# -- the archive --------------------------------------------------------------------------------


def test_edge_archive_holds_the_manifest_and_edge_weights_only(fition_zip: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(fition_zip)) as archive:
        assert sorted(archive.namelist()) == ["bundle.json", "edge.onnx"]
        assert archive.read("edge.onnx") == (FITION / "edge.onnx").read_bytes()
        assert archive.read("bundle.json") == (FITION / "bundle.json").read_bytes()
        assert archive.testzip() is None


def test_edge_archive_of_a_folder_without_cloud_weights(tmp_path: Path,
                                                        fition_zip: bytes) -> None:
    edge_only = tmp_path / "edge-only"
    edge_only.mkdir()
    for name in ("bundle.json", "edge.onnx"):
        shutil.copy(FITION / name, edge_only / name)
    with zipfile.ZipFile(io.BytesIO(edge_archive(edge_only))) as archive:
        assert sorted(archive.namelist()) == ["bundle.json", "edge.onnx"]
    (edge_only / "edge.onnx").write_bytes(b"not the weights")
    with pytest.raises(BundleError):
        edge_archive(edge_only)


def test_model_url() -> None:
    assert (model_url("http://cloud:8000", "ab" * 32)
            == f"http://cloud:8000/api/v1/models/{'ab' * 32}/edge")
    assert model_url("https://cloud/base/", "cd") == "https://cloud/base/api/v1/models/cd/edge"


# -- fetching -----------------------------------------------------------------------------------


def test_fetch_unpacks_and_verifies(server: Server, tmp_path: Path, fition_id: str,
                                    fition_zip: bytes) -> None:
    url = server.serve(fition_id, fition_zip)
    models_dir = tmp_path / "models"
    folder = fetch_bundle(url, fition_id, models_dir, token="t0ken")
    assert folder == models_dir / fition_id
    manifest = load_manifest(folder, parts=("edge",))
    assert manifest.id == fition_id and manifest.name == "fition"
    assert sorted(p.name for p in folder.iterdir()) == ["bundle.json", "edge.onnx"]
    assert (folder / "edge.onnx").read_bytes() == (FITION / "edge.onnx").read_bytes()
    assert leftovers(models_dir) == [fition_id]  # no staging folder left
    path, headers = server.requests[-1]
    assert url.endswith(path)
    assert headers.get("Authorization") == "Bearer t0ken"
    assert headers.get("Accept") == "application/zip"


def test_fetched_bundle_runs_on_the_edge(server: Server, tmp_path: Path, fition_id: str,
                                         fition_zip: bytes) -> None:
    import numpy as np

    from csi_edge.bundle import EdgeEncoder

    folder = fetch_bundle(server.serve(fition_id, fition_zip), fition_id, tmp_path)
    encoder = EdgeEncoder(folder)
    spec = encoder.spec
    segment = np.zeros((1, spec.segment_frames, spec.antennas, len(spec.subcarriers)),
                       dtype=np.float32)
    symbols, profile = encoder.encode(segment)
    assert symbols.shape[0] == profile.shape[0] == 1


def test_second_fetch_of_a_fetched_id_does_not_hit_the_server(
        server: Server, tmp_path: Path, fition_id: str, fition_zip: bytes) -> None:
    url = server.serve(fition_id, fition_zip)
    first = fetch_bundle(url, fition_id, tmp_path)
    assert server.hits(url) == 1
    server.routes.clear()  # gone from the cloud: the local copy is enough
    assert fetch_bundle(url, fition_id, tmp_path) == first
    assert fetch_bundle(url, fition_id, tmp_path, token="x") == first
    assert server.hits(url) == 1


def test_damaged_local_copy_is_fetched_again(server: Server, tmp_path: Path, fition_id: str,
                                             fition_zip: bytes) -> None:
    url = server.serve(fition_id, fition_zip)
    folder = fetch_bundle(url, fition_id, tmp_path)
    (folder / "edge.onnx").write_bytes(b"bit rot")
    (folder / "stray.txt").write_text("left from before")
    assert fetch_bundle(url, fition_id, tmp_path) == folder
    assert server.hits(url) == 2
    assert load_manifest(folder, parts=("edge",)).id == fition_id
    assert sorted(p.name for p in folder.iterdir()) == ["bundle.json", "edge.onnx"]
    assert leftovers(tmp_path) == [fition_id]


def test_concurrent_fetch_of_the_same_id_uses_the_finished_copy(
        server: Server, tmp_path: Path, fition_id: str, fition_zip: bytes) -> None:
    """Two streams told to switch to the same model fetch it at once: the one that finishes
    second finds the folder in place and must use it, not fail."""
    models_dir = tmp_path / "models"
    target = models_dir / fition_id

    def other_stream_finishes_first() -> bytes:
        target.mkdir(parents=True)
        for name in ("bundle.json", "edge.onnx"):
            shutil.copy(FITION / name, target / name)
        return fition_zip

    url = server.serve(fition_id, other_stream_finishes_first)
    assert fetch_bundle(url, fition_id, models_dir) == target
    assert load_manifest(target, parts=("edge",)).id == fition_id
    assert leftovers(models_dir) == [fition_id]


def _refused(server: Server, tmp_path: Path, model_id: str, body: Route,
             match: str, **options: Any) -> RolloutError:
    url = server.serve(model_id, body)
    models_dir = tmp_path / "models"
    with pytest.raises(RolloutError, match=match) as info:
        fetch_bundle(url, model_id, models_dir, **options)
    assert leftovers(models_dir) == []  # nothing half-written, no staging folder
    return info.value


def test_wrong_announced_id_is_refused(server: Server, tmp_path: Path,
                                       fition_zip: bytes) -> None:
    wiar_id = load_manifest(WIAR).id
    error = _refused(server, tmp_path, wiar_id, fition_zip, "not the announced")
    assert wiar_id[:12] in str(error)
    _refused(server, tmp_path, "0" * 64, fition_zip, "not the announced")


def test_tampered_weights_are_refused(server: Server, tmp_path: Path, fition_id: str) -> None:
    files = fition_files()
    weights = bytearray(files["edge.onnx"])
    weights[len(weights) // 2] ^= 0x01
    files["edge.onnx"] = bytes(weights)
    error = _refused(server, tmp_path, fition_id, make_zip(files), "does not check out")
    assert "sha256" in str(error)


def test_tampered_manifest_is_refused(server: Server, tmp_path: Path, fition_id: str) -> None:
    files = fition_files()
    manifest = json.loads(files["bundle.json"])
    manifest["levels"][1]["segments_per_message"] = 8
    files["bundle.json"] = json.dumps(manifest).encode()
    _refused(server, tmp_path, fition_id, make_zip(files), "hashes to id")
    files["bundle.json"] = b"{not json"
    _refused(server, tmp_path, fition_id, make_zip(files), "does not check out")


@pytest.mark.parametrize("extra", ["../evil", "/tmp/evil", "sub/edge.onnx", "cloud.npz",
                                   "bundle.json/../../evil"])
def test_archive_with_another_file_is_refused(server: Server, tmp_path: Path, fition_id: str,
                                              extra: str) -> None:
    files = {**fition_files(), extra: b"#!/bin/sh\necho pwned\n"}
    error = _refused(server, tmp_path, fition_id, make_zip(files), "expected")
    assert extra in str(error)
    assert not list(tmp_path.rglob("evil"))


def test_archive_without_manifest_is_refused(server: Server, tmp_path: Path,
                                             fition_id: str) -> None:
    _refused(server, tmp_path, fition_id,
             make_zip({"edge.onnx": (FITION / "edge.onnx").read_bytes()}), "expected")
    _refused(server, tmp_path, fition_id, make_zip({}), "expected")


def test_archive_without_weights_is_refused(server: Server, tmp_path: Path,
                                            fition_id: str) -> None:
    files = fition_files()
    del files["edge.onnx"]
    _refused(server, tmp_path, fition_id, make_zip(files), "missing")


def test_body_that_is_not_a_zip_is_refused(server: Server, tmp_path: Path,
                                           fition_id: str) -> None:
    _refused(server, tmp_path, fition_id, b"<html>502 Bad Gateway</html>", "did not send a zip")
    _refused(server, tmp_path, fition_id, b"", "did not send a zip")
    half = edge_archive(FITION)[:5000]
    _refused(server, tmp_path, fition_id, half, "did not send a zip")


@pytest.mark.parametrize("status", [404, 403, 500])
def test_http_errors_are_refused(server: Server, tmp_path: Path, fition_id: str,
                                 status: int) -> None:
    error = _refused(server, tmp_path, fition_id, (status, b"nope"), "cannot fetch model")
    assert str(status) in str(error)
    assert fition_id[:12] in str(error)


def test_oversized_body_is_refused(server: Server, tmp_path: Path, fition_id: str,
                                   fition_zip: bytes) -> None:
    limit = len(fition_zip) - 1
    error = _refused(server, tmp_path, fition_id, fition_zip, f"over {limit} bytes",
                     max_bytes=limit)
    assert fition_id[:12] in str(error)
    # The limit bounds the download and what it unpacks to; exactly at the limit is fine.
    with zipfile.ZipFile(io.BytesIO(fition_zip)) as archive:
        unpacked = sum(info.file_size for info in archive.infolist())
    assert unpacked > len(fition_zip)
    url = server.serve(fition_id, fition_zip)
    folder = fetch_bundle(url, fition_id, tmp_path / "ok", max_bytes=unpacked)
    assert load_manifest(folder, parts=("edge",)).id == fition_id


def test_archive_that_unpacks_too_large_is_refused(server: Server, tmp_path: Path,
                                                   fition_id: str) -> None:
    bomb = make_zip({"bundle.json": b" " * 2_000_000, "edge.onnx": b"\x00" * 2_000_000})
    assert len(bomb) < 20_000
    _refused(server, tmp_path, fition_id, bomb, "unpacks to 4000000 bytes", max_bytes=100_000)


@pytest.mark.parametrize("model_id", ["", "abc", "A" * 64, "g" * 64, "0" * 63, "0" * 65,
                                      "../" + "0" * 61])
def test_malformed_model_id_is_refused_before_any_request(server: Server, tmp_path: Path,
                                                          model_id: str) -> None:
    with pytest.raises(RolloutError, match="64 lowercase hex") as info:
        fetch_bundle(f"{server.base}/whatever", model_id, tmp_path / "models")
    assert repr(model_id) in str(info.value)
    assert server.requests == []
    assert not (tmp_path / "models").exists()


def test_unreachable_cloud_is_refused(tmp_path: Path, fition_id: str) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RolloutError, match="cannot fetch model"):
        fetch_bundle(model_url(f"http://127.0.0.1:{port}", fition_id), fition_id, tmp_path)
    with pytest.raises(RolloutError, match="cannot fetch model"):
        fetch_bundle("not a url", fition_id, tmp_path)
    assert leftovers(tmp_path) == []


def test_slow_cloud_times_out(server: Server, tmp_path: Path, fition_id: str,
                              fition_zip: bytes) -> None:
    def slow() -> bytes:
        time.sleep(1.5)
        return fition_zip

    url = server.serve(fition_id, slow)
    started = time.monotonic()
    with pytest.raises(RolloutError, match="cannot fetch model"):
        fetch_bundle(url, fition_id, tmp_path / "models", timeout_s=0.3)
    assert time.monotonic() - started < 1.4
    assert leftovers(tmp_path / "models") == []


# -- only the cloud, only what it lists, only what runs ---------------------------------------


BASE = "http://cloud.example:8000"


@pytest.mark.parametrize("url", [
    f"{BASE}/api/v1/models/x/edge", "http://CLOUD.example:8000/api/v1/x", BASE, f"{BASE}/",
])
def test_urls_under_the_cloud_base_are_accepted(url: str) -> None:
    assert check_under_base(url, BASE) == url


@pytest.mark.parametrize("url", [
    "http://cloud.example/api",  # another port (80)
    "http://cloud.example:8001/api", "http://other.example:8000/api",
    "https://cloud.example:8000/api",  # another scheme
    "http://cloud.example:8000@169.254.169.254/latest/meta-data",  # user info trick
    "http://user:pw@cloud.example:8000/api",
    f"{BASE}/api/../../etc", f"{BASE}/api/%2e%2e/x", f"{BASE}/api/./x", f"{BASE}//api",
    f"{BASE}/api?next=http://evil", f"{BASE}/api#x", "file:///etc/passwd",
    "gopher://cloud.example:8000/", "http://cloud.example:8000\\@evil/", "", "not a url",
    "http://cloud.example:99999/",
])
def test_urls_off_the_cloud_base_are_refused_without_a_request(url: str) -> None:
    with pytest.raises(RolloutError, match="not under the cloud base URL"):
        check_under_base(url, BASE)


def test_a_base_path_is_a_prefix_of_whole_segments() -> None:
    assert check_under_base("http://h/csi/api", "http://h/csi/")
    with pytest.raises(RolloutError):
        check_under_base("http://h/csi2/api", "http://h/csi")
    with pytest.raises(RolloutError, match="not a string"):
        check_under_base(["http://h/csi"], "http://h/csi")


def test_redirects_are_not_followed(server: Server, tmp_path: Path, fition_id: str,
                                    fition_zip: bytes) -> None:
    other = Server()
    try:
        target = other.serve(fition_id, fition_zip)
        url = server.serve(fition_id, (302, b"", {"Location": target}))
        with pytest.raises(RolloutError, match="redirect refused"):
            fetch_bundle(url, fition_id, tmp_path / "models")
        assert other.requests == []  # the redirect target was never contacted
        assert leftovers(tmp_path / "models") == []
    finally:
        other.close()


def _listing(*ids: str) -> bytes:
    return json.dumps({"data": [{"id": i, "name": f"m{n}", "metrics": {"a": {"b": [1, 2]}}}
                                for n, i in enumerate(ids)], "count": len(ids)}).encode()


def test_cloud_lists_only_what_it_serves(server: Server, fition_id: str) -> None:
    path = models_url(server.base)[len(server.base):]
    server.routes[path] = _listing("ab" * 32, fition_id)
    cloud_lists(server.base, fition_id)
    with pytest.raises(RolloutError, match="not among the 2 model"):
        cloud_lists(server.base, "cd" * 32)
    for body, match in [((500, b"oops"), "cannot read"), (b"[" * 5000, "not valid"),
                        (b"not json", "not valid"), (b'{"data": 3}', "no 'data' list"),
                        (b"x" * (5 << 20), "over")]:
        server.routes[path] = body
        with pytest.raises(RolloutError, match=match):
            cloud_lists(server.base, fition_id)


def _with_edge_onnx(folder: Path, onnx: bytes) -> BundleManifest:
    """A copy of the Fition bundle whose edge.onnx is ``onnx``, hashes and id made to match
    (a self-consistent bundle, as anyone can make)."""
    shutil.copytree(FITION, folder)
    (folder / "edge.onnx").write_bytes(onnx)
    data = json.loads((folder / "bundle.json").read_text())
    data["files"]["edge"] = {**data["files"]["edge"], "sha256": hashlib.sha256(onnx).hexdigest(),
                             "bytes": len(onnx)}
    manifest = BundleManifest.model_validate(data)
    manifest.id = bundle_id(manifest)
    (folder / "bundle.json").write_text(json.dumps(manifest.model_dump(mode="json")))
    load_manifest(folder, parts=("edge",))  # it checks out
    return manifest


def test_an_encoder_that_does_not_load_or_run_is_refused(tmp_path: Path) -> None:
    check_runs(EdgeEncoder(FITION))  # the real one codes a segment at every level
    not_onnx = tmp_path / "not-onnx"
    _with_edge_onnx(not_onnx, b"this is not an ONNX model" * 10)
    with pytest.raises(BundleError, match="does not load") as info:
        EncoderCache().get(not_onnx, probe=True)
    assert str(not_onnx) in str(info.value)
    # A real ONNX model of another shape: it loads, but cannot code this bundle's segments.
    other = tmp_path / "other-shape"
    _with_edge_onnx(other, (WIAR / "edge.onnx").read_bytes())
    encoder = EdgeEncoder(other)
    with pytest.raises(RolloutError, match="does not run"):
        check_runs(encoder)
    cache = EncoderCache()
    with pytest.raises(BundleError, match="does not run"):
        cache.get(other, probe=True)
    assert cache.by_model_id(encoder.model_id) is None  # nothing half-loaded kept


# -- load_manifest: what the id covers ----------------------------------------------------------


@pytest.fixture
def edge_copy(tmp_path: Path) -> Path:
    """A copy of models/fition as an edge holds it: no cloud weights."""
    folder = tmp_path / "fition-edge"
    folder.mkdir()
    for name in ("bundle.json", "edge.onnx"):
        shutil.copy(FITION / name, folder / name)
    return folder


def test_edge_part_checks_without_cloud_weights(edge_copy: Path, fition_id: str) -> None:
    assert load_manifest(edge_copy, parts=("edge",)).id == fition_id
    with pytest.raises(BundleError, match=r"cloud weights 'cloud\.npz' are missing"):
        load_manifest(edge_copy)
    with pytest.raises(BundleError, match="cloud weights"):
        load_manifest(edge_copy, parts=("edge", "cloud"))
    with pytest.raises(BundleError, match="no 'decoder' weights"):
        load_manifest(edge_copy, parts=("decoder",))
    assert load_manifest(FITION).id == fition_id  # the full bundle checks every part


def _edit(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((folder / "bundle.json").read_text())
    change(manifest)
    (folder / "bundle.json").write_text(json.dumps(manifest, indent=1))


def _set(*path: str | int, value: Any = None, bump: float | None = None
         ) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        node: Any = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = node[path[-1]] + bump if bump is not None else value
    return change


BEHAVIOUR_CHANGES = {
    "input_spec.nominal_rate_hz": _set("input_spec", "nominal_rate_hz", bump=1.0),
    "input_spec.subcarriers": _set("input_spec", "subcarriers", value=list(range(-28, 28))),
    "input_spec.normalisation": _set("input_spec", "normalisation", value="segment"),
    "input_spec.min_quality": _set("input_spec", "min_quality", bump=0.1),
    "model.hidden": _set("model", "hidden", bump=1),
    "model.new_key": _set("model", "dropout", value=0.5),
    "quantizer.latent_steps": _set("quantizer", "latent_steps", bump=1),
    "levels.groups": _set("levels", 0, "groups", bump=1),
    "levels.segments_per_message": _set("levels", 1, "segments_per_message", bump=1),
    "profile_range": _set("profile_range", bump=1),
    "entropy.counts": lambda m: m["entropy"]["latent"]["counts"][0].__setitem__(
        0, m["entropy"]["latent"]["counts"][0][0] + 1),
    "labels.activity": lambda m: m["labels"]["activity"].reverse(),
    "labels.identity": _set("labels", "identity", value=None),
    "calibration": _set("calibration", value={"threshold": 0.5}),
    "files.edge.sha256": _set("files", "edge", "sha256", value="0" * 64),
    "files.cloud.sha256": _set("files", "cloud", "sha256", value="f" * 64),
    "files.dropped_part": lambda m: m["files"].pop("cloud"),
}


@pytest.mark.parametrize("field", sorted(BEHAVIOUR_CHANGES))
def test_changing_what_the_id_covers_fails_verification(edge_copy: Path, field: str) -> None:
    _edit(edge_copy, BEHAVIOUR_CHANGES[field])
    with pytest.raises(BundleError, match="hashes to id"):
        load_manifest(edge_copy, parts=("edge",))
    load_manifest(edge_copy, verify=False, parts=("edge",))  # still a well-formed manifest


def test_every_behaviour_field_is_exercised() -> None:
    manifest = load_manifest(FITION)
    covered = {name.split(".")[0] for name in BEHAVIOUR_CHANGES}
    assert set(manifest.behaviour()) - {"schema_version"} <= covered


def test_schema_version_change_is_refused(edge_copy: Path) -> None:
    _edit(edge_copy, _set("schema_version", value=2))
    with pytest.raises(BundleError, match="schema version 2"):
        load_manifest(edge_copy, parts=("edge",))


@pytest.mark.parametrize("field", ["name", "created", "training", "metrics"])
def test_descriptive_fields_are_outside_the_id(edge_copy: Path, fition_id: str,
                                               field: str) -> None:
    _edit(edge_copy, _set(field, value={"note": "edited"} if field in ("training", "metrics")
                          else "edited"))
    assert load_manifest(edge_copy, parts=("edge",)).id == fition_id


def test_id_field_itself_must_match(edge_copy: Path) -> None:
    _edit(edge_copy, _set("id", value="0" * 64))
    with pytest.raises(BundleError, match="manifest says 000000000000"):
        load_manifest(edge_copy, parts=("edge",))


def test_unreadable_manifests(tmp_path: Path, edge_copy: Path) -> None:
    with pytest.raises(BundleError, match=r"no readable bundle\.json"):
        load_manifest(tmp_path / "empty")
    (edge_copy / "bundle.json").write_text("[]")
    with pytest.raises(BundleError, match="not a valid bundle manifest"):
        load_manifest(edge_copy, parts=("edge",))
