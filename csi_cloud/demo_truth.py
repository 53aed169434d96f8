"""The truth of a labelled replay, for ``csi demo``: what each recording an AP replays shows
(from the dataset's file names, e.g. ``walking_user1_rm1_10.pcap``), posted as a label over
each play of it (``POST /api/v1/labels``) so the dashboard shows it beside the predictions,
and a running per-second accuracy for the demo's own lines.

Each recording played is its own epoch (the demo runs the edge with ``loop_new_epoch``: the
next file of the AP's folder, or the first again when the loop starts over), starting at seq
0. So an AP's epochs follow its recordings in order, from the first epoch it sends, and a
play's range on the AP's clock is known from any of its predictions: it starts ``seq``
segments before that one and lasts the recording.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Truth", "TruthKeeper", "label_of", "truth_of"]


@dataclass(frozen=True)
class Truth:
    activity: str | None
    identity: str | None
    duration_s: float  # one pass of the recording, as the edge replays it


def label_of(path: Path, root: Path, labels: dict[str, list[str] | None]
             ) -> tuple[str, str | None] | None:
    """The activity and person (None: not one the model knows) a recording's name says, by
    its dataset's naming, without reading it; None when no registered dataset layout names
    it (or names an activity the model does not know)."""
    from .datasets import DATASETS

    root = root if root.is_dir() else root.parent
    try:
        parts = (root.name, *path.resolve().relative_to(root.resolve()).parts)
    except ValueError:
        parts = (path.parent.name, path.name)
    activities = labels.get("activity") or []
    identities = labels.get("identity") or []
    for spec in DATASETS.values():
        try:
            parsed = spec.parse(parts)
        except Exception:  # a layout that cannot read these parts at all
            continue
        if isinstance(parsed, str) or parsed.activity not in activities:
            continue
        return parsed.activity, parsed.identity if parsed.identity in identities else None
    return None


def truth_of(path: Path, root: Path, labels: dict[str, list[str] | None]) -> Truth | None:
    """The activity and person a recording shows by its dataset's naming (:func:`label_of`)
    and how long one play of it lasts, or None where the name says nothing (or the recording
    cannot be read)."""
    from csi_edge.readers import read_recording

    label = label_of(path, root, labels)
    if label is None:
        return None
    try:
        t = read_recording(path).timestamp
    except Exception:
        return None
    step = float(np.median(np.diff(t))) if t.size > 1 else 0.02
    return Truth(label[0], label[1], float(t[-1] - t[0]) + step)


@dataclass
class _Score:
    seen: set[tuple[int, int]] = field(default_factory=set)
    right: int = 0
    total: int = 0


_EPOCHS = 1 << 16  # the wire's epoch is a u16


class TruthKeeper:
    """Posts the truth of each play of a recording as a label and keeps the per-second
    accuracy of each AP. ``truths``: per AP, the truth of each recording it replays, in the
    order it plays them."""

    def __init__(self, base: str, token: str, segment_s: float,
                 truths: dict[str, list[Truth]]) -> None:
        self.base = base
        self.token = token
        self.segment_s = segment_s
        self.truths = {name: plays for name, plays in truths.items() if plays}
        self.labelled: set[tuple[str, int]] = set()
        self.scores: dict[str, _Score] = {name: _Score() for name in self.truths}
        self.first_epoch: dict[str, int] = {}  # per AP: the epoch of its first recording

    def truth(self, name: str, epoch: int) -> Truth | None:
        """The truth of the recording an AP's epoch plays (its first epoch plays the first
        recording; the demo's spool is new, so the first epoch seen is the first sent)."""
        plays = self.truths.get(name)
        if not plays:
            return None
        first = self.first_epoch.setdefault(name, epoch)
        return plays[((epoch - first) % _EPOCHS) % len(plays)]

    def _post(self, body: dict[str, Any]) -> bool:
        request = urllib.request.Request(
            f"{self.base}/api/v1/labels", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return bool(response.status == 201)
        except (OSError, urllib.error.URLError):
            return False  # tried again with the next prediction of this pass

    def observe(self, name: str, prediction: dict[str, Any]) -> None:
        """Label the play ``prediction`` belongs to, once."""
        truth = self.truth(name, prediction["epoch"])
        if truth is None or (name, prediction["epoch"]) in self.labelled:
            return
        start = prediction["timestamp"] - prediction["seq"] * self.segment_s
        site, ap = name.split("/", 1)
        body = {"site": site, "ap": ap, "start": round(start, 3),
                "end": round(start + truth.duration_s, 3), "activity": truth.activity}
        if truth.identity is not None:
            body["identity"] = truth.identity
        if self._post(body):
            self.labelled.add((name, prediction["epoch"]))

    def count(self, name: str, predictions: list[dict[str, Any]]) -> None:
        """Add every prediction not counted yet to the AP's per-second accuracy."""
        score = self.scores.get(name)
        if score is None:
            return
        for p in predictions:
            key = (p["epoch"], p["seq"])
            truth = self.truth(name, p["epoch"])
            if key in score.seen or p.get("activity") is None or truth is None:
                continue
            score.seen.add(key)
            score.total += 1
            score.right += p["activity"] == truth.activity

    def text(self, name: str, prediction: dict[str, Any]) -> str:
        """`` truth walking ✓  right 63% of 120 s`` for the AP's demo line, or ''."""
        score = self.scores.get(name)
        truth = self.truth(name, prediction["epoch"])
        if truth is None or score is None:
            return ""
        mark = "✓" if prediction.get("activity") == truth.activity else "✗"
        share = f"{100 * score.right / score.total:.0f}%" if score.total else "—"
        return f"  truth {truth.activity} {mark}  right {share} of {score.total} s"
