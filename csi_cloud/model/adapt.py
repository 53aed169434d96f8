"""Few-shot adaptation to a new session or room, and open-set identity evaluation.

``csi adapt`` refits the cloud-side classifier of a bundle on K labelled recordings per
activity from the new place; the edge encoder, entropy tables and input spec stay as they
are, so the result is a derived bundle (see :mod:`.heads`) that APs need not switch for. The
remaining recordings of the folder, never seen by the adaptation, measure the accuracy before
and after; with no recording left over, the result says ``held_out: false``.

Methods: ``ridge`` (bundles with a context head, the default): each rate level's activity
ridge layer is refitted in closed form on every window of the support recordings, shrunk
towards the parent's weights, with the shrinkage chosen by leave-one-recording-out (seconds,
no gradient steps); ``ridge-alone``: the same without the parent (the support alone). For
bundles without a context head: ``finetune``, ``prototypes``, ``prototypes+finetune`` of the
network's context classifier.

``csi evaluate --open-set`` is leave-one-user-out: for each enrolled person, the context
classifier is trained from scratch on the others' codes (the edge encoder stays; it was
trained on every person's CSI, but never with identity labels), the open-set threshold is
calibrated on the others' validation windows, and the left-out person's windows must score
as unknown.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from csi_edge.bundle import Bundle, EdgeEncoder

from ..datasets import Example, index_dataset, random_split
from .compression import CloudModel
from .context_head import ContextHead
from .data import SegmentData, load_segments, segment_windows
from .heads import (
    CodeData,
    Part,
    auroc,
    calibrate_identity,
    classify_codes,
    codes_from_segments,
    codes_from_stored,
    family_wire_ids,
    feature_distance,
    fit_classifier,
    open_set_decision,
    window_batch,
)
from .network import CSICodecNet, ModelConfig

__all__ = ["METHODS", "HeadWindows", "adapt_codes", "adapt_head",
           "draw_support", "head_windows", "load_codes", "open_set_codes", "pick_support",
           "set_prototypes", "shrinkage", "support_windows"]


def load_codes(bundle: Path | Bundle, dataset: str, data_dir: Path,
               examples: Sequence[Example] | None = None,
               unlabelled: Sequence[Example] = ()) -> tuple[CloudModel, CodeData]:
    """The codes of every labelled recording of a folder, as the bundle's edges send them,
    followed by those of the ``unlabelled`` recordings (activity and identity -1 whatever
    their examples say; recordings without a usable segment are left out).

    For the service's own ``recordings`` the codes stored with the recordings are used (exactly
    what the APs sent); other datasets are preprocessed and encoded with the int8 encoder.
    """
    bundle = Bundle.load(bundle)
    model = CloudModel.load(bundle)
    manifest = model.manifest
    activities = manifest.labels["activity"] or []
    identities = manifest.labels["identity"] or []
    examples = list(examples if examples is not None else index_dataset(dataset, data_dir))
    unknown = sorted({e.activity for e in examples} - set(activities))
    if unknown:
        raise ValueError(f"activities {unknown} in {data_dir} are not in bundle "
                         f"{manifest.name!r} ({activities}); adaptation keeps the label set")
    if dataset == "recordings":
        act = {a: i for i, a in enumerate(activities)}
        ids = {a: i for i, a in enumerate(identities)}
        every = [*examples, *unlabelled]
        return model, codes_from_stored(
            model, [([e.path], e.start if e.start is not None else 0.0,
                     e.end if e.end is not None else float("inf")) for e in every],
            activity=[act[e.activity] for e in examples] + [-1] * len(unlabelled),
            identity=[ids.get(e.identity or "", -1) for e in examples] + [-1] * len(unlabelled),
            wire_ids=family_wire_ids(bundle.folder.parent))
    # An unlabelled example's own labels are not read: any known activity stands in for
    # them while the recordings are read, and the codes then say -1.
    stand_in = [replace(e, activity=activities[0], identity=None) for e in unlabelled]
    data: SegmentData = load_segments([*examples, *stand_in], manifest.input_spec,
                                      activities, identities)
    codes = codes_from_segments(model, EdgeEncoder(bundle), data)
    pool = {(str(e.path), e.start, e.end) for e in stand_in}
    mark = np.array([(str(e.path), e.start, e.end) in pool for e in data.examples], dtype=bool)
    codes.activity[mark] = -1
    codes.identity[mark] = -1
    return model, codes


def pick_support(codes: CodeData, recordings: np.ndarray, shots: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """K recordings per activity (seeded) for adaptation; the rest for testing."""
    return draw_support(codes.activity, recordings, shots, seed)


def draw_support(activity: np.ndarray, recordings: np.ndarray, shots: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pick_support` from the recordings' activity labels alone: the same draw, for
    whatever needs the support without a bundle's codes (the anchors of the few-shot
    protocol)."""
    rng = np.random.default_rng(seed)
    support: list[int] = []
    for c in sorted(set(activity[recordings].tolist())):
        members = recordings[activity[recordings] == c]
        support += rng.permutation(members)[:shots].tolist()
    chosen = set(support)
    query = np.array([r for r in recordings.tolist() if r not in chosen], dtype=np.int64)
    return np.array(sorted(support), dtype=np.int64), query


@dataclass(slots=True)
class HeadWindows:
    """Every window the service would classify in some recordings, on every code variant,
    with the context head's features: computed once and read by everything that only swaps
    the head's activity layers (the support fit, the scores before and after).

    ``groups``: (variant, rate level, owner recording (W,), whether the window ends at its
    recording's last segment (W,), whether its every slot is present (W,), features (W, F)),
    in the order of :func:`~.data.segment_windows` within each variant."""

    recordings: np.ndarray
    groups: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]

    def select(self, level: int, recordings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features (W, F) and owners (W,) of the windows of ``recordings`` at a rate level,
        in the order :func:`support_windows` gives them."""
        feats, owners = [], []
        for _, lv, own, _, _, f in self.groups:
            if lv == level:
                pick = np.isin(own, recordings)
                feats.append(f[pick])
                owners.append(own[pick])
        return np.concatenate(feats), np.concatenate(owners)

    def accuracy(self, head: ContextHead, labels: np.ndarray, recordings: np.ndarray, *,
                 every: bool = False) -> list[float]:
        """Activity accuracy of ``head`` per code variant, as :func:`_accuracy` defines it."""
        missing = np.setdiff1d(recordings, self.recordings)
        if len(missing):
            raise ValueError(f"recordings {missing.tolist()} have no precomputed windows")
        correct: dict[int, int] = {}
        total: dict[int, int] = {}
        for v, owners, p_act in self.probabilities(head, recordings, last_only=not every):
            correct[v] = correct.get(v, 0) + int((p_act.argmax(1) == labels[owners]).sum())
            total[v] = total.get(v, 0) + len(owners)
        return [round(correct[v] / total[v], 4) for v in sorted(total)]

    def probabilities(self, head: ContextHead, recordings: np.ndarray, *,
                      last_only: bool = False
                      ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Per group: (code variant, owner recording (W,), ``head``'s activity probabilities
        (W, A)) of the windows of ``recordings`` (with ``last_only``, of those ending their
        recording); groups without such a window are skipped. The head scores exactly those
        rows (BLAS rounds a row's last bits by the rows scored with it)."""
        for v, lv, own, last, whole, f in self.groups:
            pick = np.isin(own, recordings) & (last if last_only else True)
            if pick.any():
                yield v, own[pick], head.levels[head.level_index(lv)].activity_probabilities(
                    f[pick], whole[pick])


def _level_windows(net: CSICodecNet, codes: CodeData, recordings: np.ndarray
                   ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray,
                                       tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Every window the service would classify in ``recordings``, per code variant and rate
    level: (variant, level, owner recording (W,), whether it ends its recording (W,), and
    the context head's inputs (z_q, profile coefficients, present))."""
    from .context_head import profile_coefficients

    rows, owners, last = segment_windows(codes, np.asarray(recordings, np.int64),
                                         net.cfg.context_segments)
    for v in range(codes.z_q.shape[0]):
        z, p, present, level = (t.numpy() for t in window_batch(codes, rows,
                                                                np.full(len(rows), v)))
        coeff = profile_coefficients(net, p, transmitted=level < net.cfg.levels)
        for lv in np.unique(level).tolist():
            pick = np.flatnonzero(level == lv)
            yield v, int(lv), owners[pick], last[pick], (z[pick], coeff[pick], present[pick])


def head_windows(net: CSICodecNet, codes: CodeData, recordings: np.ndarray) -> HeadWindows:
    """The context head's features of every window of the recordings (see
    :class:`HeadWindows`); valid for every head with the same transforms (the parent's and
    the ones :func:`adapt_head` derives from it)."""
    head = net.context_head
    if head is None:
        raise ValueError("this bundle has no context head")
    recordings = np.asarray(recordings, dtype=np.int64)
    groups = [(v, lv, owners, last, np.asarray(inputs[2].all(axis=1)),
               head.features(lv, *inputs))
              for v, lv, owners, last, inputs in _level_windows(net, codes, recordings)]
    return HeadWindows(recordings, groups)


def _accuracy(net: CSICodecNet, codes: CodeData, recordings: np.ndarray, *,
              every: bool = False, windows: HeadWindows | None = None) -> list[float]:
    """Activity accuracy per code variant (rate level) on one window per recording, or with
    ``every`` on every window the service would classify (per second). ``windows``: the
    head's features, computed once (:func:`head_windows`) for several calls."""
    if net.context_head is not None:
        windows = windows if windows is not None else head_windows(net, codes, recordings)
        return windows.accuracy(net.context_head, codes.activity, recordings, every=every)
    out = []
    for v in range(codes.z_q.shape[0]):
        p_act, _, _, owners = classify_codes(net, codes, recordings, v, all_windows=every,
                                             features=False)
        out.append(round(float((p_act.argmax(1) == codes.activity[owners]).mean()), 4))
    return out


Method = Literal["ridge", "ridge-alone", "finetune", "prototypes", "prototypes+finetune"]
METHODS: tuple[str, ...] = ("ridge", "ridge-alone", "finetune", "prototypes",
                            "prototypes+finetune")
PROTOTYPE_SCALE = 10.0  # logit scale of the prototype head (softmax temperature 1/10)


@torch.no_grad()
def set_prototypes(net: CSICodecNet, codes: CodeData, support: np.ndarray) -> None:
    """Make the activity layer a nearest-prototype classifier, in place.

    Each activity's prototype is the mean direction of the (layer-normalised) activity
    features of every window of its support recordings, at every rate level; the layer's
    weights become the unit prototypes times :data:`PROTOTYPE_SCALE`, the bias zero, so the
    argmax is the prototype with the highest cosine similarity.
    """
    feats, owners = [], []
    for v in range(codes.z_q.shape[0]):
        pooled, o = _activity_features(net, codes, support, v)
        feats.append(pooled)
        owners.append(o)
    f = np.concatenate(feats)
    f /= np.linalg.norm(f, axis=1, keepdims=True).clip(1e-6)
    labels = codes.activity[np.concatenate(owners)]
    layer = net.classifier.activity
    for c in range(layer.weight.shape[0]):
        if not (labels == c).any():
            continue  # an activity without support keeps its trained weights
        proto = f[labels == c].mean(0)
        layer.weight[c] = torch.from_numpy(PROTOTYPE_SCALE * proto / max(
            float(np.linalg.norm(proto)), 1e-6)).float()
        layer.bias[c] = 0.0


@torch.no_grad()
def _activity_features(net: CSICodecNet, codes: CodeData, recordings: np.ndarray,
                       variant: int) -> tuple[np.ndarray, np.ndarray]:
    """Activity features (W, E) of every window of the recordings, and their owners."""
    net.eval()
    rows, owners, _ = segment_windows(codes, recordings, net.cfg.context_segments)
    out = []
    for i in range(0, len(rows), 256):
        z, p, present, level = window_batch(codes, rows[i : i + 256],
                                      np.full(len(rows[i : i + 256]), variant))
        out.append(net.classifier.features(z, p, present, level)[0].numpy())
    return np.concatenate(out), owners


def adapt_codes(net: CSICodecNet, codes: CodeData, support: np.ndarray, *,
                part: Part = "classifier", epochs: int = 60, seed: int = 0,
                identity: bool = False, method: Method = "finetune") -> CSICodecNet:
    """A copy of ``net`` adapted to the support recordings: its context classifier fine-tuned
    (``finetune``), its activity layer replaced by class prototypes (``prototypes``), or
    prototypes then a gentler fine-tuning (``prototypes+finetune``)."""
    if method not in METHODS:
        raise ValueError(f"unknown adaptation method {method!r} (known: {', '.join(METHODS)})")
    if method in ("ridge", "ridge-alone"):
        return adapt_head(net, codes, support, prior=method == "ridge")
    adapted = copy.deepcopy(net)
    if method != "finetune":
        set_prototypes(adapted, codes, support)
    if method != "prototypes":
        fit_classifier(adapted, codes, support, part=part, epochs=epochs, seed=seed,
                       identity=identity, windows_per_recording=16,
                       lr=1e-3 if method == "finetune" else 3e-4)
    return adapted


def support_windows(codes: CodeData, support: np.ndarray, n: int
                    ) -> dict[int, tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]]:
    """Every window of the support recordings on every code variant, grouped by the window's
    rate level: level -> ((z_q, decoded profiles, present), owner recordings)."""
    rows, owners, _ = segment_windows(codes, support, n)
    grouped: dict[int, list[tuple[np.ndarray, ...]]] = {}
    for v in range(codes.z_q.shape[0]):
        z, p, present, level = window_batch(codes, rows, np.full(len(rows), v))
        for lv in np.unique(level.numpy()).tolist():
            pick = np.flatnonzero(level.numpy() == lv)
            grouped.setdefault(int(lv), []).append(
                (z.numpy()[pick], p.numpy()[pick], present.numpy()[pick], owners[pick]))
    out: dict[int, tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {}
    for lv, parts in grouped.items():
        z_q, prof, seen, own = (np.concatenate(a) for a in zip(*parts, strict=True))
        out[lv] = ((z_q, prof, seen), own)
    return out


def _short_windows(net: CSICodecNet, codes: CodeData, support: np.ndarray,
                   lengths: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Rate level -> the context head's features (W, F) of the support's windows read at
    each of ``lengths`` (the live output's shorter readings: the last k slots) and each copy's
    owner recording (W,)."""
    from .context_head import truncated

    head = net.context_head
    assert head is not None
    out: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for _, lv, owners, _, inputs in _level_windows(net, codes, support):
        short, src = truncated(inputs, lengths)
        if len(src):
            out.setdefault(lv, []).append((head.features(lv, *short), owners[src]))
    return {lv: (np.concatenate([f for f, _ in parts]), np.concatenate([o for _, o in parts]))
            for lv, parts in out.items()}


def adapt_head(net: CSICodecNet, codes: CodeData, support: np.ndarray, *,
               prior: bool = True, prior_weight: float | None = None,
               windows: HeadWindows | None = None,
               short_lengths: Sequence[int] = ()) -> CSICodecNet:
    """A copy of ``net`` whose context head's activity layers are refitted on the support
    windows of each rate level they occur at; levels without support windows keep the
    parent's layer. With ``prior``, each layer is shrunk towards ``lam`` times the parent's,
    lam in [0, 1] chosen with the penalty by leave-one-recording-out on the support (0: the
    support alone, when the parent does not fit the new setting), or fixed by
    ``prior_weight``; the chosen values are on each layer (``RidgeHead.prior_weight``,
    ``alpha``). ``windows``: the head's features of (at least) the support recordings, if
    already computed.

    The complete-window layer, where the parent has one, is dropped at every level the
    support reaches: the adapted activity layer reads every window there (a layer fitted
    on a new setting's few complete windows, or shrunk towards the parent's, read new
    sessions and rooms worse; docs/model.md, "Complete windows").

    ``short_lengths``: the lengths the parent's short-reading layer was fitted on
    (``training.options.head_lengths``). Where given and the parent has that layer, it is
    refitted the same way on the support's windows read at those lengths, so the live
    output's shorter readings are the new setting's too. Without them the adapted levels
    lose the layer, and the full window's adapted layer reads the shorter readings."""
    from .rocket import fit_ridge, ridge_to_prior

    lengths = [int(k) for k in short_lengths if 1 <= int(k) < net.cfg.context_segments]
    parent_short = net.context_head is not None and any(
        part.short is not None for part in net.context_head.levels)
    short = (_short_windows(net, codes, support, lengths) if lengths and parent_short
             else {})

    if net.context_head is None:
        raise ValueError("this bundle has no context head (it predates it): adapt it with "
                         "--method finetune, prototypes or prototypes+finetune")
    if windows is None:
        windows = head_windows(net, codes, support)
    adapted = copy.deepcopy(net)
    head = adapted.context_head
    assert head is not None
    labels = codes.activity
    for lv in dict.fromkeys(group[1] for group in windows.groups):
        feats, owners = windows.select(lv, support)
        if not len(owners):
            continue
        part = head.levels[head.level_index(lv)]
        y = labels[owners]
        if prior:
            part.activity = ridge_to_prior(feats, y, part.activity, groups=owners,
                                           prior_weight=prior_weight)
        else:
            fitted = fit_ridge(feats, y, part.activity.coef.shape[0], groups=owners)
            fitted.temperature = part.activity.temperature
            part.activity = fitted
        # The complete-window layer is dropped: the adapted activity layer reads every
        # window. Refitted on the support's complete windows alone it read Fition's new
        # sessions and rooms 2.5 and 4.7 points worse after adaptation, and refitted on every
        # support window towards the parent's own still 1.5 and 0.1 worse
        # (bench/results/complete_windows.json), for a gain within the parent's own setting
        # (WiAR's learning curve) that a new room does not have.
        part.complete = None
        # The short-reading layer was fitted on the parent's windows: refitted on the
        # support's shorter readings where their lengths are known, else dropped (the adapted
        # full-window layer then reads them), never left a layer of the old setting.
        part.by_length = {}
        if part.short is None or lv not in short:
            part.short = None
            continue
        s_feats, s_owners = short[lv]
        if prior:
            part.short = ridge_to_prior(s_feats, labels[s_owners], part.short,
                                        groups=s_owners, prior_weight=prior_weight)
        else:
            refit = fit_ridge(s_feats, labels[s_owners], part.short.coef.shape[0],
                              groups=s_owners)
            refit.temperature = part.short.temperature
            part.short = refit
    return adapted


def shrinkage(net: CSICodecNet) -> dict[str, dict[str, float | None]]:
    """Rate level -> the penalty and prior weight of the context head's activity layer, and
    of its short-reading and complete-window layers where it has them (what
    :func:`adapt_head` chose)."""
    head = net.context_head
    if head is None:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for lv, part in enumerate(head.levels[:-1]):  # the last: the unquantized path
        out[str(lv)] = {"alpha": part.activity.alpha,
                        "prior_weight": part.activity.prior_weight}
        if part.short is not None:
            out[str(lv)].update(short_alpha=part.short.alpha,
                                short_prior_weight=part.short.prior_weight)
        if part.complete is not None:
            out[str(lv)].update(complete_alpha=part.complete.alpha,
                                complete_prior_weight=part.complete.prior_weight)
    return out


def _without(net: CSICodecNet) -> CSICodecNet:
    """A copy of ``net`` whose identity head knows one person fewer (re-initialised)."""
    cfg = ModelConfig.model_validate({**net.cfg.model_dump(),
                                      "identities": net.cfg.identities - 1})
    smaller = CSICodecNet(cfg)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("classifier.")}
    smaller.load_state_dict(state, strict=False)
    return smaller


def open_set_codes(net: CSICodecNet, codes: CodeData, identities: list[str],
                   train: np.ndarray, val: np.ndarray, test: np.ndarray, *,
                   epochs: int = 40, seed: int = 0, variant: int = 1,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Leave-one-user-out open-set identity on codes (see the module docstring)."""
    per_user: dict[str, Any] = {}
    for u, person in enumerate(identities):
        remap = np.array([-1 if i == u else i - (i > u) for i in range(len(identities))])
        known_identity = np.where(codes.identity >= 0, remap[np.maximum(codes.identity, 0)],
                                  -1)
        known_codes = replace(codes, identity=known_identity)
        is_known = codes.identity >= 0
        keep = is_known & (codes.identity != u)
        tr, va = train[keep[train]], val[keep[val]]
        te_known = test[keep[test]]
        unseen = np.flatnonzero(codes.identity == u)
        for what, part in (("training", tr), ("validation", va), ("test", te_known),
                           ("left-out", unseen)):
            if not len(part):
                raise ValueError(f"leaving out {person!r} leaves no {what} recording of the "
                                 f"other people; the folder is too small")
        small = _without(net)
        fit_classifier(small, known_codes, tr, part="scratch", epochs=epochs, seed=seed,
                       windows_per_recording=4)
        calibration = calibrate_identity(small, known_codes, tr, known_codes, va)
        threshold = calibration["threshold"]
        _, p_known, f_known, _ = classify_codes(small, known_codes, te_known, variant,
                                                all_windows=True)
        _, p_unseen, f_unseen, _ = classify_codes(small, known_codes, unseen, variant,
                                                  all_windows=True)
        assert p_known is not None and p_unseen is not None
        # The bundle's score (distance to the nearest known person) and, for comparison, the
        # highest identity probability (lower = more likely unknown).
        d_known = feature_distance(f_known, calibration)
        d_unseen = feature_distance(f_unseen, calibration)
        unknown_known = open_set_decision(p_known, {"identity": calibration}, f_known)
        unknown_unseen = open_set_decision(p_unseen, {"identity": calibration}, f_unseen)
        # Closed-set accuracy on one window per held-out recording of the known people.
        p_act, p_end, _, end_owners = classify_codes(small, known_codes, te_known, variant)
        assert p_end is not None
        per_user[person] = {
            "auroc": round(auroc(d_unseen, d_known), 4),
            "auroc_max_probability": round(auroc(-p_unseen.max(1), -p_known.max(1)), 4),
            "unknown_detected": round(float(unknown_unseen.mean()), 4),
            "known_rejected": round(float(unknown_known.mean()), 4),
            "closed_set_identity_accuracy": round(float(
                (p_end.argmax(1) == known_identity[end_owners]).mean()), 4),
            "activity_accuracy": round(float(
                (p_act.argmax(1) == codes.activity[end_owners]).mean()), 4),
            "threshold": threshold,
            "windows_known": len(d_known), "windows_unknown": len(d_unseen),
            "train_recordings": len(tr),
        }
        if log:
            log(f"left out {person}: AUROC {per_user[person]['auroc']:.3f}, closed-set "
                f"identity {per_user[person]['closed_set_identity_accuracy']:.3f}")
    keys = ("auroc", "auroc_max_probability", "unknown_detected", "known_rejected",
            "closed_set_identity_accuracy", "activity_accuracy")
    return {"per_user": per_user,
            "mean": {k: round(float(np.mean([v[k] for v in per_user.values()])), 4)
                     for k in keys},
            "level": variant, "epochs": epochs, "seed": seed,
            "score": "feature distance to the nearest known person (the bundle's open-set "
                     "score); auroc_max_probability: the highest identity probability",
            "note": "the edge encoder is the bundle's (trained on every person's CSI, never "
                    "with identity labels); the context classifier is retrained without the "
                    "left-out person"}


def open_set_folder(bundle: Path | Bundle, dataset: str, data_dir: Path, *, seed: int = 0,
                    epochs: int = 40, level: int = 1,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``csi evaluate --open-set``: leave-one-user-out on a folder of a dataset."""
    bundle = Bundle.load(bundle)
    manifest = bundle.manifest
    identities = manifest.labels["identity"] or []
    if len(identities) < 3:
        raise ValueError(f"bundle {manifest.name!r} knows {len(identities)} identities; "
                         f"leave-one-user-out needs at least 3")
    examples = list(index_dataset(dataset, data_dir))
    model, codes = load_codes(bundle, dataset, data_dir, examples)
    if not 0 <= level < codes.z_q.shape[0]:
        raise ValueError(f"level {level} not in 0..{codes.z_q.shape[0] - 1}")
    data_examples = [e for e in examples if str(e.path) in set(codes.names)]
    position = {name: i for i, name in enumerate(codes.names)}
    split = random_split(data_examples, seed=seed, val=0.15, test=0.15)

    def rows(part: Sequence[Example]) -> np.ndarray:
        return np.array(sorted(position[str(e.path)] for e in part), dtype=np.int64)

    train, val, test = rows(split.train), rows(split.val), rows(split.test)
    # Tiny folders: validate on the training recordings, test on the validation ones.
    val = val if len(val) else train
    test = test if len(test) else val
    result = open_set_codes(model.net, codes, identities, train, val, test, epochs=epochs,
                            seed=seed, variant=level, log=log)
    result["split"] = {"train": len(train), "val": len(val), "test": len(test),
                       "holdout": bool(len(split.test))}
    return {"model": model.id, "name": manifest.name, "dataset": dataset, **result}
