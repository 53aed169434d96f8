"""Cloud-side heads trained on frozen codes: few-shot adaptation, enrollment, open-set identity.

Nothing here touches the edge part of a bundle (int8 encoder, entropy tables, input spec, rate
levels). The context classifier is trained on the codes the edge encoder produces, decoded
exactly as the cloud decodes payloads, and the result is written as a *derived* bundle that
shares its parent's edge part and wire id (``BundleManifest.edge_id``): APs keep streaming,
and the cloud decodes their payloads with the derived bundle once it is active.

Shapes: V code variants (one per rate level for a dataset encoded here; one for stored
codes, whose level is per segment), M segments, R recordings, N context slots, D latent
channels, T latent steps, C profile channels, F identity features (2E).

Open-set identity (csi_cloud.model.openset): :func:`calibrate_identity` keeps each enrolled
person's mean identity feature, one shared per-feature spread and the threshold that accepts
``known_acceptance`` of the validation windows of enrolled people. The same statistics let
enrollment re-fit the identity layer for a new person without the original training
recordings (enrolled people are replayed as Gaussian samples around their means).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F

from csi_edge.bundle import Bundle, BundleManifest, EdgeEncoder, SegmentCodes, write_manifest

from .bundle import CLOUD_FILE, EDGE_FILE, write_cloud
from .compression import CloudModel, classify_windows
from .data import SegmentData, segment_windows, windows
from .network import CSICodecNet, ModelConfig
from .openset import UNKNOWN, feature_distance, open_set_decision
from .window import Windows

__all__ = ["UNKNOWN", "CodeData", "auroc", "calibrate_identity", "classify_codes",
           "code_windows", "codes_from_segments", "codes_from_stored", "enroll_identity",
           "family_wire_ids", "feature_distance", "fit_classifier", "identity_features",
           "open_set_decision", "save_derived", "window_batch"]

Part = Literal["heads", "classifier", "scratch"]


@dataclass(slots=True)
class CodeData:
    """Decoded codes of labelled recordings, laid out like :class:`SegmentData`."""

    z_q: np.ndarray  # (V, M, D, T) what the classifier reads
    profile: np.ndarray  # (V, M, P * C) decoded profiles
    level: np.ndarray  # (V, M) rate level of each segment's codes
    recording: np.ndarray  # (M,)
    slot: np.ndarray  # (M,) segment index within its recording
    start: np.ndarray  # (R,) first row of each recording
    count: np.ndarray  # (R,)
    slots: np.ndarray  # (R,) highest slot + 1
    activity: np.ndarray  # (R,) label index, -1 where unknown
    identity: np.ndarray  # (R,) label index, -1 where unknown
    names: list[str] = field(default_factory=list)  # (R,) where each recording came from

    def __len__(self) -> int:
        return len(self.start)


def _decode_all(model: CloudModel, symbols: np.ndarray, profile: np.ndarray,
                level: int) -> tuple[np.ndarray, np.ndarray]:
    spec = model.manifest.level(level)
    codes = [SegmentCodes(level, s[: spec.groups], model.manifest.level_profile(p, level))
             for s, p in zip(symbols, profile, strict=True)]
    return model.decode_latent(codes)


def codes_from_segments(model: CloudModel, edge: EdgeEncoder | CloudModel, data: SegmentData,
                        levels: Sequence[int] | None = None) -> CodeData:
    """Encode preprocessed recordings with the edge encoder and decode at each level."""
    levels = list(range(len(model.manifest.levels))) if levels is None else list(levels)
    symbols, profile = edge.encode(data.x)
    z_q, prof = zip(*(_decode_all(model, symbols, profile, lv) for lv in levels), strict=True)
    m = len(data.x)
    return CodeData(
        z_q=np.stack(z_q), profile=np.stack(prof),
        level=np.repeat(np.array(levels)[:, None], m, axis=1),
        recording=data.recording, slot=data.slot, start=data.start, count=data.count,
        slots=data.slots, activity=data.activity.copy(), identity=data.identity.copy(),
        names=[str(e.path) for e in data.examples])


def family_wire_ids(folder: Path) -> dict[str, str]:
    """Bundle id -> wire id of every bundle in a models folder (derived bundles share their
    parent's), so stored segments of any member of a family can be told apart from others."""
    from csi_edge.bundle import BundleError, load_manifest

    out: dict[str, str] = {}
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (child / "bundle.json").is_file():
            try:
                manifest = load_manifest(child, verify=False)
            except BundleError:
                continue
            out[manifest.id] = manifest.wire_id
    return out


def codes_from_stored(model: CloudModel, ranges: Sequence[tuple[Sequence[Path], float, float]],
                      activity: Sequence[int] | None = None,
                      identity: Sequence[int] | None = None,
                      wire_ids: dict[str, str] | None = None) -> CodeData:
    """Codes the cloud stored in its recordings (exactly what the APs sent), per time range.

    ``ranges``: (recording files, start, end) in Unix seconds; every segment of those files
    that starts inside [start, end) and was coded by an edge part the model shares is used.
    Segments that do not decode (another model, an idle marker) are left out as missing.
    ``wire_ids`` (bundle id -> wire id, :func:`family_wire_ids`) says which stored bundle ids
    share the model's edge part; without it, only the model itself and its wire id do.
    """
    from csi_edge import CSIError
    from csi_edge.bundle import decode_segment_codes

    from ..storage import StoredSegments, read_segments

    wire = model.manifest.wire_id
    family = {model.id: wire, wire: wire, **(wire_ids or {})}
    zs, ps, lvs, rec, slot, names = [], [], [], [], [], []
    starts: list[int] = []
    counts: list[int] = []
    slot_counts: list[int] = []
    kept: list[int] = []
    segment_ms = model.segment_ms
    read: dict[str, StoredSegments] = {}  # each file read once: many ranges share one
    for r, (files, lo, hi) in enumerate(ranges):
        items: dict[int, SegmentCodes] = {}
        for path in files:
            if str(path) not in read:
                read[str(path)] = read_segments(path)
            stored = read[str(path)]
            for i, data in enumerate(stored.codes):
                t = int(stored.timestamp_ms[i])
                if not lo * 1000 <= t < hi * 1000 or not data:
                    continue
                try:
                    if family.get(stored.model[i]) != wire:
                        continue
                    items[t] = decode_segment_codes(data, int(stored.level[i]),
                                                    model.manifest, model.tables)
                except (CSIError, ValueError):
                    continue
        if not items:
            continue
        times = np.array(sorted(items))
        slots = (times - times[0]) // segment_ms
        z, p = model.decode_latent([items[int(t)] for t in times])
        starts.append(sum(counts))
        counts.append(len(times))
        slot_counts.append(int(slots.max()) + 1)
        zs.append(z)
        ps.append(p)
        lvs.append(np.array([items[int(t)].level for t in times]))
        rec.append(np.full(len(times), len(kept)))
        slot.append(slots)
        names.append(f"{[str(f) for f in files][:1]}@{lo:.3f}-{hi:.3f}")
        kept.append(r)
    if not kept:
        raise ValueError(f"no stored segment of model {model.manifest.name!r} in any of the "
                         f"{len(ranges)} labelled ranges")
    pick = np.array(kept)
    return CodeData(
        z_q=np.concatenate(zs)[None], profile=np.concatenate(ps)[None],
        level=np.concatenate(lvs)[None], recording=np.concatenate(rec),
        slot=np.concatenate(slot), start=np.array(starts), count=np.array(counts),
        slots=np.array(slot_counts),
        activity=(np.asarray(activity)[pick] if activity is not None
                  else np.full(len(kept), -1)),
        identity=(np.asarray(identity)[pick] if identity is not None
                  else np.full(len(kept), -1)),
        names=names)


def code_windows(codes: CodeData, rows: np.ndarray, variant: int | np.ndarray) -> Windows:
    """Window rows (W, N) of ``codes`` (-1 missing) read from code variant ``variant`` (one
    for all, or one per window (W,)); a window's level is its newest segment's (its variant's
    row 0's for a window with none)."""
    m = codes.z_q.shape[1]
    present = rows >= 0
    flat = np.where(present, np.asarray(variant).reshape(-1, 1) * m + rows, -1)
    newest = rows.shape[1] - 1 - np.argmax(present[:, ::-1], axis=1)
    last = np.where(present.any(1), flat[np.arange(len(rows)), newest],
                    np.asarray(variant) * m)
    return Windows.gather(flat, codes.z_q.reshape(-1, *codes.z_q.shape[2:]),
                          codes.profile.reshape(-1, codes.profile.shape[-1]),
                          codes.level.reshape(-1)[last])


def window_batch(codes: CodeData, rows: np.ndarray, variant: np.ndarray
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`code_windows` as tensors: z_q (W, N, D, T), profile (W, N, P * C), present (W, N),
    level (W,)."""
    w = code_windows(codes, rows, variant)
    return (torch.from_numpy(w.z_q), torch.from_numpy(w.profile), torch.from_numpy(w.present),
            torch.from_numpy(w.level))


def _drop(present: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Random segment dropout that keeps at least the last present slot."""
    if rate <= 0:
        return present
    keep = torch.rand(present.shape, generator=gen) >= rate
    last = present.shape[1] - 1 - present.flip(1).float().argmax(dim=1)
    keep[torch.arange(len(present)), last] = True
    return present & keep


def _parameters(net: CSICodecNet, part: Part) -> list[torch.nn.Parameter]:
    c = net.classifier
    if part == "heads":
        heads = [c.activity, c.norm] + ([c.identity] if c.identity is not None else [])
        return [p for m in heads for p in m.parameters()]
    return list(c.parameters())


def fit_classifier(net: CSICodecNet, codes: CodeData, recordings: np.ndarray, *,
                   part: Part = "classifier", epochs: int = 30, lr: float = 1e-3,
                   batch: int = 32, windows_per_recording: int = 8,
                   segment_dropout: float = 0.3, activity: bool = True, identity: bool = True,
                   seed: int = 0, threads: int | None = None,
                   progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the context classifier (or only its heads) on frozen codes, in place.

    ``part``: ``heads`` (the activity and identity layers), ``classifier`` (the whole context
    classifier, fine-tuned) or ``scratch`` (the classifier re-initialised, then trained).
    Returns the mean loss per epoch.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    if part == "scratch":
        net.classifier.load_state_dict(type(net.classifier)(net.cfg).state_dict())
    params = _parameters(net, part)
    for param in net.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-3)
    n = net.cfg.context_segments
    history = []
    try:
        for epoch in range(epochs):
            net.classifier.train()
            rows, owners = windows(codes, recordings, n, rng, windows_per_recording)  # type: ignore[arg-type]
            order = rng.permutation(len(rows))
            total, steps = 0.0, 0
            for i in range(0, len(order), batch):
                pick = order[i : i + batch]
                variant = rng.integers(0, codes.z_q.shape[0], len(pick))
                z, p, present, level = window_batch(codes, rows[pick], variant)
                present = _drop(present, segment_dropout, gen)
                act_logits, id_logits = net.classifier(z, p, present, level)
                loss = torch.zeros(())
                act = torch.from_numpy(codes.activity[owners[pick]])
                if activity and (act >= 0).any():
                    loss = loss + F.cross_entropy(act_logits[act >= 0], act[act >= 0],
                                                  label_smoothing=0.1)
                ident = torch.from_numpy(codes.identity[owners[pick]])
                if identity and id_logits is not None and (ident >= 0).any():
                    loss = loss + 0.5 * F.cross_entropy(id_logits[ident >= 0],
                                                        ident[ident >= 0], label_smoothing=0.1)
                if not loss.requires_grad:
                    continue
                optimiser.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimiser.step()
                total += loss.item()
                steps += 1
            history.append(total / max(steps, 1))
            if progress:
                progress(epoch, history[-1])
    finally:
        for param in net.parameters():
            param.requires_grad_(True)
        net.eval()
    return history


@torch.no_grad()
def classify_codes(net: CSICodecNet, codes: CodeData, recordings: np.ndarray, variant: int = 0,
                   *, all_windows: bool = False, features: bool = True
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Probabilities for one window per recording (ending at its last segment), or with
    ``all_windows`` one per segment: (p_activity, p_identity, identity features, owners)."""
    net.eval()
    n = net.cfg.context_segments
    if all_windows:
        rows, owners, _ = segment_windows(codes, recordings, n)
    else:
        rows, owners = windows(codes, recordings, n)  # type: ignore[arg-type]
    p_act, p_id, feats = [], [], []
    for i in range(0, len(rows), 256):
        a, b, f = classify_windows(net, code_windows(codes, rows[i : i + 256], variant),
                                   features=features)
        p_act.append(a)
        if b is not None:
            p_id.append(b)
        feats.append(f if f is not None else np.zeros((len(a), 0), np.float32))
    return (np.concatenate(p_act), np.concatenate(p_id) if p_id else None,
            np.concatenate(feats), owners)


def identity_features(net: CSICodecNet, codes: CodeData, recordings: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Identity features (W, F) of every window, on every variant, and their recordings."""
    feats, owners = [], []
    for v in range(codes.z_q.shape[0]):
        _, _, f, o = classify_codes(net, codes, recordings, v, all_windows=True)
        feats.append(f)
        owners.append(o)
    return np.concatenate(feats), np.concatenate(owners)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores where ``positive`` should score higher (ties 1/2)."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if not len(pos) or not len(neg):
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2)
                 / (len(pos) * len(neg)))


def calibrate_identity(net: CSICodecNet, train: CodeData, train_recs: np.ndarray,
                       val: CodeData, val_recs: np.ndarray,
                       known_acceptance: float = 0.95) -> dict[str, Any]:
    """The identity feature statistics (training windows) and the open-set threshold: the
    feature distance that ``known_acceptance`` of the validation windows of enrolled people
    stay under. (The distance told a left-out person apart better than the highest identity
    probability for every Fition user: bench/beyond.py.)"""
    feats, owners = identity_features(net, train, train_recs)
    ident = train.identity[owners]
    classes = net.cfg.identities
    if classes == 0:
        raise ValueError("the bundle has no identity head")
    means = np.stack([feats[ident == c].mean(0) if (ident == c).any()
                      else np.zeros(feats.shape[1]) for c in range(classes)])
    spread = np.concatenate([feats[ident == c] - means[c] for c in range(classes)
                             if (ident == c).any()]).std(0)
    stats = {"feature_mean": np.round(means, 4).tolist(),
             "feature_std": np.round(np.maximum(spread, 1e-4), 4).tolist()}
    val_feats, val_owners = identity_features(net, val, val_recs)
    score = feature_distance(val_feats[val.identity[val_owners] >= 0], stats)
    return {
        "score": "feature_distance",
        "threshold": round(float(np.quantile(score, known_acceptance)), 5),
        "known_acceptance": known_acceptance,
        "validation_windows": len(score),
        **stats,
    }


def enroll_identity(net: CSICodecNet, calibration: dict[str, Any], codes: CodeData,
                    recordings: np.ndarray, *, epochs: int = 200, seed: int = 0,
                    replay: int = 256) -> tuple[CSICodecNet, dict[str, Any]]:
    """A copy of ``net`` whose identity layer has one more class, fit on the new person's
    windows (``codes``) and on Gaussian replays of the enrolled people's features.

    Only the identity layer changes: the encoder, decoder, activity head and the rest of the
    classifier are copied unchanged. Returns the new network and the new identity calibration.
    """
    stats = calibration.get("identity") or {}
    if "feature_mean" not in stats:
        raise ValueError("the bundle has no identity feature statistics (calibration"
                         "['identity']); retrain it with this version to enroll people")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    means = np.asarray(stats["feature_mean"], np.float32)
    std = np.asarray(stats["feature_std"], np.float32)
    new_feats, _ = identity_features(net, codes, recordings)
    old = len(means)
    per_class = max(replay, len(new_feats))
    x_old = (means[:, None, :] + rng.standard_normal((old, per_class, means.shape[1]))
             * std).reshape(-1, means.shape[1])
    y_old = np.repeat(np.arange(old), per_class)
    x = torch.from_numpy(np.concatenate([x_old, new_feats]).astype(np.float32))
    y = torch.from_numpy(np.concatenate([y_old, np.full(len(new_feats), old)]))
    weight = torch.ones(old + 1)
    weight[old] = len(x_old) / old / max(len(new_feats), 1)  # balance the new class
    cfg = ModelConfig.model_validate({**net.cfg.model_dump(), "identities": old + 1})
    derived = CSICodecNet(cfg)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("classifier.identity")}
    derived.load_state_dict(state, strict=False)
    if net.context_head is not None:
        # The head's identity layer does not know the new person (and cannot be refitted
        # without the original windows): identity falls back to the network's identity
        # layer, which is refitted below; the activity part is kept as it is.
        derived.context_head = copy.deepcopy(net.context_head)
        for part in derived.context_head.levels:
            part.identity = None
            part.neighbours = None
    layer = derived.classifier.identity
    assert layer is not None and net.classifier.identity is not None
    with torch.no_grad():
        layer.weight[:old] = net.classifier.identity.weight
        layer.bias[:old] = net.classifier.identity.bias
        layer.weight[old] = torch.from_numpy(new_feats.mean(0)) * 0.1
        layer.bias[old] = layer.bias[:old].mean()
    optimiser = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(epochs):
        loss = F.cross_entropy(layer(x), y, weight=weight, label_smoothing=0.05)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    derived.eval()
    with torch.no_grad():
        p_new = torch.softmax(layer(torch.from_numpy(new_feats)), -1).numpy()
    new_stats = {
        **stats,
        "feature_mean": [*stats["feature_mean"],
                         np.round(new_feats.mean(0), 4).tolist()],
        "enrolled_windows": len(new_feats),
        "enrolled_accepted": round(float((p_new.argmax(1) == old).mean()), 4),
    }
    return derived, new_stats


def save_derived(parent: Path | Bundle, out: Path, net: CSICodecNet, *, name: str,
                 labels: dict[str, list[str] | None] | None = None,
                 calibration: dict[str, Any] | None = None,
                 training: dict[str, Any] | None = None,
                 metrics: dict[str, Any] | None = None,
                 held_out: bool | None = None) -> BundleManifest:
    """Write a bundle derived from ``parent`` in the cloud: the parent's ``edge.onnx`` and
    edge-side manifest fields, new cloud weights; the id is recomputed. ``held_out``: whether
    its metrics come from recordings it was not fitted on (None: it has no such metrics)."""
    parent = Bundle.load(parent, verify=False)
    base = parent.manifest
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(parent.file("edge"), staging / EDGE_FILE)
    cloud = write_cloud(net, staging / CLOUD_FILE)
    manifest = base.model_copy(deep=True, update={
        "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": net.cfg.stored(),
        "labels": labels if labels is not None else base.labels,
        "calibration": calibration if calibration is not None else base.calibration,
        "files": {**base.files, "cloud": base.files["cloud"].model_copy(update={
            "sha256": cloud.sha256, "bytes": cloud.bytes})},
        "training": {**(training or {}), "parent": base.id, "parent_name": base.name},
        "metrics": metrics or {},
        "edge_id": base.wire_id,
        "parent": base.id,
        "held_out": held_out,
    })
    write_manifest(staging, manifest)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest
