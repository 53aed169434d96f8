"""What the time resolution of the codes allows: the uncompressed CSI of each window reduced
to ``r`` profiles a second and ``k`` principal components, quantized as the codes quantize
the profile, classified by the MiniRocket anchor and by our head's own transform and ridge,
next to the bytes a second such profiles would cost.

    python bench/resolution.py [--data ../shared/data] [--datasets wiar,fition]
                               [--rates 1,2,3,5] [--components 4,6,12] [--threads 1]

Why: the level-0 codes carry the segment's profile (its mean over the second) once a second
and one latent channel; the head reads them with random convolutions (docs/model.md), as the
MiniRocket anchor reads the full-rate CSI. This bench asks how much of the anchor's lead is
the profile's time resolution, with nothing but the input changed (same windows, same 5
folds by recording as ``bench/model.py``'s random protocol, each training recording's last
window fitted, each test recording's last window scored). The inputs:

- ``full``: every frame, every antenna x subcarrier;
- ``r/s, all channels``: each second cut into ``r`` equal blocks and every frame replaced by
  its block's mean (``1/s`` is the per-second profile, what the codes send);
- ``r/s, k components, quantized``: the block means projected onto the first ``k`` principal
  components of the training blocks and rounded as the codes round the profile (steps of
  3 sigma / 15 per component, clipped to +-15 steps: ``csi_cloud.model.train``).

Two classifiers read each input:

- the **anchor** (aeon MiniRocket, 10,000 kernels, + scikit-learn ridge) on its own layout:
  each channel minus its mean over the window, and the frame-to-frame difference. The
  window's mean (the static profile) is in none of its inputs;
- **our head** (csi_cloud.model.rocket: 4,000 random-convolution features, closed-form ridge,
  penalty by leave-one-recording-out) on the head's layout: the values held on the frame
  grid, each channel's mean over the window beside them, and the differences (the static
  profile is in it, as in the codes' head); no latent channel.

Bytes: for each quantized variant, the empirical entropy of each component's symbols over the
training blocks (bits per symbol; what a static-table entropy coder such as the bundle's ANS
coder approaches) times ``r x k``, and the same with every block after a segment's first
coded as its difference to the block before it: **estimated** code bytes a second of such
profiles (mean over the folds), not a wire measurement. The level-0 wire framing (header,
quality byte, length, CRC; about 6.7 B/s at 4 segments a message) comes on top.

Results: ``bench/results/resolution.json``, rendered into each bundle's ``report.md``
(between ``<!-- resolution:begin -->`` and ``<!-- resolution:end -->``; ``--render-only``
rewrites them from the results file).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import put_bundle_sections, save_results  # noqa: E402

from csi_cloud.model.data import SegmentData  # noqa: E402
from csi_cloud.model.fewshot import Windows  # noqa: E402
from csi_cloud.model.pipeline import prepare  # noqa: E402
from csi_cloud.model.protocols import split_tasks  # noqa: E402
from csi_cloud.model.window import take  # noqa: E402

DATA = {"fition": "fition", "wiar": "wiar/height_90"}
BEGIN, END = "<!-- resolution:begin -->", "<!-- resolution:end -->"
CONTEXT = 8
PROFILE_RANGE = 15  # the codes' clip, in steps (ModelConfig.profile_range)
INPUT_NOTE = ("the anchor reads each channel minus its mean over the window (the window's "
              "static profile is in none of its inputs), our head the values with the "
              "window's mean beside them (on Fition the static profile recognises the "
              "recording session)")


def block_means(data: SegmentData, rows: np.ndarray, rate: int | None) -> np.ndarray:
    """Window rows (R, N) -> (R, N * L, C) log amplitude, every frame replaced by the mean of
    its block of ``L / rate`` frames (``None``: every frame as it is)."""
    seg = data.x.reshape(len(data.x), data.x.shape[1], -1)  # (M, L, C)
    frames = seg.shape[1]
    if rate is not None:
        if frames % rate:
            raise ValueError(f"{frames} frames a segment do not split into {rate} blocks")
        step = frames // rate
        blocks = seg.reshape(len(seg), rate, step, -1).mean(axis=2)  # (M, r, C)
        seg = np.repeat(blocks, step, axis=1)
    w = take(rows, seg)  # (R, N, L, C)
    return w.reshape(len(rows), -1, w.shape[-1])


def series(w: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(R, T, C) values, (R, T) present -> (R, 2C, T) float32: minus the window's mean over
    its present frames, zero where missing, and the frame-to-frame difference (the anchor's
    input, csi_cloud.model.anchors)."""
    mask = present[..., None]
    mean = (w * mask).sum(1) / mask.sum(1).clip(1)
    dyn = (w - mean[:, None]) * mask
    diff = np.diff(dyn, axis=1, prepend=dyn[:, :1])
    return np.concatenate([dyn, diff], axis=2).transpose(0, 2, 1).astype(np.float32)


def entropy_bits(symbols: np.ndarray) -> float:
    """Empirical entropy of ``symbols`` (bits per symbol)."""
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def quantized_components(w: np.ndarray, segments: np.ndarray, train: np.ndarray, k: int,
                         rate: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Block-mean frames (R, N * L, C) of windows with ``segments`` (R, N) present -> their
    first ``k`` principal components (fitted on the ``train`` windows' present blocks),
    rounded to steps of 3 sigma / 15 and clipped as the codes are, back in component units
    (R, N * L, k); each component's step (k,); and two estimates of the code bits a second
    (summed over the components, from the training blocks' symbols): each symbol coded alone
    (entropy of the symbols), and each block after a segment's first coded as its difference
    to the block before it (the first one's entropy plus ``rate - 1`` times the
    differences')."""
    r, n = segments.shape
    frames = w.shape[1] // n
    blocks = w.reshape(r, n, rate, frames // rate, -1)[:, :, :, 0]  # (R, N, r, C)
    fit = blocks[train][segments[train]]  # (S, r, C)
    flat = fit.reshape(-1, fit.shape[-1])
    mean = flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    basis = vt[:k]
    step = np.maximum(3 * ((flat - mean) @ basis.T).std(axis=0) / PROFILE_RANGE, 1e-6)

    def symbols(x: np.ndarray) -> np.ndarray:
        return np.clip(np.round(((x - mean) @ basis.T) / step), -PROFILE_RANGE,
                       PROFILE_RANGE)

    sym = symbols(fit)  # (S, r, k)
    alone = rate * sum(entropy_bits(sym[:, :, j]) for j in range(k))
    delta = sum(entropy_bits(sym[:, 0, j]) for j in range(k))
    if rate > 1:
        steps = np.diff(sym, axis=1)
        delta += (rate - 1) * sum(entropy_bits(steps[:, :, j]) for j in range(k))
    return symbols(w) * step, step, alone, delta


def head_series(coeff: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Component values (R, N * L, k), held per block, in quantisation steps -> the head's
    series (csi_cloud.model.rocket.series): the values held on the frame grid (as the head
    holds a segment's profile over its latent steps; every variant the same length, so the
    random convolutions' dilations are the same), the window's mean of each component over
    its present frames held beside them, missing slots zero, and the first differences."""
    present = np.repeat(segments, coeff.shape[1] // segments.shape[1], axis=1)[..., None]
    mean = (coeff * present).sum(axis=1) / present.sum(axis=1).clip(1)
    x = np.concatenate([coeff, np.broadcast_to(mean[:, None], coeff.shape)], axis=2)
    x = (x * present).transpose(0, 2, 1)
    diff = np.diff(x, axis=2, prepend=x[:, :, :1])
    return np.concatenate([x, diff], axis=1).astype(np.float32)


def score_head(x: list[np.ndarray], y: np.ndarray, groups: np.ndarray, classes: int,
               tasks: list[tuple[np.ndarray, np.ndarray]], seed: int) -> list[float]:
    """Our head's own transform and ridge (csi_cloud.model.rocket: 4,000 random-convolution
    features, closed-form ridge with the penalty chosen by leave-one-recording-out) on the
    head's series: accuracy per task."""
    from csi_cloud.model.rocket import RocketTransform, fit_ridge

    out = []
    for xi, (train, test) in zip(x, tasks, strict=True):
        transform = RocketTransform.fit(xi[train], features=4000, seed=seed)
        feats = transform(xi)
        head = fit_ridge(feats[train], y[train], classes, groups=groups[train])
        out.append(float((head.scores(feats[test]).argmax(axis=1) == y[test]).mean()))
    return out


def score(x: list[np.ndarray], y: np.ndarray, tasks: list[tuple[np.ndarray, np.ndarray]],
          seed: int) -> list[float]:
    """MiniRocket (aeon, 10,000 kernels, fitted on the training windows) + standardised
    ridge (scikit-learn RidgeClassifierCV, the anchor's penalties): accuracy per task, each
    task reading its own inputs ``x[i]`` (R, channels, T)."""
    from aeon.transformations.collection.convolution_based import MiniRocket
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.preprocessing import StandardScaler

    out = []
    for xi, (train, test) in zip(x, tasks, strict=True):
        transform = MiniRocket(n_kernels=10_000, random_state=seed).fit(xi[train])
        feats = np.concatenate([transform.transform(xi[i : i + 256])
                                for i in range(0, len(xi), 256)]).astype(np.float32)
        scaler = StandardScaler().fit(feats[train])
        ridge = RidgeClassifierCV(alphas=np.logspace(-3, 3, 10)).fit(
            scaler.transform(feats[train]), y[train])
        out.append(float((ridge.predict(scaler.transform(feats[test])) == y[test]).mean()))
    return out


def run_dataset(name: str, data_dir: Path, rates: list[int], components: list[int],
                folds: int, seed: int, log: Any) -> dict[str, Any]:
    data, _spec, activities, _ids = prepare(name, data_dir)
    win = Windows(data, CONTEXT)
    last = np.flatnonzero(win.last)
    rows, owner, y = win.rows[last], win.owner[last], win.activity[last]
    frames = data.x.shape[1]
    segments = rows >= 0
    present = np.repeat(segments, frames, axis=1)  # (R, N * L)
    tasks = []
    for _name, tr, va, te in split_tasks(data, "random", folds, seed):
        tasks.append((np.flatnonzero(np.isin(owner, np.concatenate([tr, va]))),
                      np.flatnonzero(np.isin(owner, te))))
    variants: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}

    def summary(accs: list[float]) -> dict[str, Any]:
        return {"mean": round(float(np.mean(accs)), 4), "std": round(float(np.std(accs)), 4),
                "folds": [round(a, 4) for a in accs]}

    def add(label: str, rate: int | None, k: int | None, x: list[np.ndarray],
            bits: list[tuple[float, float]] | None, started: float,
            head: list[np.ndarray] | None = None) -> None:
        row: dict[str, Any] = {
            "variant": label, "profiles_per_s": rate, "components": k,
            "activity_accuracy": summary(score(x, y, tasks, seed))}
        if head is not None:
            row["head_activity_accuracy"] = summary(
                score_head(head, y, owner, len(activities), tasks, seed))
        if bits:
            row["estimated_code_bytes_per_s"] = {
                "symbols_alone": round(float(np.mean([b[0] for b in bits])) / 8, 2),
                "block_differences": round(float(np.mean([b[1] for b in bits])) / 8, 2)}
        row["seconds"] = round(time.perf_counter() - started, 1)
        variants.append(row)
        est = row.get("estimated_code_bytes_per_s")
        log(f"{name} {label}: {row['activity_accuracy']['mean']:.4f}"
            + (f", our head {row['head_activity_accuracy']['mean']:.4f}"
               if head is not None else "")
            + (f", about {est['symbols_alone']} / {est['block_differences']} code B/s"
               if est else "") + f" ({row['seconds']} s)")

    t0 = time.perf_counter()
    w = block_means(data, rows, None)
    add("full", None, None, [series(w, present)] * len(tasks), None, t0,
        head=[head_series(w, segments)] * len(tasks))
    for rate in rates:
        if frames % rate:
            skipped[f"{rate}/s"] = f"{frames} frames a segment do not split into {rate} blocks"
            continue
        t0 = time.perf_counter()
        w = block_means(data, rows, rate)
        add(f"{rate}/s, all channels", rate, None, [series(w, present)] * len(tasks), None,
            t0, head=[head_series(w, segments)] * len(tasks))
        for k in components:
            t0 = time.perf_counter()
            # Components and steps fitted per fold on its training windows, as a bundle's
            # are fitted on its training recordings.
            fitted = [quantized_components(w, segments, train, k, rate)
                      for train, _test in tasks]
            add(f"{rate}/s, {k} components, quantized", rate, k,
                [series(c, present) for c, _s, _a, _d in fitted],
                [(a, d) for _c, _s, a, d in fitted], t0,
                head=[head_series(c / step, segments) for c, step, _a, _d in fitted])
    return {"recordings": len(data), "windows": len(last), "frames_per_segment": frames,
            "input": INPUT_NOTE,
            "channels": int(np.prod(data.x.shape[2:])), "activities": activities,
            "skipped": skipped, "variants": variants}


def render(name: str, result: Mapping[str, Any]) -> str:
    """The section of one bundle's report.md, from the results file's entry."""
    lines = [
        "## What the codes' time resolution allows (bench/resolution.py)", "",
        "The MiniRocket anchor (aeon, + ridge) and our head, each fitted on the training "
        "recordings' last windows and scored on the test recordings' last windows, 5 folds by "
        "recording, with only the input changed: each second cut into r blocks, every frame "
        "replaced by its block's mean, optionally projected onto k principal components and "
        "rounded as the codes round the profile. Estimated code bytes a second: empirical "
        "entropy of the training blocks' symbols, coded alone / each block after a segment's "
        "first as its difference to the one before (not a wire measurement; the level-0 "
        f"framing comes on top). Input: {result.get('input', '-')}. Results: "
        "`bench/results/resolution.json`.", "",
        "Our head: the head's own transform and ridge (csi_cloud.model.rocket, 4,000 "
        "features, penalty by leave-one-recording-out) on the same values laid out as the "
        "head lays out the profile (held on the frame grid, the window's mean beside it: "
        "the static profile is in this input), no latent channel, fitted on the same last "
        "windows.", "",
        "| input | anchor: activity accuracy | our head | estimated code B/s |",
        "|---|---|---|---|"]
    for v in result["variants"]:
        acc = v["activity_accuracy"]
        est = v.get("estimated_code_bytes_per_s")
        label = "every frame, every channel" if v["variant"] == "full" \
            else v["variant"]
        head = v.get("head_activity_accuracy")
        lines.append(f"| {label} | {acc['mean']:.3f} ± {acc['std']:.3f} | "
                     + (f"{head['mean']:.3f} ± {head['std']:.3f}" if head else "-") + " | "
                     + (f"{est['symbols_alone']:.1f} / {est['block_differences']:.1f}"
                        if est else "-") + " |")
    return "\n".join(lines)


def write_sections(report: dict[str, Any]) -> list[str]:
    return put_bundle_sections(report["datasets"], BEGIN, END, render, "variants")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--datasets", default="wiar,fition")
    parser.add_argument("--rates", default="1,2,3,5")
    parser.add_argument("--components", default="6,12")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="numba threads of MiniRocket")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "resolution.json")
    parser.add_argument("--no-report", action="store_true",
                        help="do not write the sections into models/*/report.md")
    parser.add_argument("--render-only", action="store_true",
                        help="only write the report sections from --out")
    args = parser.parse_args()
    if args.render_only:
        for path in write_sections(json.loads(args.out.read_text())):
            print(f"wrote {path}")
        return
    import warnings

    import numba

    numba.set_num_threads(args.threads)
    # aeon warns on every fit that a window's missing slots are constant (zeros): expected.
    warnings.filterwarnings("ignore", message="Data seen by instance of MiniRocket")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python bench/resolution.py " + " ".join(sys.argv[1:]),
        "machine": platform.node(), "protocol": f"random, {args.folds} folds by recording "
        "(bench/model.py's), each recording's last window", "datasets": {}}
    for name in [d for d in args.datasets.split(",") if d]:
        data_dir = args.data / DATA[name]
        if not data_dir.is_dir():
            report["datasets"][name] = {"skipped": f"{data_dir} is not there"}
            continue
        report["datasets"][name] = run_dataset(
            name, data_dir, [int(r) for r in args.rates.split(",") if r],
            [int(k) for k in args.components.split(",") if k], args.folds, args.seed,
            lambda line: print(line, flush=True))
    report["seconds"] = round(time.perf_counter() - started, 1)
    save_results(report, args.out, None if args.no_report else write_sections)


if __name__ == "__main__":
    main()
