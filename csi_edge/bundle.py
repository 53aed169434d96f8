"""Model bundles on the edge: the manifest, the per-segment code layout, and the int8 encoder.

A bundle folder holds ``bundle.json`` (the :class:`BundleManifest`), ``edge.onnx`` (the int8
encoder, run here with ONNX Runtime, no torch) and ``cloud.npz`` (decoder and classifier
weights, used by the cloud). The bundle id is the sha256 of everything that decides what the
model does: the canonical JSON of the manifest's behavioural fields and of each weight file's
sha256 (so an edge holding only ``edge.onnx`` can check the id).

Codes of one segment at rate level ``l`` (entropy coded as ONE stream, see csi_edge.entropy):
  1. latent symbols of the first ``groups`` symbol groups, group-major (group 0 at every
     latent step, then group 1, ...), each coded with its group's row of the ``latent`` table;
  2. the first ``profile_components`` profile coefficients, each offset by ``profile_range``
     to be non-negative, coded with their rows of the ``profile`` table.
A bundle whose model cuts each segment into ``profile_blocks`` > 1 equal blocks (the model
config's ``profile_blocks``; a profile a block, e.g. 5 a second) sends the first
``profile_components`` coefficients of every block instead, block-major: block 0's as in 2.
above, then each later block's as its difference to the block before it (component by
component, offset by ``2 * profile_range``), coded with their rows of the ``profile_delta``
table. A block's profile is close to the one before it, and the differences cost fewer bits
than the values (docs/model.md, "Sub-second profiles").
A message (wire version 2) codes its K segments' symbol groups, segment 0's first, as ONE
stream (``encode_message_codes``); the edge's queue keeps each segment's own stream
(``encode_segment_codes``, also a wire-version-1 record). The wire payload around the codes is
csi_edge.codec.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import entropy
from ._errors import CSIError, SpecMismatchError
from .codec import Payload, SegmentRecord, encode_payload, model_id_prefix
from .entropy import EntropyTable
from .preprocess import InputSpec

__all__ = [
    "MANIFEST_FILE",
    "Bundle",
    "BundleError",
    "BundleManifest",
    "EdgeEncoder",
    "FileEntry",
    "RateLevel",
    "SegmentCodes",
    "bundle_id",
    "decode_message_codes",
    "decode_segment_codes",
    "encode_message_codes",
    "encode_segment_codes",
    "load_manifest",
    "payload_codes",
    "segment_symbol_groups",
    "write_manifest",
]

SCHEMA_VERSION = 1
MANIFEST_FILE = "bundle.json"


class BundleError(CSIError):
    """A bundle folder is missing, malformed, or does not match its own id."""


class RateLevel(BaseModel):
    """One operating point: how much of the latent and the profile a segment carries."""

    model_config = ConfigDict(frozen=True)

    level: int = Field(ge=0, le=3)
    groups: int = Field(ge=0, description="latent symbol groups transmitted (0: the profile "
                                          "alone)")
    profile_components: int = Field(ge=0, description="profile PCA coefficients transmitted")
    segments_per_message: int = Field(default=1, ge=1, le=255,
                                      description="segments batched into one MQTT message")

    @model_validator(mode="after")
    def _carries_something(self) -> RateLevel:
        if self.groups == 0 and self.profile_components == 0:
            raise ValueError(f"rate level {self.level} transmits neither latent groups nor "
                             "profile coefficients")
        return self


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str
    bytes: int


class BundleManifest(BaseModel):
    """``bundle.json``."""

    schema_version: int = SCHEMA_VERSION
    id: str
    name: str
    created: str
    input_spec: InputSpec
    model: dict[str, Any]
    quantizer: dict[str, Any]  # kind, alphabet, half, groups, latent_steps
    levels: list[RateLevel]
    profile_range: int
    entropy: dict[str, dict[str, Any]]  # "latent", "profile": EntropyTable.to_dict()
    labels: dict[str, list[str] | None]  # "activity", "identity"
    files: dict[str, FileEntry]  # "edge", "cloud"
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] = Field(default_factory=dict)
    # Set on bundles derived in the cloud (identity enrollment, few-shot adaptation): they
    # keep the edge part of ``edge_id`` (encoder, entropy tables, input spec, levels), and
    # payloads keep carrying that id's prefix, so edges need not change for them.
    edge_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    parent: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    # Whether ``metrics`` were measured on recordings the bundle was not fitted on. False: a
    # tiny training set (or an adaptation that used every recording) was scored on its own
    # training recordings, which says nothing about new ones; such a bundle is not activated
    # without ``force`` (csi_cloud.model.bundle.activation_refusal). None: no metrics.
    # Not part of the id (it describes the measurement, not the behaviour).
    held_out: bool | None = None

    @property
    def wire_id(self) -> str:
        """The id whose prefix payloads carry: the edge part's bundle id."""
        return self.edge_id or self.id

    def behaviour(self) -> dict[str, Any]:
        """The fields (besides the weight files) that the id covers."""
        lineage = {k: v for k, v in (("edge_id", self.edge_id), ("parent", self.parent)) if v}
        return {
            **lineage,
            "schema_version": self.schema_version,
            "input_spec": self.input_spec.model_dump(mode="json"),
            "model": self.model,
            "quantizer": self.quantizer,
            "levels": [lv.model_dump() for lv in self.levels],
            "profile_range": self.profile_range,
            "entropy": self.entropy,
            "labels": self.labels,
            "calibration": self.calibration,
        }

    def level(self, level: int) -> RateLevel:
        if not 0 <= level < len(self.levels):
            raise SpecMismatchError(
                f"rate level {level} not in bundle {self.name!r} (levels 0..{len(self.levels) - 1})"
            )
        return self.levels[level]

    @property
    def profile_blocks(self) -> int:
        """Profiles a segment carries: the segment cut into this many equal blocks of frames,
        each block's mean coded (1: the segment's mean, every bundle before blocks)."""
        blocks = self.model.get("profile_blocks", 1)
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
            raise BundleError(f"bundle {self.name!r}: profile_blocks {blocks!r} is not a whole "
                              "number >= 1")
        return blocks

    def level_profile(self, profile: np.ndarray, level: int) -> np.ndarray:
        """A segment's profile codes of every component, (blocks * Kmax,) block-major ->
        those rate level ``level`` sends, (blocks * K_l,) block-major."""
        blocks = self.profile_blocks
        k = self.level(level).profile_components
        return np.asarray(profile).reshape(blocks, -1)[:, :k].reshape(-1)

    def tables(self) -> tuple[EntropyTable, ...]:
        """The entropy tables: latent, profile, and with profile blocks, profile_delta."""
        names = ("latent", "profile", "profile_delta")[: 3 if self.profile_blocks > 1 else 2]
        missing = [n for n in names if n not in self.entropy]
        if missing:
            raise BundleError(f"bundle {self.name!r} has no entropy table {missing[0]!r}")
        tables = tuple(entropy.EntropyTable.from_dict(self.entropy[n]) for n in names)
        if len(tables) == 3:  # the differences of profile_blocks: alphabet 4R + 1
            components = max(lv.profile_components for lv in self.levels)
            delta = tables[2]
            if delta.alphabet != 4 * self.profile_range + 1 or delta.rows < components:
                raise BundleError(
                    f"bundle {self.name!r}: profile_delta table of {delta.rows} rows x "
                    f"{delta.alphabet} symbols, not >= {components} x "
                    f"{4 * self.profile_range + 1}")
        return tables


def bundle_id(manifest: BundleManifest, folder: Path | None = None) -> str:
    """sha256 of the canonical JSON of the behaviour fields and each weight file's sha256.

    The id covers the weights through their hashes, so a part that holds only some of the
    files (an edge has ``edge.onnx``, not the decoder) can still check the id it was given:
    the manifest's hashes must give the id, and each file it has must match its hash.
    ``folder`` is unused and kept for callers of the earlier signature.
    """
    del folder
    canonical = {"behaviour": manifest.behaviour(),
                 "files": {key: manifest.files[key].sha256 for key in sorted(manifest.files)}}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True,
                                     separators=(",", ":")).encode()).hexdigest()


def load_manifest(folder: str | Path, verify: bool = True,
                  parts: tuple[str, ...] | None = None) -> BundleManifest:
    """Read and check ``bundle.json``: schema, the id, and the hash of each weight file.

    ``parts`` names the files that must be present and match (default: all of them); an edge
    checks ``("edge",)`` because it never holds the cloud weights.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    try:
        manifest = BundleManifest.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise BundleError(f"{folder}: no readable bundle.json ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise BundleError(f"{path}: not a valid bundle manifest: {exc}") from exc
    if manifest.schema_version != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema version {manifest.schema_version}, "
                          f"this software reads {SCHEMA_VERSION}")
    if verify:
        actual_id = bundle_id(manifest)
        if actual_id != manifest.id:
            raise BundleError(f"{path}: content hashes to id {actual_id[:12]}…, manifest says "
                              f"{manifest.id[:12]}…")
        for key in parts if parts is not None else tuple(manifest.files):
            if key not in manifest.files:
                raise BundleError(f"{path}: no {key!r} weights in the manifest")
            entry = manifest.files[key]
            file = folder / entry.path
            if not file.is_file():
                raise BundleError(f"{folder}: {key} weights {entry.path!r} are missing")
            actual = hashlib.sha256(file.read_bytes()).hexdigest()
            if actual != entry.sha256:
                raise BundleError(f"{file}: sha256 {actual[:12]}… does not match the manifest's "
                                  f"{entry.sha256[:12]}…")
    return manifest


def write_manifest(folder: str | Path, manifest: BundleManifest) -> Bundle:
    """The one writer of ``bundle.json``: set ``manifest.id`` from its content (fields the id
    does not cover, such as metrics, leave it as it was) and replace the file atomically, so a
    reader sees the old manifest or the new one, never part of one. Returns the bundle."""
    folder = Path(folder)
    manifest.id = bundle_id(manifest)
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST_FILE)
    return Bundle(folder, manifest)


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle folder with its manifest, read once and handed down (to :class:`EdgeEncoder`,
    the cloud's ``CloudModel.load`` ...) instead of a path each callee reads again."""

    folder: Path
    manifest: BundleManifest

    @classmethod
    def load(cls, folder: str | Path | Bundle, verify: bool = True,
             parts: tuple[str, ...] | None = None) -> Bundle:
        """:func:`load_manifest` of ``folder``; a :class:`Bundle` is returned as it is."""
        if isinstance(folder, Bundle):
            return folder
        return cls(Path(folder), load_manifest(folder, verify=verify, parts=parts))

    def file(self, key: str) -> Path:
        """The path of the manifest's ``key`` weights (``edge``, ``cloud``)."""
        return self.folder / self.manifest.files[key].path


@dataclass(frozen=True, slots=True)
class SegmentCodes:
    """The integer codes of one segment at one rate level."""

    level: int
    latent: np.ndarray  # (groups, T) int, symbols in [0, alphabet)
    profile: np.ndarray  # (B * K,) int, coefficients in [-R, R], B profile blocks, block-major


def encode_segment_codes(codes: SegmentCodes, manifest: BundleManifest,
                         tables: tuple[entropy.EntropyTable, ...]) -> bytes:
    """One segment's codes as its own stream (a wire-version-1 record; what the edge's queue
    keeps per segment)."""
    return entropy.encode(segment_symbol_groups(codes, manifest, tables))


def encode_message_codes(codes: Sequence[SegmentCodes], manifest: BundleManifest,
                         tables: tuple[entropy.EntropyTable, ...]) -> bytes:
    """The codes of a message's segments (one level) as ONE stream, segment 0's symbol groups
    first (wire version 2: the coder's final state is paid once a message, not once a
    segment)."""
    levels = {c.level for c in codes}
    if len(levels) > 1:
        raise ValueError(f"one message holds one rate level, got levels {sorted(levels)}")
    return entropy.encode([group for c in codes
                           for group in segment_symbol_groups(c, manifest, tables)])


def segment_symbol_groups(codes: SegmentCodes, manifest: BundleManifest,
                          tables: tuple[entropy.EntropyTable, ...]
                          ) -> list[tuple[np.ndarray, np.ndarray, entropy.EntropyTable]]:
    """One segment's symbol groups (symbols, table rows, table) in the order they are coded
    (the module docstring's layout); :func:`encode_segment_codes` codes them as one stream."""
    latent_table, profile_table = tables[:2]
    g, t = codes.latent.shape
    groups = [(codes.latent.reshape(-1).astype(np.int32), np.repeat(np.arange(g), t),
               latent_table)]
    r, blocks = manifest.profile_range, manifest.profile_blocks
    if codes.profile.shape[0] % blocks:
        raise ValueError(f"{codes.profile.shape[0]} profile codes are not {blocks} blocks")
    if codes.profile.size and int(np.abs(codes.profile).max()) > r:
        raise ValueError(f"profile code {int(np.abs(codes.profile).max())} is beyond the "
                         f"range {r}")
    profile = codes.profile.reshape(blocks, -1).astype(np.int32)
    k = profile.shape[1]
    if k:
        groups.append((profile[0] + r, np.arange(k), profile_table))
    if k and blocks > 1:
        delta = np.diff(profile, axis=0) + 2 * r
        groups.append((delta.reshape(-1), np.tile(np.arange(k), blocks - 1), tables[2]))
    return groups


def decode_segment_codes(data: bytes, level: int, manifest: BundleManifest,
                         tables: tuple[entropy.EntropyTable, ...]) -> SegmentCodes:
    """What :func:`encode_segment_codes` made (:class:`entropy.EntropyDecodeError` if not)."""
    return decode_message_codes(data, 1, level, manifest, tables)[0]


def decode_message_codes(data: bytes, count: int, level: int, manifest: BundleManifest,
                         tables: tuple[entropy.EntropyTable, ...]) -> list[SegmentCodes]:
    """What :func:`encode_message_codes` made of ``count`` segments at ``level``
    (:class:`entropy.EntropyDecodeError` if the stream does not hold exactly that)."""
    latent_table, profile_table = tables[:2]
    spec = manifest.level(level)
    t = int(manifest.quantizer["latent_steps"])
    r, blocks, k = manifest.profile_range, manifest.profile_blocks, spec.profile_components
    layout = [(np.repeat(np.arange(spec.groups), t), latent_table)]
    if k:
        layout.append((np.arange(k), profile_table))
    if k and blocks > 1:
        layout.append((np.tile(np.arange(k), blocks - 1), tables[2]))
    decoded = entropy.decode(data, layout * count)
    out = []
    for i in range(count):
        part = decoded[i * len(layout) : (i + 1) * len(layout)]
        profile = np.zeros(0, dtype=np.int64)
        if k:
            steps = [part[1][None].astype(np.int64) - r]
            if blocks > 1:
                steps.append(part[2].reshape(blocks - 1, k).astype(np.int64) - 2 * r)
            profile = np.cumsum(np.concatenate(steps), axis=0).reshape(-1)
            worst = int(np.abs(profile).max())
            if worst > r:
                raise entropy.EntropyDecodeError(
                    "decode_failed", f"segment {i}: profile block differences add up to "
                    f"{worst} steps, beyond the range {r}")
        out.append(SegmentCodes(level, part[0].reshape(spec.groups, t).astype(np.int64),
                                profile.astype(np.int64)))
    return out


def payload_codes(payload: Payload, manifest: BundleManifest,
                  tables: tuple[entropy.EntropyTable, ...]) -> list[SegmentCodes]:
    """The codes of every segment of a coded (not idle, not presence-only) message of either
    wire version: version 2's one stream, version 1's stream per record."""
    if payload.version == 1:
        return [decode_segment_codes(s.codes, payload.level, manifest, tables)
                for s in payload.segments]
    return decode_message_codes(payload.codes, len(payload.segments), payload.level, manifest,
                                tables)


class EdgeEncoder:
    """The int8 encoder of a bundle, run with ONNX Runtime on one thread."""

    def __init__(self, folder: str | Path | Bundle, verify: bool = True) -> None:
        """``folder``: a bundle folder (its manifest is read and checked) or a loaded
        :class:`Bundle` (used as it is: whoever loaded it checked it)."""
        import onnxruntime as ort

        bundle = Bundle.load(folder, verify=verify, parts=("edge",))
        self.folder = bundle.folder
        self.manifest = bundle.manifest
        self.tables = self.manifest.tables()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(bundle.file("edge")), options,
                                            providers=["CPUExecutionProvider"])
        self.half = int(self.manifest.quantizer["half"])
        self.model_id = model_id_prefix(self.manifest.wire_id)

    @property
    def spec(self) -> InputSpec:
        return self.manifest.input_spec

    def encode(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, L, A, S) preprocessed segments -> latent symbols (B, G, T), profile codes
        (B, P * K) of every component (P profile blocks, block-major)."""
        latent, coeff = self.session.run(None, {"segment": segments.astype(np.float32)})
        # FSQ: the bounded latent, rounded and shifted to 0..alphabet-1; VQ: code indices.
        top = int(self.manifest.quantizer["alphabet"]) - 1 - self.half
        symbols = np.clip(np.rint(latent), -self.half, top).astype(np.int64) + self.half
        r = self.manifest.profile_range
        profile = np.clip(np.rint(coeff), -r, r).astype(np.int64)
        return symbols, profile

    def codes(self, symbols: np.ndarray, profile: np.ndarray, level: int) -> SegmentCodes:
        """One segment's codes at a level (symbols (G, T), profile (P * K,))."""
        spec = self.manifest.level(level)
        return SegmentCodes(level, symbols[: spec.groups],
                            self.manifest.level_profile(profile, level))

    def compress_codes(self, segments: np.ndarray, level: int) -> list[bytes]:
        """Entropy-coded codes of each segment (no wire header)."""
        symbols, profile = self.encode(segments)
        return [encode_segment_codes(self.codes(s, p, level), self.manifest, self.tables)
                for s, p in zip(symbols, profile, strict=True)]

    def compress(self, segments: np.ndarray, *, level: int, first_seq: int, epoch: int,
                 timestamp_ms: int, quality: list[float] | None = None) -> bytes:
        """The model contract on the edge: consecutive segments -> one wire payload."""
        symbols, profile = self.encode(segments)
        codes = [self.codes(s, p, level) for s, p in zip(symbols, profile, strict=True)]
        quality = quality or [1.0] * len(codes)
        return encode_payload(Payload(
            level=level, model_id=self.model_id, epoch=epoch, first_seq=first_seq,
            timestamp_ms=timestamp_ms,
            segments=tuple(SegmentRecord(q) for q in quality),
            codes=encode_message_codes(codes, self.manifest, self.tables),
        ))
