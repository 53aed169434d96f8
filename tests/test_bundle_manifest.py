"""``bundle.json`` has one writer (:func:`csi_edge.bundle.write_manifest`), and a bundle is read
once and handed down (:class:`csi_edge.bundle.Bundle`) instead of each callee reading it again."""

from __future__ import annotations

import ast
import builtins
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from csi_cloud.cli import app
from csi_cloud.model.compression import CloudModel
from csi_edge.bundle import (
    MANIFEST_FILE,
    Bundle,
    BundleError,
    EdgeEncoder,
    RateLevel,
    SegmentCodes,
    decode_segment_codes,
    encode_segment_codes,
    load_manifest,
    write_manifest,
)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SAMPLES = ROOT / "datasets" / "samples" / "fition"
SOURCES = ("csi_edge", "csi_cloud", "bench")
# Calls that create or replace a file: where the path written to is.
RECEIVER_WRITERS = {"write_text", "write_bytes"}
MOVERS = {"replace", "rename", "copyfile", "copy", "copy2", "move"}
OWNER = ("csi_edge/bundle.py", "write_manifest")


def _own_nodes(scope: ast.AST) -> Iterator[ast.AST]:
    """The nodes of a module or function, without those of the functions defined in it."""
    for child in ast.iter_child_nodes(scope):
        if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield child
            yield from _own_nodes(child)


def _written_path(node: ast.Call) -> ast.AST | None:
    """The path expression a call writes to, if it writes one."""
    callee = node.func
    if isinstance(callee, ast.Name):
        if callee.id != "open" or not node.args:
            return None
        modes = [*node.args[1:2], *(k.value for k in node.keywords if k.arg == "mode")]
        writes = any(isinstance(m, ast.Constant) and set(str(m.value)) & set("wax+")
                     for m in modes)
        return node.args[0] if writes else None
    if not isinstance(callee, ast.Attribute):
        return None
    if callee.attr in RECEIVER_WRITERS:
        return callee.value
    if callee.attr in MOVERS:
        module = isinstance(callee.value, ast.Name) and callee.value.id in ("os", "shutil")
        args = node.args[1:2] if module else node.args[:1]
        return args[0] if args else None
    return None


def _manifest_writes(source: str) -> list[tuple[str, int]]:
    """(function, line) of each call in ``source`` that writes to a path naming the manifest,
    directly (``(folder / "bundle.json").write_text``) or through a local name assigned from
    one (``path = folder / MANIFEST_FILE; path.write_text(...)``)."""
    tree = ast.parse(source)
    found: list[tuple[str, int]] = []

    def names_manifest(node: ast.AST, tainted: set[str]) -> bool:
        return any((isinstance(n, ast.Constant) and isinstance(n.value, str)
                    and MANIFEST_FILE in n.value and " " not in n.value)
                   or (isinstance(n, ast.Name) and (n.id == "MANIFEST_FILE" or n.id in tainted))
                   for n in ast.walk(node))

    scopes = [tree, *(n for n in ast.walk(tree)
                      if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))]
    for scope in scopes:
        name = getattr(scope, "name", "<module>")
        nodes = list(_own_nodes(scope))
        tainted: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Assign) and names_manifest(node.value, tainted):
                tainted |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for call in (n for n in nodes if isinstance(n, ast.Call)):
            target = _written_path(call)
            if target is not None and names_manifest(target, tainted):
                found.append((name, call.lineno))
    return found


def test_the_detector_finds_the_ways_bundle_json_used_to_be_written() -> None:
    written = '''
def a(folder, manifest):
    (folder / "bundle.json").write_text(manifest)
def b(out, doc):
    path = out / "bundle.json"
    path.write_text(doc)
def c(staging, dest):
    tmp = dest / ".bundle.json.tmp"
    shutil.copyfile(staging / "bundle.json", tmp)
    os.replace(tmp, dest / MANIFEST_FILE)
def d(folder):
    with open(folder / "bundle.json", "w") as fh:
        fh.write("{}")
'''
    read = '''
def e(folder):
    return (folder / "bundle.json").read_bytes(), open(folder / MANIFEST_FILE).read()
def f(archive, folder):
    archive.write(folder / "bundle.json", "bundle.json")
'''
    assert [f for f, _ in _manifest_writes(written)] == ["a", "b", "c", "c", "d"]
    assert _manifest_writes(read) == []


def _sources() -> Iterator[Path]:
    for package in SOURCES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_only_write_manifest_writes_bundle_json() -> None:
    writers = {(path.relative_to(ROOT).as_posix(), function, line)
               for path in _sources()
               for function, line in _manifest_writes(path.read_text())}
    assert {(p, f) for p, f, _ in writers} == {OWNER}, sorted(writers)


def test_write_manifest_round_trips_a_committed_bundle_byte_for_byte(tmp_path: Path) -> None:
    for name in ("fition", "wiar"):
        folder = tmp_path / name
        shutil.copytree(MODELS / name, folder)
        committed = (folder / MANIFEST_FILE).read_bytes()
        manifest = load_manifest(folder)
        bundle = write_manifest(folder, manifest)
        # The format is unchanged: rewriting a committed manifest gives its own bytes.
        assert (folder / MANIFEST_FILE).read_bytes() == committed
        assert bundle == Bundle(folder, manifest) == Bundle.load(folder)
        assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_write_manifest_recomputes_the_id_from_what_decides_behaviour(tmp_path: Path) -> None:
    folder = tmp_path / "fition"
    shutil.copytree(MODELS / "fition", folder)
    manifest = load_manifest(folder)
    old = manifest.id
    # Metrics and training notes describe the bundle; they are not part of the id.
    manifest.metrics = {"note": "rewritten"}
    manifest.training = {**manifest.training, "job": "j1"}
    assert write_manifest(folder, manifest).manifest.id == old
    assert load_manifest(folder).metrics == {"note": "rewritten"}
    # The calibration is: the id changes, and the written bundle checks out under it.
    manifest.calibration = {**manifest.calibration, "idle": {"threshold": 0.5}}
    written = write_manifest(folder, manifest)
    assert written.manifest.id != old
    assert load_manifest(folder).id == written.manifest.id
    # A manifest edited behind the writer's back no longer matches its id.
    doc = json.loads((folder / MANIFEST_FILE).read_text())
    doc["calibration"] = {}
    (folder / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="hashes to id"):
        load_manifest(folder)


@pytest.fixture
def manifest_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every opening of a ``bundle.json`` for reading, in this process."""
    reads: list[str] = []
    real = io.open

    def counting(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if str(file).endswith(MANIFEST_FILE) and not set(mode) & set("wax+"):
            reads.append(str(file))
        return real(file, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(io, "open", counting)
    monkeypatch.setattr(builtins, "open", counting)
    return reads


def test_a_loaded_bundle_is_not_read_again(manifest_reads: list[str]) -> None:
    bundle = Bundle.load(MODELS / "fition")
    assert len(manifest_reads) == 1
    model, edge = CloudModel.load(bundle), EdgeEncoder(bundle)
    assert model.manifest is edge.manifest is bundle.manifest
    assert Bundle.load(bundle) is bundle
    assert len(manifest_reads) == 1
    # A path still works, and is read.
    assert EdgeEncoder(MODELS / "fition").manifest == bundle.manifest
    assert len(manifest_reads) == 2


def test_csi_adapt_reads_the_parent_manifest_once(tmp_path: Path,
                                                   manifest_reads: list[str]) -> None:
    shutil.copytree(MODELS / "fition", tmp_path / "fition")
    out = tmp_path / "fition-adapted"
    done = CliRunner().invoke(app, ["adapt", "--model", str(tmp_path / "fition"), "--data",
                                    str(SAMPLES), "--shots", "1", "--out", str(out), "--json"])
    assert done.exit_code == 0, done.output
    # Before the bundle was handed down: 3 (the cloud model, the edge encoder, the derived
    # bundle's writer each read it).
    assert manifest_reads == [str(tmp_path / "fition" / MANIFEST_FILE)]
    child = load_manifest(out)
    assert json.loads(done.output)["bundle"] == child.id
    assert child.parent == load_manifest(MODELS / "fition").id


def test_a_rate_level_must_carry_latent_groups_or_profile_coefficients() -> None:
    assert RateLevel(level=0, groups=0, profile_components=16).groups == 0
    assert RateLevel(level=1, groups=4, profile_components=0).profile_components == 0
    with pytest.raises(ValidationError, match="rate level 2 transmits neither"):
        RateLevel(level=2, groups=0, profile_components=0)


def test_a_level_without_latent_channels_codes_its_profile_alone() -> None:
    # The measured next layout of level 0 (docs/model.md): no latent channel, 16 profile
    # coefficients. Its codes are the profile's group alone and round-trip exactly.
    edge = EdgeEncoder(MODELS / "fition")
    manifest = edge.manifest
    levels = [lv.model_copy(update={"groups": 0, "profile_components": 16}) if lv.level == 0
              else lv for lv in manifest.levels]
    profile_only = manifest.model_copy(update={"levels": levels})
    steps = int(manifest.quantizer["latent_steps"])
    profile = (np.arange(16) % 7 - 3).astype(np.int64)
    codes = SegmentCodes(0, np.zeros((0, steps), np.int64), profile)
    blob = encode_segment_codes(codes, profile_only, edge.tables)
    back = decode_segment_codes(blob, 0, profile_only, edge.tables)
    assert back.latent.shape == (0, steps)
    assert back.profile.tolist() == profile.tolist()
    with_latent = encode_segment_codes(
        SegmentCodes(0, np.full((1, steps), 2, np.int64), profile), profile_only, edge.tables)
    assert len(blob) < len(with_latent)
