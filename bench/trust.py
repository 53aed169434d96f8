"""Live output a person can trust: per-second activity accuracy raw vs smoothed, calibration,
and the coverage-accuracy curve of abstention, for each shipped bundle.

    python bench/trust.py [--data ../shared/data] [--seeds 3] [--out FILE] [--no-report]

Everything runs through the service's own code: the int8 edge encoder, the wire payloads
decoded from their bytes (csi_cloud.model.evaluate), the bundle's classifier read at its
context lengths with their temperatures (csi_cloud.model.lengths, the service's
``CloudModel.classify_live``) and the HMM filter with the bundle's ``stay`` and
abstention threshold (csi_cloud.smoothing), all read from ``models/NAME/bundle.json``.

Recordings: the **test** part of the split each bundle was trained with (rebuilt from its
manifest and checked against its counts): neither its weights nor its calibration saw them
(``csi train``, or ``csi calibrate`` later, fitted the temperatures, context lengths,
``stay`` and threshold on the validation part).
Two ways to stream them (csi_cloud.model.trust):

- ``separate``: each recording its own stream, context and filter starting afresh (the model
  report's per-second figure);
- ``joined`` (**live**): the test recordings end to end on one AP's segment grid in a random
  order (``--seeds`` orders), so the model's context and the filter run across every change
  of activity, as they do when a person changes activity in front of an AP. Each second is
  labelled by its recording.

Per rate level: per-recording accuracy (the window ending at each recording's last segment,
at the full context: the model report's figure; and by the live output), per-second accuracy
raw (the full context alone, and the live output, which reads each window at the bundle's
context lengths: csi_cloud.model.lengths) and smoothed, label changes per minute
(raw, smoothed, true), NLL and expected calibration error before and after the temperature,
the accuracy of the filter at each ``stay`` of a grid (to show the trade-off), and the
coverage-accuracy curve of abstaining below a threshold on the smoothed confidence (the
bundle's own threshold marked), and the accuracy of each second's label given 0-3 s late
(``lag_sweep``: the same filter, settled on the seconds after it, as the service's event
timeline is, ``DEFAULT_SETTLE_S`` late). Target: live per-second accuracy after smoothing
>= per-recording accuracy - 0.05, judged per level, on ``joined``: for the live label
(``met``) and for the event timeline (``settled_met``).

The committed samples (``datasets/samples``) are scored too, in ``separate`` mode, with
the part of the split each belongs to: they were chosen before this split and most are
training recordings, so their numbers say the pipeline runs, not how well it generalises.

Results: ``bench/results/trust.json``; the tables are rendered into each bundle's
``report.md`` from that file (between ``<!-- trust:begin -->`` and ``<!-- trust:end -->``).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import put_bundle_sections, save_results  # noqa: E402

from csi_cloud.datasets import index_dataset, random_split  # noqa: E402
from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.data import SegmentData, load_segments  # noqa: E402
from csi_cloud.model.lengths import ContextLengths  # noqa: E402
from csi_cloud.model.temperature import (  # noqa: E402
    expected_calibration_error,
    mean_nll,
)
from csi_cloud.model.trust import LiveStreams, live_streams, split_recordings  # noqa: E402
from csi_cloud.smoothing import (  # noqa: E402
    DEFAULT_SETTLE_S,
    STAY_GRID,
    TrustParams,
    coverage_curve,
    filter_stream,
    fixed_lag,
)
from csi_edge.bundle import EdgeEncoder  # noqa: E402

BUNDLES = {"fition": ("fition", "fition"), "wiar": ("wiar", "wiar/height_90")}
BEGIN, END = "<!-- trust:begin -->", "<!-- trust:end -->"
MARGIN = 0.05
# Seconds the smoothed label may be given late (bench only: how much a latency would buy).
LAGS = (0, 1, 2, 3)
POSITIONS = 9  # seconds into a recording reported one by one (0-7), then 8 and later pooled


def settle_lag(segment_s: float) -> int:
    """The segments the service's event timeline waits for (csi_cloud.smoothing.Smoother)."""
    return math.ceil(DEFAULT_SETTLE_S / segment_s - 1e-9)


def _changes_per_min(labels: np.ndarray, starts: np.ndarray, segment_s: float) -> float:
    changed = (labels[1:] != labels[:-1]) & ~starts[1:]
    return float(changed.sum() / (len(labels) * segment_s / 60))


def _by_position(position: np.ndarray, raw: np.ndarray, smoothed: np.ndarray
                 ) -> dict[str, dict[str, float]]:
    """Raw and smoothed accuracy and share of the seconds, by how many seconds into its
    recording each second is (the last bucket pools every later second)."""
    out = {}
    for k in range(POSITIONS):
        rows = position == k if k < POSITIONS - 1 else position >= k
        if rows.any():
            out[str(k) if k < POSITIONS - 1 else f"{k}+"] = {
                "share": round(float(rows.mean()), 4),
                "raw": round(float(raw[rows].mean()), 4),
                "smoothed": round(float(smoothed[rows].mean()), 4)}
    return out


def _score(ls: LiveStreams, lengths: ContextLengths, params: TrustParams,
           segment_s: float) -> dict[str, Any]:
    p, p_uncal = ls.live(lengths), ls.live(lengths, calibrated=False)
    belief = filter_stream(p, params.stay, ls.starts)
    raw_pred, smooth_pred = p.argmax(1), belief.argmax(1)
    correct = smooth_pred == ls.labels
    confidence = belief.max(1)
    answered = confidence >= params.threshold
    return {
        "seconds": len(ls.labels),
        "raw_accuracy": round(float((raw_pred == ls.labels).mean()), 4),
        "full_context_raw_accuracy": round(float((ls.p_raw.argmax(1) == ls.labels).mean()), 4),
        "smoothed_accuracy": round(float(correct.mean()), 4),
        "changes_per_min": {
            "raw": round(_changes_per_min(raw_pred, ls.starts, segment_s), 2),
            "smoothed": round(_changes_per_min(smooth_pred, ls.starts, segment_s), 2),
            "true": round(_changes_per_min(ls.labels, ls.starts, segment_s), 2)},
        # The smoothed belief's confidence is the one the dashboard shows.
        "nll": {"raw": round(mean_nll(p_uncal, ls.labels), 4),
                "calibrated": round(mean_nll(p, ls.labels), 4),
                "smoothed": round(mean_nll(belief, ls.labels), 4)},
        "ece": {"raw": round(expected_calibration_error(p_uncal, ls.labels), 4),
                "calibrated": round(expected_calibration_error(p, ls.labels), 4),
                "smoothed": round(expected_calibration_error(belief, ls.labels), 4)},
        "stay_sweep": {f"{s:g}": round(float((filter_stream(p, s, ls.starts).argmax(1)
                                              == ls.labels).mean()), 4) for s in STAY_GRID},
        "lag_sweep": {str(lag): round(float((fixed_lag(p, params.stay, lag, ls.starts)
                                             .argmax(1) == ls.labels).mean()), 4)
                      for lag in sorted({*LAGS, settle_lag(segment_s)})},
        "abstention": {"threshold": params.threshold,
                       "coverage": round(float(answered.mean()), 4),
                       "accuracy_answered": (round(float(correct[answered].mean()), 4)
                                             if answered.any() else None)},
        "by_position": _by_position(ls.position(), raw_pred == ls.labels, correct),
        "coverage_curve": [{k: (round(v, 4) if isinstance(v, float) else v)
                            for k, v in row.items()}
                           for row in coverage_curve(confidence, correct)],
    }


def _per_recording(ls: LiveStreams, p: np.ndarray) -> float:
    """Accuracy of the window ending at each recording's last segment (separate streams) of
    the probabilities ``p`` (one row a second)."""
    last = np.r_[ls.starts[1:], True]
    return round(float((p[last].argmax(1) == ls.labels[last]).mean()), 4)


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return round(float(np.mean([r[key] for r in rows])), 4)


def bench_bundle(name: str, dataset: str, data_dir: Path, seeds: int, *,
                 folder: Path | None = None,
                 part: Literal["train", "val", "test"] = "test",
                 loaded: tuple[SegmentData, np.ndarray, str] | None = None) -> dict[str, Any]:
    """The live-output figures of the bundle ``folder`` (default ``models/NAME``) on one part
    of its split (default the test recordings; bench/head_lengths.py also scores the
    validation part, which chose its calibration), or on ``loaded`` (data, recordings,
    description) when the caller has them."""
    folder = ROOT / "models" / name if folder is None else folder
    model, edge = CloudModel.load(folder), EdgeEncoder(folder)
    params = TrustParams.from_calibration(model.manifest.calibration)
    segment_s = model.manifest.input_spec.segment_s
    if loaded is None:
        data, described = split_recordings(folder, dataset, data_dir, part)
        recordings = np.arange(len(data))
    else:
        data, recordings, described = loaded
    separate = live_streams(model, edge, data, recordings, "separate")
    joined = [live_streams(model, edge, data, recordings, "joined", seed=s)
              for s in range(seeds)]
    levels = []
    for i, sep in enumerate(separate):
        per_recording = _per_recording(sep, sep.p_raw)
        live_runs = [_score(j[i], model.lengths, params, segment_s) for j in joined]
        live = {**live_runs[0], "raw_accuracy": _mean(live_runs, "raw_accuracy"),
                "full_context_raw_accuracy": _mean(live_runs, "full_context_raw_accuracy"),
                "smoothed_accuracy": _mean(live_runs, "smoothed_accuracy"),
                "smoothed_accuracy_by_seed": [r["smoothed_accuracy"] for r in live_runs],
                "stay_sweep": {k: round(float(np.mean([r["stay_sweep"][k]
                                                       for r in live_runs])), 4)
                               for k in live_runs[0]["stay_sweep"]},
                "lag_sweep": {k: round(float(np.mean([r["lag_sweep"][k] for r in live_runs])),
                                       4) for k in live_runs[0]["lag_sweep"]},
                "by_position": {k: {m: round(float(np.mean([r["by_position"][k][m]
                                                            for r in live_runs])), 4)
                                    for m in row}
                                for k, row in live_runs[0]["by_position"].items()}}
        target = round(per_recording - MARGIN, 4)
        settled = live["lag_sweep"][str(settle_lag(segment_s))]
        levels.append({
            "level": sep.level,
            "per_recording_accuracy": per_recording,
            "per_recording_accuracy_live": _per_recording(sep, sep.live(model.lengths)),
            "separate": _score(sep, model.lengths, params, segment_s),
            "live": live,
            "target": {"live_smoothed_min": target,
                       "met": bool(live["smoothed_accuracy"] >= target),
                       "margin": round(live["smoothed_accuracy"] - target, 4),
                       # The event timeline: the same filter, each label settled
                       # DEFAULT_SETTLE_S late (csi_cloud.smoothing.Smoother).
                       "settled_s": DEFAULT_SETTLE_S, "settled": settled,
                       "settled_met": bool(settled >= target),
                       "settled_margin": round(settled - target, 4)},
        })
    # Diagnostic: how each length alone follows the changes (live, level 1, first order,
    # raw); scored on the test recordings, so it informs, it does not choose.
    n = model.net.cfg.context_segments
    sweep = live_streams(model, edge, data, recordings, "joined", levels=[1],
                         lengths=range(1, n))[0]
    context_sweep = {str(k): round(float(((sweep.readings[k] if k < n else sweep.p_raw)
                                          .argmax(1) == sweep.labels).mean()), 4)
                     for k in range(1, n + 1)}
    return {"bundle": model.id, "name": name, "recordings": described,
            "live_context_sweep_level1": context_sweep,
            "contexts": model.lengths.as_calibration(),
            "test_recordings": len(recordings), "temperature": model.temperature,
            "stay": params.stay, "threshold": params.threshold,
            "calibration": {k: v for k, v in (model.manifest.calibration.get("activity")
                                              or {}).items() if k != "stay_accuracy"},
            "seeds": seeds, "levels": levels}


def bench_samples(name: str, dataset: str, data_dir: Path | None) -> dict[str, Any]:
    """The committed samples, separate streams, with their part of the bundle's split."""
    folder = ROOT / "models" / name
    model, edge = CloudModel.load(folder), EdgeEncoder(folder)
    params = TrustParams.from_calibration(model.manifest.calibration)
    samples = list(index_dataset(dataset, ROOT / "datasets" / "samples" / name))
    part_of: dict[str, str] = {}
    if data_dir is not None:
        training = model.manifest.training
        split = random_split(list(index_dataset(dataset, data_dir)),
                             seed=int(training["seed"]), val=0.15, test=0.15)
        for part in ("train", "val", "test"):
            part_of.update({e.recording_id: part for e in getattr(split, part)})
    labels = model.manifest.labels
    data = load_segments(samples, model.manifest.input_spec, list(labels["activity"] or []),
                         list(labels["identity"] or []))
    sep = live_streams(model, edge, data, np.arange(len(data)), "separate",
                       levels=[1])[0]
    scored = _score(sep, model.lengths, params, model.manifest.input_spec.segment_s)
    return {"recordings": len(data),
            "parts": {p: sum(1 for e in data.examples if part_of.get(e.recording_id) == p)
                      for p in ("train", "val", "test", "unknown")} if part_of else
            {"unknown": len(data)},
            "level": 1, "per_recording_accuracy": _per_recording(sep, sep.p_raw),
            "raw_accuracy": scored["raw_accuracy"],
            "smoothed_accuracy": scored["smoothed_accuracy"],
            "note": "mostly training recordings of the bundle: not a held-out figure"}


def _lengths(result: dict[str, Any]) -> str:
    contexts = result["contexts"]
    read = "{" + ", ".join(map(str, contexts["lengths"])) + "}"
    if contexts.get("weights"):
        return (f"{read}, pooled with weights {{"
                + ", ".join(f"{w:g}" for w in contexts["weights"])
                + "} (each reading with its temperature, then their weighted geometric pool "
                  "per second, the weights fitted with the filter's stay")
    return f"{read} (each with its temperature, the most confident per second"


def _sets(cal: dict[str, Any]) -> str:
    return ", ".join(f"{{{k}}} {v:.3f}" for k, v in (cal.get("contexts_accuracy") or {}).items()
                     ) or "-"


def render(result: dict[str, Any]) -> str:
    """The section of one bundle's report.md, from the results file's entry."""
    cal = result["calibration"]
    lines = [
        "## Live output: calibration, smoothing, abstention (bench/trust.py)", "",
        f"`python bench/trust.py` (results in `bench/results/trust.json`). Calibration "
        f"(`csi train` or `csi calibrate`) fitted on the {cal.get('fitted_on', '?')}: "
        f"temperature "
        f"{result['temperature']:.3f} (NLL {cal.get('nll_before')} → {cal.get('nll_after')}, "
        f"ECE {cal.get('ece_before')} → {cal.get('ece_after')} there), context lengths read "
        f"{_lengths(result)}: "
        f"csi_cloud.model.lengths; filtered per-second accuracy there of each candidate set: "
        f"{_sets(cal)}), filter stay "
        f"{result['stay']:g}, abstention threshold {result['threshold']:g} (the lowest whose "
        f"answered seconds reach {cal.get('target_accuracy')} accuracy there). Scored on the "
        f"{result['recordings']}: **live** = the test recordings end to end on one AP in a "
        f"random order ({result['seeds']} orders), the model's context and the filter running "
        "across every change; **separate** = each recording its own stream (the per-second "
        "figure above). Target: live smoothed per-second accuracy ≥ per-recording - 0.05.", "",
        "Per recording: the window ending at each recording's last segment, read at the full "
        "context (the model report's figure, the target's base) and by the live output. Live "
        "raw: the full context alone, and the live output before the filter. Live NLL and ECE: "
        "raw = before the temperatures (where the readings are pooled, the same pool of the "
        "uncalibrated readings), calibrated = the live output before the filter, smoothed = "
        "the filtered belief, whose confidence the dashboard shows.", "",
        "| level | per recording full / live | separate raw | separate smoothed | live raw "
        "full / live | live smoothed | target | met (margin) | changes/min live raw / "
        "smoothed / true | live NLL raw → calibrated → smoothed | live ECE raw → calibrated "
        "→ smoothed |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lv in result["levels"]:
        live, sep, tgt = lv["live"], lv["separate"], lv["target"]
        ch = live["changes_per_min"]
        lines.append(
            f"| {lv['level']} | {lv['per_recording_accuracy']:.3f} / "
            f"{lv['per_recording_accuracy_live']:.3f} | "
            f"{sep['raw_accuracy']:.3f} | {sep['smoothed_accuracy']:.3f} | "
            f"{live['full_context_raw_accuracy']:.3f} / {live['raw_accuracy']:.3f} | "
            f"{live['smoothed_accuracy']:.3f} | "
            f"{tgt['live_smoothed_min']:.3f} | {'met' if tgt['met'] else 'missed'} "
            f"({tgt['margin']:+.3f}) | {ch['raw']:.1f} / {ch['smoothed']:.1f} / "
            f"{ch['true']:.1f} | {live['nll']['raw']:.3f} → {live['nll']['calibrated']:.3f} "
            f"→ {live['nll']['smoothed']:.3f} | {live['ece']['raw']:.3f} → "
            f"{live['ece']['calibrated']:.3f} → {live['ece']['smoothed']:.3f} |")
    lags = result["levels"][0]["live"]["lag_sweep"]
    lines += ["", f"Live smoothed accuracy with each second's label given later, settled on "
              f"the seconds after it (the same filter and stay, csi_cloud.smoothing.fixed_lag;"
              f" mean over orders). The event timeline is given "
              f"{result['levels'][0]['target']['settled_s']:g} s late "
              f"(`CSI_CLOUD_EVENTS_SETTLE_S`); the live label at once (0 s):", "",
              "| level | " + " | ".join(f"{k} s late" for k in lags)
              + " | target | timeline met (margin) |",
              "|---|" + "---|" * len(lags) + "---|---|"]
    for lv in result["levels"]:
        tgt = lv["target"]
        lines.append(f"| {lv['level']} | " + " | ".join(
            f"{v:.3f}" for v in lv["live"]["lag_sweep"].values())
            + f" | {tgt['live_smoothed_min']:.3f} | "
            f"{'met' if tgt['settled_met'] else 'missed'} ({tgt['settled_margin']:+.3f}) |")
    lines += ["", "Live smoothed accuracy at each filter stay (mean over orders; the "
              "bundle's stay is the best on its validation recordings):", "",
              "| level | " + " | ".join(result["levels"][0]["live"]["stay_sweep"]) + " |",
              "|---|" + "---|" * len(result["levels"][0]["live"]["stay_sweep"])]
    for lv in result["levels"]:
        lines.append(f"| {lv['level']} | " + " | ".join(
            f"{v:.3f}" for v in lv["live"]["stay_sweep"].values()) + " |")
    lines += ["", "Live accuracy by seconds into the recording (mean over orders; second 0 "
              "is the first after the change of recording, so of activity; the share of the "
              "seconds each column holds in brackets), raw / smoothed:", "",
              "| level | " + " | ".join(
                  f"{k} s ({row['share']:.0%})" for k, row in
                  result["levels"][0]["live"]["by_position"].items()) + " |",
              "|---|" + "---|" * len(result["levels"][0]["live"]["by_position"])]
    for lv in result["levels"]:
        lines.append(f"| {lv['level']} | " + " | ".join(
            f"{row['raw']:.2f} / {row['smoothed']:.2f}"
            for row in lv["live"]["by_position"].values()) + " |")
    lines += ["", "Abstention, live (first order): answered share and accuracy on the answered "
              "seconds when `uncertain` is shown below each threshold of the smoothed "
              "confidence:", "",
              "| level | bundle's threshold: coverage / accuracy | " + " | ".join(
                  f"≥{row['threshold']:.2f}" for row in
                  result["levels"][0]["live"]["coverage_curve"][::2]) + " |",
              "|---|---|" + "---|" * len(result["levels"][0]["live"]["coverage_curve"][::2])]
    for lv in result["levels"]:
        ab = lv["live"]["abstention"]
        acc = "-" if ab["accuracy_answered"] is None else f"{ab['accuracy_answered']:.3f}"
        cells = [f"{r['coverage']:.2f} / " + ("-" if r["accuracy"] is None else
                                              f"{r['accuracy']:.2f}")
                 for r in lv["live"]["coverage_curve"][::2]]
        lines.append(f"| {lv['level']} | {ab['coverage']:.3f} / {acc} | " + " | ".join(cells)
                     + " |")
    sweep = result.get("live_context_sweep_level1")
    if sweep:
        lines += ["", "Live raw accuracy at level 1 (first order) when the classifier reads only "
                  "the last k segments of its context, each length alone (a diagnostic on the "
                  "test recordings, not a setting): "
                  + ", ".join(f"k={k}: {v:.3f}" for k, v in sweep.items()) + "."]
    samples = result.get("samples")
    if samples:
        lines += ["", f"Committed samples ({samples['recordings']} recordings; split parts "
                  f"{samples['parts']}), level 1, separate: per recording "
                  f"{samples['per_recording_accuracy']:.3f}, per second raw "
                  f"{samples['raw_accuracy']:.3f}, smoothed {samples['smoothed_accuracy']:.3f}"
                  f" ({samples['note']})."]
    return "\n".join(lines)


def write_sections(report: dict[str, Any]) -> list[str]:
    return put_bundle_sections(report["bundles"], BEGIN, END,
                               lambda _name, result: render(dict(result)), "levels")


def shared_data() -> Path:
    """The shared recordings beside the checkout (or beside a worktree's parent folder)."""
    return next((p for p in (ROOT.parent / "shared" / "data",
                             ROOT.parents[1] / "shared" / "data") if p.is_dir()),
                ROOT.parent / "shared" / "data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data())
    parser.add_argument("--seeds", type=int, default=3, help="orders of the live streams")
    parser.add_argument("--bundles", default="fition,wiar")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trust.json")
    parser.add_argument("--no-report", action="store_true",
                        help="do not write the sections into models/*/report.md")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    report: dict[str, Any] = {"command": "python bench/trust.py", "machine": platform.node(),
                              "margin": MARGIN, "bundles": {}}
    for name in [b for b in args.bundles.split(",") if b]:
        dataset, sub = BUNDLES[name]
        data_dir = args.data / sub
        entry: dict[str, Any]
        if data_dir.is_dir():
            entry = bench_bundle(name, dataset, data_dir, args.seeds)
        else:
            entry = {"skipped": f"{data_dir} is not there: no held-out recordings"}
        entry["samples"] = bench_samples(name, dataset, data_dir if data_dir.is_dir() else None)
        report["bundles"][name] = entry
        for lv in entry.get("levels", []):
            print(f"{name} level {lv['level']}: per recording {lv['per_recording_accuracy']:.3f}"
                  f", live raw {lv['live']['raw_accuracy']:.3f} smoothed "
                  f"{lv['live']['smoothed_accuracy']:.3f} (target "
                  f"{lv['target']['live_smoothed_min']:.3f}: "
                  f"{'met' if lv['target']['met'] else 'missed'}, "
                  f"{lv['target']['margin']:+.3f}); separate raw "
                  f"{lv['separate']['raw_accuracy']:.3f} smoothed "
                  f"{lv['separate']['smoothed_accuracy']:.3f}; event timeline "
                  f"{lv['target']['settled_s']:g} s late {lv['target']['settled']:.3f} "
                  f"({'met' if lv['target']['settled_met'] else 'missed'}, "
                  f"{lv['target']['settled_margin']:+.3f})", flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    save_results(report, args.out, None if args.no_report else write_sections)


if __name__ == "__main__":
    main()
