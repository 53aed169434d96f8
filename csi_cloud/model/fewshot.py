"""The few-shot protocol: how well a bundle learns a new setting from K labelled recordings.

For K labelled recordings per activity drawn from the new setting (``draws`` seeded draws;
the rest of the setting is the test set), it measures

- ``ours_before``: the bundle as it is;
- ``ours_adapted``: after ``csi adapt`` (the context head's activity layers refitted on the
  support windows, shrunk towards the bundle's as far as leave-one-recording-out on the
  support says it helps; :func:`csi_cloud.model.adapt.adapt_head`), with the prior weight
  it chose per level (``level<l>_prior_weight``: 0 the support alone, 1 the bundle's);
- ``ours_parent_prior``: the same, always shrunk towards the bundle's weights (prior weight 1);
- ``ours_support_only``: the same head refitted on the support alone (no prior);
- the accuracy anchors (:mod:`.anchors`, uncompressed CSI) trained on the same support alone
  (``<anchor>_support_only``, every window of it) and, with source data, on the source
  recordings plus the support (``<anchor>_source_and_support``: each recording's last window
  for the per-recording score, every window for the per-second one; :func:`run_anchors`),
  the support's windows weighted so that together they weigh as much as all source windows
  together (:data:`SUPPORT_SHARE`).

Ours is scored through the real codes at every rate level, per recording (the window ending at
its last segment) and per second (every window the service would classify). Used by
``csi evaluate --protocol few-shot`` and bench/model.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from csi_edge.bundle import EdgeEncoder

from .adapt import _accuracy, adapt_head, draw_support, head_windows, pick_support, shrinkage
from .compression import CloudModel
from .data import SegmentData, load_segments, segment_windows
from .heads import codes_from_segments
from .protocols import aggregate

__all__ = ["ANCHOR_FITS", "SUPPORT_SHARE", "Windows", "few_shot", "few_shot_anchors",
           "few_shot_folder", "run_anchors", "support_weights", "untested_activities"]

# The share of the total training weight the K support recordings get when an anchor trains
# on the source data plus the support. Fixed a priori, never tuned on a setting's test
# recordings: the source has 70-130 recordings of a setting the test does not share and the
# support 6K of the one it does, so an unweighted fit would be the source's model (at K = 1,
# the support is 5% of the windows); half of the weight is the even prior between "the new
# setting is like the source" and "it is not". With a share s each support window weighs
# s / (1 - s) * (source windows / support windows), a source window 1.
SUPPORT_SHARE = 0.5


class Windows:
    """Every window of every recording (one per segment), with the anchors' inputs."""

    def __init__(self, data: SegmentData, context: int) -> None:
        from .anchors import anchor_features

        self.rows, self.owner, self.last = segment_windows(data, np.arange(len(data)), context)
        self.features = anchor_features(data.x, self.rows)
        self.activity = data.activity[self.owner]
        self.identity = data.identity[self.owner]

    def of(self, recordings: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(self.owner, recordings))

    def rocket(self, fitted_on: np.ndarray, seed: int, cache: Path | None) -> np.ndarray:
        """MiniRocket features of every window, the transform fitted on up to 1,000 windows
        of the recordings ``fitted_on`` (unsupervised: no label is used)."""
        from .anchors import minirocket_features

        rows = self.of(fitted_on)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(rows, min(len(rows), 1000), replace=False))
        return minirocket_features(self.features.series[pick], self.features.series,
                                   seed=seed, cache=cache)


def _acc(p: np.ndarray, y: np.ndarray) -> float:
    known = y >= 0
    return float((p[known].argmax(1) == y[known]).mean()) if known.any() else float("nan")


def support_weights(n_source: int, n_support: int,
                    share: float = SUPPORT_SHARE) -> np.ndarray:
    """Training weights of ``n_source`` source windows (1 each) followed by ``n_support``
    support windows, the support's together ``share`` of the total."""
    if not 0 < share < 1:
        raise ValueError(f"the support's share of the weight must be in (0, 1), got {share}")
    if n_support < 1:
        raise ValueError(f"no support window to weight (n_support={n_support})")
    each = share / (1 - share) * max(n_source, 1) / n_support
    return np.concatenate([np.ones(n_source), np.full(n_support, each)])


# Which windows the anchors are fitted on, for which score (``run_anchors``'s ``fits``):
# "last": each training recording's last window, the one window a per-recording score reads;
# "every": every window the service would classify, which the per-second score reads.
ANCHOR_FITS: tuple[str, ...] = ("last", "every")


def run_anchors(win: Windows, rocket: np.ndarray, train_recs: np.ndarray,
                test_recs: np.ndarray, n_act: int, n_id: int, *, identity: bool, seed: int,
                support: np.ndarray | None = None, support_share: float = SUPPORT_SHARE,
                threads: int | None = 1,
                fits: Sequence[str] = ANCHOR_FITS) -> dict[str, dict[str, float]]:
    """Anchors fitted on the windows of ``train_recs`` (plus the ``support`` recordings,
    whose windows get ``support_share`` of the total weight), scored on ``test_recs``.

    ``fits`` (:data:`ANCHOR_FITS`): with "last", the per-recording scores come from anchors
    fitted on each training recording's last window (a window that starts mid-recording is
    another input than the full one the score reads: on WiAR's 5 folds, MiniRocket + ridge
    fitted on every window scored 0.935 per recording, fitted on the last windows 0.985);
    with "every", the per-second scores come from anchors fitted on every window, and so do
    the per-recording ones where "last" is not asked for (else they are kept as
    ``<task>_accuracy_every_window_fit``)."""
    from .anchors import fit_predict

    unknown = set(fits) - set(ANCHOR_FITS)
    if unknown or not fits:
        raise ValueError(f"anchor fits must be among {ANCHOR_FITS}, got {list(fits)}")
    test = win.of(test_recs)
    last = win.last[test]
    sup_all = win.of(support) if support is not None and len(support) else \
        np.array([], dtype=np.int64)
    out: dict[str, dict[str, float]] = {}
    tasks = ("activity", "identity") if identity else ("activity",)
    for fit in fits:
        train, sup, scored = win.of(train_recs), sup_all, test
        if fit == "last":
            train, sup, scored = (train[win.last[train]],
                                  sup[win.last[sup]], test[last])
        weight = np.ones(len(train))
        if len(sup):
            weight = support_weights(len(train), len(sup), support_share)
            train = np.concatenate([train, sup])
        preds = fit_predict(rocket, win.features, train, scored, win.activity,
                            win.identity if identity else None, n_act, n_id if identity else 0,
                            weight=weight, seed=seed, threads=threads)
        for name, p in preds.items():
            row = out.setdefault(name, {})
            for task in tasks:
                if task not in p:
                    continue
                truth = getattr(win, task)[scored]
                if fit == "last":
                    row[f"{task}_accuracy"] = _acc(p[task], truth)
                    continue
                suffix = "_every_window_fit" if "last" in fits else ""
                row[f"{task}_accuracy{suffix}"] = _acc(p[task][last], truth[last])
                row[f"{task}_accuracy_per_second"] = _acc(p[task], truth)
    return out


def few_shot(model: CloudModel, edge: EdgeEncoder | CloudModel, data: SegmentData,
             target: np.ndarray, shots: Sequence[int], draws: int, *,
             win: Windows | None = None, rocket: np.ndarray | None = None,
             source: np.ndarray | None = None, source_shots: Sequence[int] | None = None,
             threads: int | None = 1,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One setting: K -> method -> mean and std over draws (see the module docstring).

    ``target``: the new setting's recordings in ``data``; ``source``: recordings of the
    source data in ``data`` (for the anchors trained with it); ``win``/``rocket``: the
    anchors' windows and MiniRocket features (no anchors without them); ``source_shots``: the
    K at which the anchors also train on the source data (None: every K); ``threads``: the
    anchors' boosting threads."""
    codes = codes_from_segments(model, edge, data)
    n_act = len(model.manifest.labels["activity"] or [])
    # Adaptation only swaps the head's activity layers: the head's features of every window
    # of the setting are computed once, for every fit and score below.
    windows = head_windows(model.net, codes, target) if model.net.context_head else None
    out: dict[str, Any] = {}
    for k in shots:
        per: dict[str, list[dict[str, float]]] = {}
        for draw in range(draws):
            support, query = pick_support(codes, target, k, draw)
            if not len(query):
                continue
            nets = [("ours_before", model.net)]
            if windows is not None:
                nets += [
                    ("ours_adapted", adapt_head(model.net, codes, support, windows=windows)),
                    ("ours_parent_prior", adapt_head(model.net, codes, support, prior_weight=1.0,
                                                     windows=windows)),
                    ("ours_support_only", adapt_head(model.net, codes, support, prior=False,
                                                     windows=windows))]
            for name, net in nets:
                row = {
                    **{f"level{lv}_activity_accuracy": a for lv, a in
                       enumerate(_accuracy(net, codes, query, windows=windows))},
                    **{f"level{lv}_activity_accuracy_per_second": a for lv, a in
                       enumerate(_accuracy(net, codes, query, every=True, windows=windows))}}
                if name == "ours_adapted":
                    row.update({f"level{lv}_prior_weight": w for lv, v in
                                shrinkage(net).items() if (w := v["prior_weight"]) is not None})
                per.setdefault(name, []).append(row)
            if win is not None and rocket is not None:
                with_source = source is not None and len(source) > 0 and (
                    source_shots is None or k in source_shots)
                for name, row in _anchor_rows(win, rocket, support, query, n_act, draw,
                                              source if with_source else None,
                                              threads=threads).items():
                    per.setdefault(name, []).append(row)
        out[str(k)] = {m: aggregate(rows) for m, rows in per.items()}
        if log and "ours_adapted" in out[str(k)]:
            before = out[str(k)]["ours_before"]["level0_activity_accuracy"]["mean"]
            after = out[str(k)]["ours_adapted"]["level0_activity_accuracy"]["mean"]
            log(f"K={k}: level-0 activity accuracy before {before:.3f}, adapted {after:.3f}")
    return out


def _anchor_rows(win: Windows, rocket: np.ndarray, support: np.ndarray, query: np.ndarray,
                 n_act: int, draw: int, source: np.ndarray | None, *, threads: int | None,
                 fits: Sequence[str] = ANCHOR_FITS) -> dict[str, dict[str, float]]:
    """One support draw's anchor rows: on the support alone, and (``source`` given) on the
    source plus the support.

    On the support alone the anchors are fitted on every window for both scores: its K last
    windows an activity are too few to fit on (the boosting's leaves need 20 windows), so
    those rows are made only when ``fits`` holds "every". On the source plus the support, the
    per-recording scores come from the last windows as :func:`run_anchors` does (``fits``)."""
    out: dict[str, dict[str, float]] = {}
    if "every" in fits:
        out.update({f"{name}_support_only": row for name, row in run_anchors(
            win, rocket, support, query, n_act, 0, identity=False, seed=draw,
            threads=threads, fits=("every",)).items()})
    if source is not None:
        out.update({f"{name}_source_and_support": row for name, row in run_anchors(
            win, rocket, source, query, n_act, 0, identity=False, seed=draw, support=support,
            threads=threads, fits=fits).items()})
    return out


def few_shot_anchors(win: Windows, rocket: np.ndarray, target: np.ndarray, n_act: int,
                     shots: Sequence[int], draws: int, *, source: np.ndarray | None = None,
                     source_shots: Sequence[int] | None = None, threads: int | None = 1,
                     fits: Sequence[str] = ANCHOR_FITS,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """:func:`few_shot`'s anchor rows alone, without a bundle: the same support draws (they
    depend only on the recordings' activities and the draw's seed), so they can be measured
    apart from ours and merged with its rows. Each K also gives the anchors' CPU seconds per
    draw (``anchors_cpu_s``). ``fits``: as :func:`_anchor_rows` (``("last",)``: only the
    source + support rows' per-recording scores, to merge into rows measured earlier)."""
    activity = np.full(int(win.owner.max()) + 1, -1)
    activity[win.owner] = win.activity
    out: dict[str, Any] = {}
    for k in shots:
        per: dict[str, list[dict[str, float]]] = {}
        for draw in range(draws):
            support, query = draw_support(activity, target, k, draw)
            if not len(query):
                continue
            started = time.process_time()
            with_source = source is not None and len(source) > 0 and (
                source_shots is None or k in source_shots)
            rows = _anchor_rows(win, rocket, support, query, n_act, draw,
                                source if with_source else None, threads=threads, fits=fits)
            for name, row in rows.items():
                per.setdefault(name, []).append(row)
            # A run of the last-window fits alone is timed apart from one with every fit.
            per.setdefault("anchors_cpu_s" if "every" in fits else "anchors_last_fit_cpu_s",
                           []).append({"seconds": round(time.process_time() - started, 1)})
        out[str(k)] = {m: aggregate(rows) for m, rows in per.items()}
        scored = [(v["activity_accuracy"]["mean"], m) for m, v in out[str(k)].items()
                  if "activity_accuracy" in v]
        if log and scored:
            best = max(scored)
            cpu = out[str(k)].get("anchors_cpu_s") or out[str(k)]["anchors_last_fit_cpu_s"]
            log(f"K={k}: best anchor {best[1]} {best[0]:.3f}, "
                f"{cpu['seconds']['mean']:.0f} s CPU a draw")
    return out


def untested_activities(activity: np.ndarray, names: Sequence[str], shots: Sequence[int],
                        folder: Path) -> dict[str, list[str]]:
    """K -> the activities of a setting's recordings ``activity`` (one label a recording) with
    at most K recordings: all of them go to the support, none is tested. Raises ValueError for
    a K that leaves no recording to test."""
    values, counts = np.unique(activity[activity >= 0], return_counts=True)
    per = {names[int(v)]: int(c) for v, c in zip(values, counts, strict=True)}
    out: dict[str, list[str]] = {}
    for k in shots:
        if all(c <= k for c in per.values()):
            raise ValueError(
                f"--shots {k} leaves no recording of {folder} to test: K labelled recordings "
                f"of an activity are the support and the rest the test, and no activity has "
                f"more than {max(per.values(), default=0)} (recordings per activity: {per})")
        out[str(k)] = sorted(a for a, c in per.items() if c <= k)
    return out


def few_shot_folder(bundle: Path, dataset: str, data_dir: Path, shots: Sequence[int],
                    draws: int, *, source_dir: Path | None = None, anchors: bool = True,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``csi evaluate --protocol few-shot``: the folder is the new setting; ``source_dir``
    (same dataset kind) the source data the anchors may also train on."""
    from ..datasets import index_dataset

    model = CloudModel.load(bundle)
    manifest = model.manifest
    acts = manifest.labels["activity"] or []
    ids = manifest.labels["identity"] or []
    examples = list(index_dataset(dataset, data_dir))
    source_examples = list(index_dataset(dataset, source_dir)) if source_dir else []
    unknown = sorted({e.activity for e in examples + source_examples} - set(acts))
    if unknown:
        raise ValueError(f"activities {unknown} are not in bundle {manifest.name!r} ({acts})")
    data = load_segments(source_examples + examples, manifest.input_spec, acts, ids)
    from_source = {id(e) for e in source_examples}
    is_source = np.array([id(e) in from_source for e in data.examples], dtype=bool)
    target = np.flatnonzero(~is_source)
    source = np.flatnonzero(is_source)
    untested = untested_activities(data.activity[target], acts, shots, data_dir)
    win = rocket = None
    if anchors:
        from .anchors import require

        require()
        win = Windows(data, model.net.cfg.context_segments)
        rocket = win.rocket(source if len(source) else target, 0, None)
    result = few_shot(model, EdgeEncoder(bundle), data, target, shots, draws, win=win,
                      rocket=rocket, source=source if len(source) else None, log=log)
    return {"model": manifest.id, "name": manifest.name, "dataset": dataset,
            "data": str(data_dir), "source": str(source_dir) if source_dir else None,
            "target_recordings": len(target), "source_recordings": len(source),
            "shots": list(shots), "draws": draws, "results": result,
            "untested_activities": untested,
            "note": "anchors read uncompressed CSI; their MiniRocket transform is fitted "
                    "(unsupervised) on the source recordings when given, else on the folder"}
