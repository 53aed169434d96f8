"""Ablation of the cloud classifier, one change at a time, on the k-fold bundles of
bench/model.py (run it first with ``--keep-bundles``).

    python bench/ablation.py [--datasets wiar,fition] [--seeds 3]

For every kept bundle (random k-fold; Fition cross-session directions too) the int8 edge codes
of every recording are decoded once; each variant then refits only the cloud head on the
task's training recordings and scores its test recordings (per recording and per second); for
the cross-session bundles also after adapting on 5 recordings per activity of the new session
(3 draws). Variants (the base: level-0 codes, split profile/latent transforms, 4,000
features, 8-segment context, differences on):

- what the head reads: profile only, latent only, both in one transform;
- latent channels and profile coefficients at the lowest level (the nested codes of the
  top level give every combination without retraining), level 1's layout among them;
- context length: 2, 4 segments;
- feature count: 1,000 and 10,000; no first-difference channels;
- the network's own context classifier (the earlier head) at level 0;
- a complete-window activity layer beside the base's (fitted on the windows whose every slot
  is present; it reads those);
- head seeds (``--seeds`` random-kernel draws of the base), or every variant under
  ``--variant-seeds`` head seeds (its row then aggregates tasks x seeds).

``--protocols`` keeps the kept bundles of some protocols only (e.g. ``cross-session``).

Results: bench/results/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import put_section  # noqa: E402

from csi_cloud.model.adapt import _accuracy, pick_support  # noqa: E402
from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.context_head import (  # noqa: E402
    ContextHead,
    fit_context_head,
    profile_coefficients,
)
from csi_cloud.model.data import segment_windows  # noqa: E402
from csi_cloud.model.fitting import _complete_windows, _some_windows  # noqa: E402
from csi_cloud.model.heads import codes_from_segments  # noqa: E402
from csi_cloud.model.pipeline import prepare  # noqa: E402
from csi_cloud.model.protocols import aggregate  # noqa: E402
from csi_cloud.model.rocket import WindowLayout, series  # noqa: E402
from csi_cloud.model.window import take  # noqa: E402
from csi_edge.bundle import EdgeEncoder, SegmentCodes, encode_message_codes  # noqa: E402
from csi_edge.codec import payload_size  # noqa: E402

BUNDLES = ROOT / ".cache" / "bench" / "bundles"
DEFAULT_OUT = ROOT / "bench" / "results" / "ablation.json"
DATA = {"fition": "fition", "wiar": "wiar/height_90"}


def variants(cfg: Any, seeds: int) -> dict[str, dict[str, Any]]:
    d0, k0 = cfg.level_channels[0], cfg.profile_components[0]
    base = {"latent": d0, "profile": k0, "context": cfg.context_segments, "features": 4000,
            "split": True, "diff": True, "mean": True, "seed": 0, "per_recording": 5}
    out = {"base": base}
    out |= {
        "profile only": {**base, "latent": 0},
        "latent only, all 16 channels (the earlier activity input)": {
            **base, "profile": 0, "latent": cfg.latent_channels},
        "2 latent + 4 profile (the earlier level 0)": {**base, "latent": 2, "profile": 4},
        "network context classifier (the earlier head)": {**base, "network": True},
        "context 2 segments": {**base, "context": 2},
        "context 4 segments": {**base, "context": 4},
        "0 latent + 16 profile": {**base, "latent": 0, "profile": 16},
        "1 latent + 16 profile": {**base, "profile": 16},
        "2 latent + 12 profile": {**base, "latent": 2, "profile": 12},
        "4 latent + 16 profile (level 1's codes)": {**base, "latent": 4, "profile": 16},
        "latent only, level 0": {**base, "profile": 0},
        "one transform for both": {**base, "split": False},
        "no difference channels": {**base, "diff": False},
        "1,000 features": {**base, "features": 1000},
        "10,000 features": {**base, "features": 10000},
        "no window mean of the profile (the earlier head)": {**base, "mean": False},
        # The windows the activity layer is fitted on (and its penalty chosen on): each
        # recording's last window alone, the one a per-recording score reads, instead of it
        # and 4 other windows the service classifies.
        "fitted on each recording's last window": {**base, "per_recording": 1},
        # Beside the base's activity layer, a layer of its own for the windows whose every
        # slot is present, fitted on every such training window (TrainOptions.head_complete).
        "a complete-window layer beside": {**base, "complete": True},
    }
    out |= {f"base, head seed {s}": {**base, "seed": s} for s in range(1, seeds)}
    return out


def _windows(codes: Any, coeff: np.ndarray, rows: np.ndarray, v: dict[str, Any]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = rows[:, -v["context"]:]
    top = codes.z_q.shape[0] - 1  # the top level's codes hold every channel (nested)
    return take(rows, codes.z_q[top]), take(rows, coeff[top]), rows >= 0


def fit_variant(codes: Any, coeff: np.ndarray, train: np.ndarray, val: np.ndarray,
                v: dict[str, Any], n_act: int, n_id: int = 0) -> ContextHead:
    """The variant's head on the training recordings' windows; with ``n_id`` identities an
    identity layer too, as the bundle's head has (split and custom variants: activity only)."""
    rng = np.random.default_rng(v["seed"])
    rows_tr, own_tr = _some_windows(codes, train, 8, v["per_recording"], rng)
    rows_va, own_va = _some_windows(codes, val, 8, v["per_recording"], rng)
    layout = WindowLayout(v["latent"], v["profile"], profile_mean=v["mean"])
    identity = ((codes.identity[own_tr], n_id, codes.identity[own_va]) if n_id else None)
    complete: dict[str, Any] = {}
    if v.get("complete"):
        crows_tr, cown_tr = _complete_windows(codes, train, 8)
        crows_va, cown_va = _complete_windows(codes, val, 8)
        complete = {"complete_levels": [(_windows(codes, coeff, crows_tr, v),
                                         _windows(codes, coeff, crows_va, v))],
                    "complete_labels": (codes.activity[cown_tr], codes.activity[cown_va])}
    head = fit_context_head([(layout, _windows(codes, coeff, rows_tr, v),
                              _windows(codes, coeff, rows_va, v))],
                            codes.activity[own_tr], n_act, features=v["features"],
                            seed=v["seed"], val_labels=codes.activity[own_va],
                            identity=identity, **complete)
    part = head.levels[0]
    if not v["split"] or not v["diff"]:
        # Refit with one transform over both parts, or without the difference channels.
        from csi_cloud.model.context_head import ALPHAS
        from csi_cloud.model.rocket import RocketTransform, fit_temperature, ridge_path

        def feats(win: tuple[np.ndarray, ...], tfs: list[RocketTransform] | None = None
                  ) -> tuple[np.ndarray, list[RocketTransform]]:
            parts = [layout] if not v["split"] else part.parts()
            xs = [series(*win, p) for p in parts]
            if not v["diff"]:
                xs = [x[:, : x.shape[1] // 2] for x in xs]
            if tfs is None:
                tfs = [RocketTransform.fit(x, v["features"] // len(xs), seed=v["seed"] + j)
                       for j, x in enumerate(xs)]
            return np.concatenate([tf(x) for tf, x in zip(tfs, xs, strict=True)], 1), tfs

        ftr, tfs = feats(_windows(codes, coeff, rows_tr, v))
        fva, _ = feats(_windows(codes, coeff, rows_va, v), tfs)
        path = ridge_path(ftr, codes.activity[own_tr], n_act, ALPHAS)
        scores = [float((h.scores(fva).argmax(1) == codes.activity[own_va]).mean())
                  for h in path]
        best = path[int(np.argmax(scores))]
        best.temperature = fit_temperature(best, fva, codes.activity[own_va])
        return _Custom(feats, tfs, best)  # type: ignore[return-value]
    return head


class _Custom:
    """A variant whose features are not the head's layout (one transform / no differences)."""

    def __init__(self, feats: Any, tfs: Any, ridge: Any) -> None:
        self.feats, self.tfs, self.ridge = feats, tfs, ridge

    def predict(self, win: tuple[np.ndarray, ...]) -> np.ndarray:
        return self.ridge.scores(self.feats(win, self.tfs)[0])


def score(model: CloudModel, head: Any, codes: Any, coeff: np.ndarray, test: np.ndarray,
          v: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, every in (("activity_accuracy", False), ("activity_accuracy_per_second", True)):
        if every:
            rows, owners, _ = segment_windows(codes, test, 8)
        else:
            rows, owners, last = segment_windows(codes, test, 8)
            rows, owners = rows[last], owners[last]
        if v.get("network"):
            model.net.context_head = None
            acc = float(np.mean(_accuracy(model.net, codes, test, every=every)[:1]))
            out[key] = acc
            continue
        win = _windows(codes, coeff, rows, v)
        if isinstance(head, _Custom):
            pred = head.predict(win).argmax(1)
        else:
            p_act, p_id = head.predict(*win, np.zeros(len(rows), int))
            pred = p_act.argmax(1)
            if p_id is not None:
                known = codes.identity[owners] >= 0
                out[key.replace("activity", "identity")] = float(
                    (p_id.argmax(1)[known] == codes.identity[owners][known]).mean())
        out[key] = float((pred == codes.activity[owners]).mean())
    return out


def adapted(model: CloudModel, head: Any, codes: Any, coeff: np.ndarray, target: np.ndarray,
            v: dict[str, Any], draws: int = 3) -> float:
    """Level-0 accuracy after a ridge refit towards ``head`` on 5 recordings per activity."""
    from csi_cloud.model.rocket import ridge_to_prior

    if v.get("network") or isinstance(head, _Custom):
        return float("nan")
    accs = []
    for draw in range(draws):
        support, query = pick_support(codes, target, 5, draw)
        rows, owners, _ = segment_windows(codes, support, 8)
        part = head.levels[0]
        prior, prior_complete = part.activity, part.complete
        windows = _windows(codes, coeff, rows, v)
        feats = part.features(*windows)
        y = codes.activity[owners]
        part.activity = ridge_to_prior(feats, y, prior, groups=owners)
        part.complete = None  # csi adapt drops it: the adapted activity layer reads all
        accs.append(score(model, head, codes, coeff, query, v)["activity_accuracy"])
        part.activity, part.complete = prior, prior_complete
    return float(np.mean(accs))


def layout_bytes(edge: EdgeEncoder, data: Any, recordings: np.ndarray, latent: int,
                 profile: int) -> dict[str, float]:
    """What a lowest level sending ``latent`` channels and ``profile`` coefficients would
    put on the wire for these recordings: the int8 edge codes entropy-coded with the
    bundle's own tables (its level-0 entry with that layout), and the payload a second at the
    level's segments a message, motion byte included, whole segments (no quality bytes:
    csi_edge.codec.payload_size) -- real
    bytes, not an estimate. The tables hold one row per latent channel and per profile
    coefficient whatever a level sends, so these are the bytes the same network would send
    with that layout at level 0."""
    manifest = edge.manifest
    per_message = manifest.level(0).segments_per_message
    rows = np.flatnonzero(np.isin(data.recording, recordings))
    symbols, coeff = edge.encode(data.x[rows])
    codes = [SegmentCodes(0, s[:latent], c[:profile]) for s, c in zip(symbols, coeff, strict=True)]
    # Whole messages of consecutive rows, each one coder stream (wire version 2).
    streams = [len(encode_message_codes(codes[i : i + per_message], manifest, edge.tables))
               for i in range(0, len(codes) - per_message + 1, per_message)]
    seconds = per_message * manifest.input_spec.segment_s
    return {"code_bytes_per_segment": round(float(np.mean(streams)) / per_message, 2),
            "payload_bytes_per_s": round(float(np.mean(
                [payload_size(per_message, n, motion=True, full_quality=True)
                 for n in streams])) / seconds, 2)}


BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"


def render(report: dict[str, Any], name: str) -> str:
    """The ablation table of one dataset for its report.md (from the results file)."""
    ds = report["datasets"][name]
    lines = ["## Ablation of the cloud classifier (bench/ablation.py)", "",
             "One change at a time against the base (level-0 codes of the int8 edge encoder: "
             "1 latent channel and 12 profile coefficients a segment, split transforms, 4,000 "
             "features, 8-segment context, difference channels), refitted on each kept "
             "bundle's training recordings and scored on its test recordings; mean ± std over "
             "tasks (k-fold; cross-session directions). `adapted K=5`: after the ridge "
             "refit towards the variant's head on 5 recordings per activity of the new "
             "session (3 draws). The kept bundles are bench/model.py's (their networks trained "
             "for the epochs it was run with: `epochs` in `bench/results/model.json`), so the "
             "network's own context classifier is measured with a short training. Results: "
             "`bench/results/ablation.json`; a variant's `tasks` says how many folds or "
             "directions it ran on (the run is cut short on a busy machine and keeps what it "
             "finished).", ""]
    for protocol, by_label in ds.items():
        keys = ["activity_accuracy", "activity_accuracy_per_second"]
        if any("identity_accuracy" in v for v in by_label.values()):
            keys += ["identity_accuracy", "identity_accuracy_per_second"]
        if any("adapted_k5_activity_accuracy" in v for v in by_label.values()):
            keys.append("adapted_k5_activity_accuracy")
        if any("payload_bytes_per_s" in v for v in by_label.values()):
            keys.append("payload_bytes_per_s")
        lines += [f"### {protocol}", "",
                  "| variant | tasks | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for label, row in by_label.items():
            cells = [("-" if k not in row else f"{row[k]['mean']:.1f}" if k.endswith("_per_s")
                      else f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}") for k in keys]
            lines.append(f"| {label} | {row.get('tasks', '-')} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_sections(report: dict[str, Any]) -> list[str]:
    written = []
    for name in report["datasets"]:
        path = ROOT / "models" / name / "report.md"
        if not path.is_file():
            continue
        put_section(path, BEGIN, END, render(report, name))
        written.append(str(path.relative_to(ROOT)))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="wiar,fition")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tasks", type=int, default=5, help="kept bundles per protocol")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other datasets' results already in --out")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--protocols", default="",
                        help="only the kept bundles of these protocols (comma-separated)")
    parser.add_argument("--variant-seeds", type=int, default=1,
                        help="fit every variant under this many head seeds (rows over tasks x "
                             "seeds)")
    parser.add_argument("--variants", default="",
                        help="run only these variants ('|'-separated labels; the base always "
                             "runs); the reports' sections are written only for a full run "
                             "into the default --out")
    args = parser.parse_args()
    only = {v for v in args.variants.split("|") if v}
    if args.render_only:
        print(write_sections(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = {"benchmark": "ablation", "datasets": {}}
    for name in args.datasets.split(","):
        data, *_ = prepare(name, args.data / DATA[name])
        kept = sorted((BUNDLES / name).glob("*/bundle.json"))
        if not kept:
            raise SystemExit(f"no kept bundles in {BUNDLES / name}: run bench/model.py "
                             "--keep-bundles first")
        results: dict[str, dict[str, list[dict[str, float]]]] = {}
        seen: dict[str, int] = {}
        for manifest_path in kept:
            folder = manifest_path.parent
            split = json.loads((folder / "split.json").read_text())
            protocol = split["protocol"]
            if args.protocols and protocol not in args.protocols.split(","):
                continue
            seen[protocol] = seen.get(protocol, 0) + 1
            if seen[protocol] > args.tasks:
                continue
            model = CloudModel.load(folder)
            if model.net.cfg.profile_blocks != 1:  # its variants read one profile a slot
                raise SystemExit(f"{folder}: a bundle with profile blocks is not ablated here")
            edge = EdgeEncoder(folder)
            codes = codes_from_segments(model, edge, data)
            coeff = profile_coefficients(model.net, codes.profile, transmitted=True)
            train, val, test = (np.array(split[k]) for k in ("train", "val", "test"))
            n_act = model.net.cfg.activities
            every = variants(model.net.cfg, args.seeds)
            if only - set(every):
                raise SystemExit(f"unknown --variants {sorted(only - set(every))}; the "
                                 f"variants: {sorted(every)}")
            runs = [(label, {**v, "seed": v["seed"] + s}) for label, v in every.items()
                    for s in range(args.variant_seeds)
                    if not (only and label != "base" and label not in only)]
            wire: dict[tuple[int, int], dict[str, float]] = {}
            for label, v in runs:
                t0 = time.perf_counter()
                saved = model.net.context_head
                head = None if v.get("network") else fit_variant(
                    codes, coeff, train, val, v, n_act,
                    model.net.cfg.identities if protocol == "random" else 0)
                row = score(model, head, codes, coeff, test, v)
                model.net.context_head = saved
                if protocol in ("cross-session", "cross-room"):
                    row["adapted_k5_activity_accuracy"] = adapted(model, head, codes, coeff,
                                                                  test, v)
                layout = (v["latent"], v["profile"])
                if not v.get("network"):
                    if layout not in wire:
                        wire[layout] = layout_bytes(edge, data, test, *layout)
                    row.update(wire[layout])
                results.setdefault(protocol, {}).setdefault(label, []).append(
                    {**row, "task": split["task"]})
                print(f"{name} {folder.name} {label}: {row} "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
                report["datasets"][name] = _aggregate(results)
                _write(args, report, started)
        report["datasets"][name] = _aggregate(results)
    _write(args, report, started)
    if only or args.out != DEFAULT_OUT:
        print(f"wrote {args.out}")
        return
    print(f"wrote {args.out}; report sections: {write_sections(report)}")


def _aggregate(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per protocol and variant: mean and std over its rows (tasks, and head seeds), their
    count, and each task's means over its seeds (``per_task``)."""
    def per_task(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        tasks = dict.fromkeys(r["task"] for r in rows)
        return {t: {k: v["mean"] for k, v in aggregate([r for r in rows if r["task"] == t]).items()}
                for t in tasks}

    return {protocol: {label: {**aggregate(rows), "tasks": len(rows),
                               "per_task": per_task(rows)}
                       for label, rows in by_label.items()}
            for protocol, by_label in results.items()}


def _write(args: argparse.Namespace, report: dict[str, Any], started: float) -> None:
    """Write the results so far (an interrupted run leaves what it measured)."""
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = dict(report)
    if args.merge and args.out.is_file():
        earlier = json.loads(args.out.read_text()).get("datasets", {})
        out["datasets"] = {**{k: v for k, v in earlier.items()
                              if k not in report["datasets"]}, **report["datasets"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
