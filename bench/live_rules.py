"""Rules that combine the live output's readings of one window at several context lengths,
fitted on the validation recordings and scored on the test recordings.

    python bench/live_rules.py [--data ../shared/data] [--seeds 3] [--folds 5] [--repeats 3]
                               [--lengths 1,2,4,8]

The live output (csi_cloud.model.lengths) reads each window at a few context lengths and
calibrates each reading with its own temperature (fitted here on the validation recordings,
as ``csi calibrate`` fits it). This bench asks which use of the same readings (nothing more
is classified) is best. Candidates, each a function of the calibrated readings ``rd``
(windows, lengths, activities):

- parameter-free: most confident (the bundle's rule), largest margin (top minus second
  probability), lowest entropy, majority vote of the lengths (ties and the output
  probabilities: the most confident reading voting for the winner), product of experts
  (sum of log-probabilities, renormalised), geometric mean, arithmetic mean;
- fitted: a weighted sum of log-probabilities (weights by NLL), a weighted mean of
  probabilities (simplex weights by NLL), most confident after a per-length offset on the
  confidence (coordinate search on filtered accuracy), a confidence-gated mixture (weight of
  length l ∝ exp(beta * its top probability + b_l), by NLL), and a multinomial stacking model
  over the K x L log-probabilities (L2 towards the geometric mean, ``STACK_PENALTIES``);
- fitted with the filter: the weighted geometric pool whose weights and ``stay`` are fitted
  together, by the NLL of the filtered belief (csi_cloud.model.trust.fit_pool_weights, the
  calibration's pooled option). The other rules are fitted on each second alone and get the
  grid's best ``stay`` afterwards; this one keeps its own ``stay``.

Recordings: the **validation** part of each bundle's split streamed as ``csi calibrate``
streams it (joined, seed 0, up to 3 streams; csi_cloud.model.trust) fits the rules and the
filter's ``stay`` (the grid value with the best filtered per-second accuracy there); each rule
is judged there in two ways: **in-sample** (fitted and scored on all validation recordings,
as the calibration judges its other choices) and **cross-fitted** (``--folds`` folds of the
validation recordings, ``--repeats`` times: fitted, ``stay`` included, on the other folds,
scored on the seconds of the held-out fold; for a parameter-free rule only ``stay`` is
fitted). The **test** part, streamed as bench/trust.py
streams it (joined, ``--seeds`` orders), gives each rule's live per-second accuracy raw and
after the filter at the validation ``stay``, per rate level. The test figures do not choose.

The filter here is csi_cloud.smoothing's forward filter run for every ``stay`` of its grid
at once (:func:`filtered_correct`); a check against ``filter_stream`` runs first.

Results: ``bench/results/live_rules.json`` (about 12 CPU minutes, most of it the cross-fitted
offsets and stacking).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/trust.py, also when loaded by path

from trust import shared_data  # noqa: E402  (bench/trust.py, beside this script)

from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.lengths import pool  # noqa: E402
from csi_cloud.model.temperature import apply_temperature, fit_temperature  # noqa: E402
from csi_cloud.model.trust import (  # noqa: E402
    LiveStreams,
    fit_pool_weights,
    live_streams,
    split_recordings,
)
from csi_cloud.smoothing import STAY_GRID, filter_stream  # noqa: E402
from csi_edge.bundle import EdgeEncoder  # noqa: E402

BUNDLES = {"fition": ("fition", "fition"), "wiar": ("wiar", "wiar/height_90")}
FLOOR = 1e-6  # csi_cloud.smoothing's floor on each second's evidence
STACK_PENALTIES = (0.01, 0.1, 1.0)
OFFSET_GRID = tuple(round(float(x), 2) for x in np.linspace(-0.3, 0.3, 13))

# One stream of calibrated readings: rd (N, L, K), labels (N,), starts (N,), recording (N,).
Stream = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Rule = Callable[[np.ndarray], np.ndarray]


# -- the filter, every stay at once ---------------------------------------------------------


def filtered_predictions(p: np.ndarray, starts: np.ndarray,
                         grid: tuple[float, ...] = STAY_GRID) -> np.ndarray:
    """csi_cloud.smoothing.filter_stream's argmax for each stay of ``grid``: (G, N)."""
    stays = np.asarray(grid)[:, None]
    k = p.shape[1]
    q = np.clip(p, FLOOR, None)
    out = np.empty((len(grid), len(p)), dtype=np.int64)
    belief = np.full((len(grid), k), 1.0 / k)
    for i in range(len(p)):
        prior = (np.full_like(belief, 1.0 / k) if i == 0 or starts[i]
                 else stays * belief + (1.0 - stays) / k)
        post = prior * q[i]
        belief = post / post.sum(1, keepdims=True)
        out[:, i] = belief.argmax(1)
    return out


def stays_of(rule: Rule) -> tuple[float, ...]:
    """The stays a rule is filtered at: its own where it was fitted with one, else the grid."""
    own = getattr(rule, "stay", None)
    return STAY_GRID if own is None else (float(own),)


def best_stay(streams: list[Stream], rule: Rule, mask: list[np.ndarray] | None = None
              ) -> tuple[float, float]:
    """(accuracy, stay): the best filtered per-second accuracy of ``rule`` over the
    ``mask``ed seconds of ``streams`` of its :func:`stays_of` (ties to the smaller stay, as
    fit_stay)."""
    grid = stays_of(rule)
    correct = np.zeros(len(grid))
    total = 0
    for i, (rd, y, starts, _) in enumerate(streams):
        m = np.ones(len(y), bool) if mask is None else mask[i]
        pred = filtered_predictions(rule(rd), starts, grid)
        correct += (pred[:, m] == y[m]).sum(1)
        total += int(m.sum())
    acc = correct / max(total, 1)
    j = int(np.argmax(np.round(acc, 9)))  # first maximum: the smallest stay
    return float(acc[j]), float(grid[j])


# -- the rules -------------------------------------------------------------------------------


def _pick(rd: np.ndarray, score: np.ndarray) -> np.ndarray:
    return rd[np.arange(len(rd)), score.argmax(1)]


def most_confident(rd: np.ndarray) -> np.ndarray:
    return _pick(rd, rd.max(2))


def largest_margin(rd: np.ndarray) -> np.ndarray:
    top2 = np.sort(rd, axis=2)[:, :, -2:]
    return _pick(rd, top2[:, :, 1] - top2[:, :, 0])


def lowest_entropy(rd: np.ndarray) -> np.ndarray:
    return _pick(rd, (rd * np.log(np.clip(rd, 1e-12, None))).sum(2))


def majority_vote(rd: np.ndarray) -> np.ndarray:
    k = rd.shape[2]
    votes = np.eye(k)[rd.argmax(2)].sum(1)  # (N, K)
    winner = (votes + 1e-3 * rd.max(1)).argmax(1)  # ties: the class read most confidently
    for_winner = rd.argmax(2) == winner[:, None]
    return _pick(rd, np.where(for_winner, rd.max(2), -1.0))


def weighted_logs(w: np.ndarray, rd: np.ndarray) -> np.ndarray:
    return softmax(np.einsum("l,nlk->nk", w, np.log(np.clip(rd, 1e-12, None))), 1)


def weighted_mean(a: np.ndarray, rd: np.ndarray) -> np.ndarray:
    return np.einsum("l,nlk->nk", a, rd)


def offset_confident(b: np.ndarray, rd: np.ndarray) -> np.ndarray:
    return _pick(rd, rd.max(2) + b)


def gated_mixture(theta: np.ndarray, rd: np.ndarray) -> np.ndarray:
    gate = softmax(theta[0] * rd.max(2) + theta[1:], 1)
    return np.einsum("nl,nlk->nk", gate, rd)


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def _pooled(streams: list[Stream], mask: list[np.ndarray] | None
            ) -> tuple[np.ndarray, np.ndarray]:
    keep = [np.ones(len(s[1]), bool) for s in streams] if mask is None else mask
    return (np.concatenate([s[0][m] for s, m in zip(streams, keep, strict=True)]),
            np.concatenate([s[1][m] for s, m in zip(streams, keep, strict=True)]))


def fit_weighted_logs(streams: list[Stream], mask: list[np.ndarray] | None) -> Rule:
    rd, y = _pooled(streams, mask)
    n_len = rd.shape[1]
    w = minimize(lambda w: _nll(weighted_logs(w, rd), y), np.full(n_len, 1.0 / n_len),
                 method="L-BFGS-B").x
    return lambda q: weighted_logs(w, q)


def fit_weighted_mean(streams: list[Stream], mask: list[np.ndarray] | None) -> Rule:
    rd, y = _pooled(streams, mask)
    z = minimize(lambda z: _nll(weighted_mean(softmax(z), rd), y), np.zeros(rd.shape[1]),
                 method="L-BFGS-B").x
    return lambda q: weighted_mean(softmax(z), q)


def fit_gated_mixture(streams: list[Stream], mask: list[np.ndarray] | None) -> Rule:
    rd, y = _pooled(streams, mask)
    theta = minimize(lambda t: _nll(gated_mixture(t, rd), y), np.r_[5.0, np.zeros(rd.shape[1])],
                     method="Nelder-Mead", options={"maxiter": 800}).x
    return lambda q: gated_mixture(theta, q)


def fit_offsets(streams: list[Stream], mask: list[np.ndarray] | None) -> Rule:
    """Per-length offsets on the confidence (the full length's fixed at 0), two rounds of
    coordinate search over ``OFFSET_GRID`` on filtered accuracy at the best stay."""
    n_len = streams[0][0].shape[1]
    b = np.zeros(n_len)
    best = best_stay(streams, lambda q: offset_confident(b, q), mask)[0]
    for _ in range(2):
        for length in range(n_len - 1):
            for g in OFFSET_GRID:
                trial = b.copy()
                trial[length] = g
                score = best_stay(streams, partial(offset_confident, trial), mask)[0]
                if score > best + 1e-9:
                    best, b = score, trial
    return lambda q: offset_confident(b, q)


def stacking(theta: tuple[np.ndarray, np.ndarray], rd: np.ndarray) -> np.ndarray:
    wm, bias = theta
    x = np.log(np.clip(rd, 1e-12, None)).reshape(len(rd), -1)
    return softmax(x @ wm + bias, 1)


def fit_stacking(penalty: float) -> Callable[[list[Stream], list[np.ndarray] | None], Rule]:
    """Multinomial logistic regression from the K x L log-probabilities to the K activities,
    penalised by ``penalty`` * ||wm - W0||^2 where W0 is the geometric mean of the lengths."""
    def fit(streams: list[Stream], mask: list[np.ndarray] | None) -> Rule:
        rd, y = _pooled(streams, mask)
        n, n_len, k = rd.shape
        x = np.log(np.clip(rd, 1e-12, None)).reshape(n, n_len * k)
        wm0 = np.tile(np.eye(k), (n_len, 1)) / n_len

        def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
            wm, bias = flat[:-k].reshape(n_len * k, k), flat[-k:]
            logp = log_softmax(x @ wm + bias, 1)
            grad = np.exp(logp)
            grad[np.arange(n), y] -= 1
            grad /= n
            diff = wm - wm0
            return (float(-logp[np.arange(n), y].mean() + penalty * (diff ** 2).sum()),
                    np.r_[(x.T @ grad + 2 * penalty * diff).ravel(), grad.sum(0)])

        flat = minimize(objective, np.r_[wm0.ravel(), np.zeros(k)], jac=True,
                        method="L-BFGS-B").x
        theta = (flat[:-k].reshape(n_len * k, k), flat[-k:])
        return lambda q: stacking(theta, q)
    return fit


class _WithStay:
    """A rule fitted together with the filter's stay."""

    def __init__(self, rule: Rule, stay: float) -> None:
        self.rule, self.stay = rule, stay

    def __call__(self, rd: np.ndarray) -> np.ndarray:
        return self.rule(rd)


def fit_filtered_pool(streams: list[Stream], mask: list[np.ndarray] | None) -> Rule:
    """The calibration's pooled option: weights and stay by the filtered belief's NLL over
    the ``mask``ed seconds (the filter runs through the others, unscored)."""
    pieces = []
    for i, (rd, y, _starts, _) in enumerate(streams):
        labels = y.copy()
        if mask is not None:
            labels[~mask[i]] = -1
        # as_streams makes each stream start once, at its first second
        pieces.append((np.log(np.clip(rd, FLOOR, None)).transpose(0, 2, 1), labels))
    weights, stay = fit_pool_weights(pieces)
    return _WithStay(lambda q: pool(list(q.transpose(1, 0, 2)), weights.tolist()), stay)


def _fixed(rule: Rule) -> Callable[[list[Stream], list[np.ndarray] | None], Rule]:
    return lambda streams, mask: rule


CANDIDATES: dict[str, Callable[[list[Stream], list[np.ndarray] | None], Rule]] = {
    "most confident": _fixed(most_confident),
    "largest margin": _fixed(largest_margin),
    "lowest entropy": _fixed(lowest_entropy),
    "majority vote": _fixed(majority_vote),
    "product of experts": _fixed(lambda rd: weighted_logs(np.ones(rd.shape[1]), rd)),
    "geometric mean": _fixed(lambda rd: weighted_logs(np.full(rd.shape[1], 1 / rd.shape[1]), rd)),
    "arithmetic mean": _fixed(lambda rd: rd.mean(1)),
    "weighted log-probabilities": fit_weighted_logs,
    "weighted probabilities": fit_weighted_mean,
    "most confident + offsets": fit_offsets,
    "confidence-gated mixture": fit_gated_mixture,
    **{f"stacking (penalty {lam:g})": fit_stacking(lam) for lam in STACK_PENALTIES},
    "pool fitted with the filter": fit_filtered_pool,
}
FITTED = {"weighted log-probabilities", "weighted probabilities", "most confident + offsets",
          "confidence-gated mixture", *(f"stacking (penalty {lam:g})"
                                        for lam in STACK_PENALTIES),
          "pool fitted with the filter"}


# -- the streams -----------------------------------------------------------------------------


def calibrated_readings(ls: LiveStreams, lengths: tuple[int, ...],
                        temperatures: tuple[float, ...]) -> np.ndarray:
    """(N, L, K): each length's reading with its temperature, the full window last."""
    raw = [*(ls.readings[k] for k in lengths[:-1]), ls.p_raw]
    return np.stack([apply_temperature(p, t)
                     for p, t in zip(raw, temperatures, strict=True)], 1)


def as_streams(ls: LiveStreams, lengths: tuple[int, ...], temperatures: tuple[float, ...]
               ) -> list[Stream]:
    rd = calibrated_readings(ls, lengths, temperatures)
    out = []
    for s in np.unique(ls.stream):
        m = ls.stream == s
        starts = ls.starts[m].copy()
        starts[0] = True
        out.append((rd[m], ls.labels[m], starts, ls.recording[m]))
    return out


def cross_fitted(streams: list[Stream], fit: Callable[[list[Stream], list[np.ndarray] | None],
                                                      Rule],
                 folds: int, repeats: int) -> float:
    """Mean over ``repeats`` of the out-of-fold filtered accuracy: each fold's seconds scored
    by the rule and stay fitted on the other folds' seconds (the streams stay whole, so the
    filter runs across the folds' boundaries as it does live)."""
    recordings = np.unique(np.concatenate([s[3] for s in streams]))
    scores = []
    for rep in range(repeats):
        fold_of = dict(zip(recordings.tolist(),
                           (np.random.default_rng(rep).permutation(len(recordings)) % folds)
                           .tolist(), strict=True))
        correct = total = 0
        for f in range(folds):
            held = [np.array([fold_of[r] == f for r in s[3].tolist()], bool) for s in streams]
            train = [~m for m in held]
            rule = fit(streams, train)
            _, stay = best_stay(streams, rule, train)
            for (rd, y, starts, _), m in zip(streams, held, strict=True):
                pred = filtered_predictions(rule(rd), starts, (stay,))[0]
                correct += int((pred[m] == y[m]).sum())
                total += int(m.sum())
        scores.append(correct / max(total, 1))
    return float(np.mean(scores))


def bench_bundle(name: str, dataset: str, data_dir: Path, seeds: int, folds: int,
                 repeats: int, lengths: tuple[int, ...]) -> dict[str, Any]:
    folder = ROOT / "models" / name
    model, edge = CloudModel.load(folder), EdgeEncoder(folder)
    n = model.net.cfg.context_segments
    lengths = tuple(sorted({*(k for k in lengths if k < n), n}))
    val, val_described = split_recordings(folder, dataset, data_dir, "val")
    labelled = np.arange(len(val))[val.activity >= 0]
    val_live = live_streams(model, edge, val, labelled, "joined", seed=0,
                            streams=min(3, len(labelled)), lengths=lengths)
    # Each length's temperature as csi calibrate fits it (NLL, rate levels pooled).
    y = np.concatenate([ls.labels for ls in val_live])
    temperatures = tuple(fit_temperature(np.concatenate(
        [ls.readings[k] if k != n else ls.p_raw for ls in val_live]), y) for k in lengths)
    val_streams = [s for ls in val_live for s in as_streams(ls, lengths, temperatures)]
    test, test_described = split_recordings(folder, dataset, data_dir, "test")
    recordings = np.arange(len(test))
    joined = [live_streams(model, edge, test, recordings, "joined", seed=s, lengths=lengths)
              for s in range(seeds)]
    # The all-stays filter is the service's filter.
    rd, _, starts, _ = val_streams[0]
    for j, stay in enumerate(STAY_GRID):
        assert np.array_equal(filtered_predictions(most_confident(rd), starts)[j],
                              filter_stream(most_confident(rd), stay, starts).argmax(1))
    rules: dict[str, Any] = {}
    for rule_name, fit in CANDIDATES.items():
        started = time.process_time()
        rule = fit(val_streams, None)
        in_sample, stay = best_stay(val_streams, rule)
        entry: dict[str, Any] = {"fitted": rule_name in FITTED, "stay": stay,
                                 "validation_in_sample": round(in_sample, 4)}
        entry["validation_cross_fitted"] = round(cross_fitted(val_streams, fit, folds,
                                                              repeats), 4)
        levels = []
        for level in range(len(joined[0])):
            raw, smoothed = [], []
            for order in joined:
                ls = order[level]
                p = rule(calibrated_readings(ls, lengths, temperatures))
                raw.append(float((p.argmax(1) == ls.labels).mean()))
                smoothed.append(float((filtered_predictions(p, ls.starts, (stay,))[0]
                                       == ls.labels).mean()))
            levels.append({"level": level, "raw": round(float(np.mean(raw)), 4),
                           "smoothed": round(float(np.mean(smoothed)), 4)})
        entry["test_live"] = levels
        entry["cpu_s"] = round(time.process_time() - started, 1)
        rules[rule_name] = entry
        print(f"{name} {rule_name:28s} val in-sample {in_sample:.4f} cross-fitted "
              f"{entry['validation_cross_fitted']:.4f} stay {stay:g}; test smoothed "
              + " ".join(f"{lv['smoothed']:.3f}" for lv in levels), flush=True)
    baseline = rules["most confident"]
    for key in ("validation_in_sample", "validation_cross_fitted"):
        # ties go to the bundle's rule
        winner = max(rules, key=lambda r: (rules[r][key], r == "most confident"))
        rules[winner].setdefault("wins", []).append(key)
    return {"bundle": model.id, "lengths": list(lengths),
            "temperatures": [round(float(t), 4) for t in temperatures],
            "validation": val_described, "test": test_described, "seeds": seeds,
            "folds": folds, "repeats": repeats,
            "winner": {key: next(r for r, e in rules.items() if key in e.get("wins", []))
                       for key in ("validation_in_sample", "validation_cross_fitted")},
            "test_smoothed_gain_over_most_confident": {
                r: [round(lv["smoothed"] - b["smoothed"], 4)
                    for lv, b in zip(e["test_live"], baseline["test_live"], strict=True)]
                for r, e in rules.items()},
            "rules": rules}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data())
    parser.add_argument("--seeds", type=int, default=3, help="orders of the test streams")
    parser.add_argument("--folds", type=int, default=5, help="folds of the validation "
                                                             "recordings (cross-fitted score)")
    parser.add_argument("--repeats", type=int, default=3, help="random fold assignments")
    parser.add_argument("--bundles", default="fition,wiar")
    parser.add_argument("--lengths", default="1,2,4,8",
                        help="the context lengths read (the full one is always added)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "live_rules.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    report: dict[str, Any] = {"command": "python bench/live_rules.py",
                              "machine": platform.node(), "bundles": {}}
    for name in [b for b in args.bundles.split(",") if b]:
        dataset, sub = BUNDLES[name]
        data_dir = args.data / sub
        if not data_dir.is_dir():
            report["bundles"][name] = {"skipped": f"{data_dir} is not there"}
            continue
        report["bundles"][name] = bench_bundle(
            name, dataset, data_dir, args.seeds, args.folds, args.repeats,
            tuple(int(k) for k in args.lengths.split(",") if k))
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
