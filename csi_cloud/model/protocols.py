"""Evaluation protocols shared by ``csi train --protocols`` and bench/model.py.

- ``random``: k-fold by recording (stratified by activity, seeded); a slice of each training
  fold is held out for early stopping.
- ``cross-session`` (Fition): train on one user of a room, test on the other user recorded in
  the same physical room (user1<->user2, user3<->user4), both directions: activity only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from csi_edge.bundle import EdgeEncoder

from ..datasets import Example, cross_session_splits, kfold
from .compression import CloudModel
from .data import SegmentData
from .evaluate import evaluate_bundle
from .fitting import fit
from .train import TrainOptions

__all__ = ["aggregate", "run_protocols", "split_tasks"]


def _positions(data: SegmentData, examples: Sequence[Example]) -> np.ndarray:
    position = {id(e): i for i, e in enumerate(data.examples)}
    return np.array([position[id(e)] for e in examples if id(e) in position], dtype=np.int64)


def split_tasks(data: SegmentData, protocol: str, folds: int, seed: int
                ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, train, val, test) recording positions for one protocol and seed."""
    rng = np.random.default_rng(seed)
    tasks = []
    if protocol == "random":
        for i, (tr, te) in enumerate(kfold(data.examples, folds, seed)):
            train_recs = rng.permutation(_positions(data, tr))
            n_val = max(1, len(train_recs) // 8)
            tasks.append((f"fold{i}", train_recs[n_val:], train_recs[:n_val],
                          _positions(data, te)))
    elif protocol == "cross-session":
        for name, tr, te in cross_session_splits(data.examples):
            train_recs = rng.permutation(_positions(data, tr))
            n_val = max(1, len(train_recs) // 6)
            tasks.append((name, train_recs[n_val:], train_recs[:n_val], _positions(data, te)))
    else:
        raise ValueError(f"unknown protocol {protocol!r}; known: random, cross-session")
    return tasks


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and std of every numeric key present in all runs."""
    out: dict[str, dict[str, float]] = {}
    for key in runs[0]:
        values = [v for r in runs
                  if isinstance(v := r.get(key), int | float) and not isinstance(v, bool)]
        if len(values) == len(runs):
            out[key] = {"mean": round(float(np.mean(values)), 4),
                        "std": round(float(np.std(values)), 4)}
    return out


def run_protocols(data: SegmentData, spec: Any, activities: list[str], identities: list[str],
                  protocols: list[str], opts: TrainOptions, *, folds: int = 5, seeds: int = 1,
                  model: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train and evaluate our model under each protocol; per-level means over tasks x seeds."""
    results: dict[str, Any] = {}
    for protocol in protocols:
        use_identity = protocol == "random" and bool(identities)
        runs: list[dict[str, Any]] = []
        per_task: dict[str, list[dict[str, Any]]] = {}
        for seed in range(seeds):
            seed_opts = opts.model_copy(update={"seed": seed})
            for name, tr, va, te in split_tasks(data, protocol, folds, seed):
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "bundle"
                    fit(data, spec, activities, identities if use_identity else [], tr, va,
                        seed_opts, out, name=f"{protocol}-{name}", model=model)
                    summary = evaluate_bundle(CloudModel.load(out), EdgeEncoder(out), data,
                                              te).summary
                runs.append(summary)
                per_task.setdefault(name, []).append(summary["levels"][0])
                if log:
                    log(f"{protocol} seed {seed} {name}: level-0 activity "
                        f"{summary['levels'][0]['activity_accuracy']:.3f}")
        levels = list(zip(*[r["levels"] for r in runs], strict=True))
        results[protocol] = {
            "tasks": len(runs),
            "seeds": seeds,
            "levels": [{**aggregate(list(rows)), "level": i} for i, rows in enumerate(levels)],
            "unquantized": aggregate([r["unquantized"] for r in runs]),
            "per_task_level0": {k: aggregate(v) for k, v in per_task.items()},
        }
    return results
