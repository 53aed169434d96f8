"""What reading the transmitted profile coefficients as whole steps costs the head.

    python bench/model.py --datasets fition --protocols random --anchor-fits last \\
        --threads 2 --level0 0,16 --no-reuse \\
        --out bench/results/model_identity_neighbours.json
    python bench/exact_inputs.py [--data ../shared/data] [--out FILE]

The first command keeps the 5 fold bundles of Fition's random protocol
(``.cache/bench/bundles/fition/random-*``). For each, this script fits the context head twice on
a copy, exactly as ``csi train`` fits it (csi_cloud.model.fitting.fit_bundle_head: the fold's
training and validation recordings, seed 0, 4,000 features, short-reading lengths 1, 2, 4),
and scores the fold's test recordings as bench/model.py does:

- ``floats``: the coefficients of decoded profiles read as the projection gives them, float
  noise and all, and the features count outputs strictly above their biases (interpolated
  quantiles): the head before this version, whose outputs depend on the machine;
- ``whole_steps``: the coefficients rounded to the steps that were sent
  (csi_cloud.model.context_head.profile_coefficients' ``transmitted``), the features as
  before: this version, the same on every machine;
- ``whole_steps_ties_half``: rounded, and an output on a bias counts half, each bias one of
  the outputs (csi_cloud.model.rocket.RocketTransform's ``ties``): the expectation of what
  the noise did, without noise. Not used: it measured below ``whole_steps``.

Same network, codes, random draws and windows: only the head's inputs and ties differ.

Results: ``bench/results/exact_inputs.json`` (about 15 minutes).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _kept import kept_folds, save_folds  # noqa: E402

import csi_cloud.model.compression as compression  # noqa: E402
import csi_cloud.model.context_head as context_head  # noqa: E402
from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.evaluate import evaluate_bundle  # noqa: E402
from csi_cloud.model.fitting import fit_bundle_head  # noqa: E402
from csi_cloud.model.rocket import RocketTransform  # noqa: E402
from csi_edge.bundle import EdgeEncoder  # noqa: E402

ARMS = ("floats", "whole_steps", "whole_steps_ties_half")
KEYS = ("activity_accuracy", "activity_accuracy_per_second", "identity_accuracy",
        "identity_accuracy_per_second")


@contextlib.contextmanager
def half_ties() -> Iterator[None]:
    """Heads fitted while this is open count an output on a bias half (the transform's
    ``ties``); the fitting code calls ``RocketTransform.fit`` without it, so the classmethod
    is replaced, and put back."""
    fit = RocketTransform.fit.__func__  # type: ignore[attr-defined]

    def half(cls: type[RocketTransform], x: np.ndarray, features: int = 5000,
               max_dilations: int = 32, seed: int = 0, ties: bool = False) -> RocketTransform:
        return fit(cls, x, features, max_dilations, seed, ties=True)  # type: ignore[no-any-return]

    RocketTransform.fit = classmethod(half)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        RocketTransform.fit = classmethod(fit)  # type: ignore[assignment,method-assign]


@contextlib.contextmanager
def float_coefficients() -> Iterator[None]:
    """Every reader of decoded profiles gets the unrounded projection. The fitting code
    imports ``profile_coefficients`` from context_head when it runs and the classifier holds
    its own name for it (compression), so both names are replaced, and put back."""
    exact = context_head.profile_coefficients

    def floats(net: Any, profile: np.ndarray, *, transmitted: Any = False) -> np.ndarray:
        return exact(net, profile)

    context_head.profile_coefficients = floats  # type: ignore[assignment]
    compression.profile_coefficients = floats  # type: ignore[assignment]
    try:
        yield
    finally:
        context_head.profile_coefficients = exact  # type: ignore[assignment]
        compression.profile_coefficients = exact  # type: ignore[assignment]


def _scores(summary: dict[str, Any]) -> dict[str, list[float]]:
    return {k: [round(lv[k], 4) for lv in summary["levels"]] for k in KEYS
            if summary["levels"][0].get(k) is not None}


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args, kept, data = kept_folds(__doc__, "exact_inputs.json", argv)
    folds = []
    for folder, parts in kept:
        train, val, test = parts["train"], parts["val"], parts["test"]
        row: dict[str, Any] = {"bundle": folder.name, "test_recordings": len(test)}
        for arm in ARMS:
            with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
                copy = Path(tmp) / "bundle"
                shutil.copytree(folder, copy)
                if arm == "floats":
                    stack.enter_context(float_coefficients())
                if arm == "whole_steps_ties_half":
                    stack.enter_context(half_ties())
                fit_bundle_head(copy, data, train, val, features=4000, seed=0,
                                lengths=[1, 2, 4])
                row[arm] = _scores(evaluate_bundle(CloudModel.load(copy), EdgeEncoder(copy),
                                                   data, test).summary)
        folds.append(row)
        print(f"{folder.name}: level 0 activity " + ", ".join(
            f"{arm} {row[arm]['activity_accuracy'][0]:.3f}" for arm in ARMS), flush=True)
    save_folds("exact_inputs.py", args, folds,
               {arm: {k: np.round(np.mean([f[arm][k] for f in folds], axis=0), 4).tolist()
                      for k in folds[0][arm]} for arm in ARMS}, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
