"""The truth of a labelled replay, for ``csi demo``: what each AP's recording shows (from the
dataset's file names, e.g. ``walking_user1_rm1_10.pcap``), posted as a label over each pass of
the replay (``POST /api/v1/labels``) so the dashboard shows it beside the predictions, and a
running per-second accuracy for the demo's own lines.

Each pass of a looping replay is its own epoch (the demo runs the edge with
``loop_new_epoch``), starting at seq 0, so a pass's range on the AP's clock is known from any
of its predictions: it starts ``seq`` segments before that one and lasts the recording.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Truth", "TruthKeeper", "truth_of"]


@dataclass(frozen=True)
class Truth:
    activity: str | None
    identity: str | None
    duration_s: float  # one pass of the recording, as the edge replays it


def truth_of(path: Path, root: Path, labels: dict[str, list[str] | None]) -> Truth | None:
    """The activity and person a recording shows by its dataset's naming, or None when no
    registered dataset layout names it (or names an activity the model does not know)."""
    from csi_edge.readers import read_recording

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
        try:
            t = read_recording(path).timestamp
        except Exception:
            return None
        step = float(np.median(np.diff(t))) if t.size > 1 else 0.02
        identity = parsed.identity if parsed.identity in identities else None
        return Truth(parsed.activity, identity, float(t[-1] - t[0]) + step)
    return None


@dataclass
class _Score:
    seen: set[tuple[int, int]] = field(default_factory=set)
    right: int = 0
    total: int = 0


class TruthKeeper:
    """Posts each pass's truth as a label and keeps the per-second accuracy of each AP."""

    def __init__(self, base: str, token: str, segment_s: float,
                 truths: dict[str, Truth]) -> None:
        self.base = base
        self.token = token
        self.segment_s = segment_s
        self.truths = truths
        self.labelled: set[tuple[str, int]] = set()
        self.scores: dict[str, _Score] = {name: _Score() for name in truths}

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
        """Label the pass ``prediction`` belongs to, once."""
        truth = self.truths.get(name)
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
        truth, score = self.truths.get(name), self.scores.get(name)
        if truth is None or score is None:
            return
        for p in predictions:
            key = (p["epoch"], p["seq"])
            if key in score.seen or p.get("activity") is None:
                continue
            score.seen.add(key)
            score.total += 1
            score.right += p["activity"] == truth.activity

    def text(self, name: str, prediction: dict[str, Any]) -> str:
        """`` truth walking ✓  right 63% of 120 s`` for the AP's demo line, or ''."""
        truth, score = self.truths.get(name), self.scores.get(name)
        if truth is None or score is None:
            return ""
        mark = "✓" if prediction.get("activity") == truth.activity else "✗"
        share = f"{100 * score.right / score.total:.0f}%" if score.total else "—"
        return f"  truth {truth.activity} {mark}  right {share} of {score.total} s"
