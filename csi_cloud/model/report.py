"""``report.md`` and its PNG plots for a trained bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["header_line", "refresh_header", "write_report"]


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(history: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [h["epoch"] for h in history]
    for key in ("loss", "recon", "activity", "identity"):
        ax[0].plot(epochs, [h[key] for h in history], label=key)
    ax[0].set_xlabel("epoch")
    ax[0].set_title("training losses")
    ax[0].legend()
    ax[1].plot(epochs, [h["val_activity"] for h in history], label="activity")
    if history and history[0].get("val_identity") is not None:
        ax[1].plot(epochs, [h["val_identity"] for h in history], label="identity")
    ax[1].set_xlabel("epoch")
    ax[1].set_title("validation accuracy (mean over levels)")
    ax[1].legend(loc="lower left")
    usage = ax[1].twinx()
    usage.plot(epochs, [h["perplexity"] for h in history], "k:", lw=1)
    usage.set_ylabel("codebook perplexity per latent channel (dotted)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _confusion(true: np.ndarray, pred: np.ndarray, labels: list[str], title: str,
               path: Path) -> None:
    plt = _plt()
    n = len(labels)
    matrix = np.zeros((n, n), dtype=int)
    for t, p in zip(true.tolist(), pred.tolist(), strict=True):
        matrix[t, p] += 1
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 1.0 + 0.55 * n))
    ax.imshow(matrix, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rate_curve(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    levels = summary["levels"]
    rate = [lv["payload_bytes_per_s"] for lv in levels]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(rate, [lv["activity_accuracy"] for lv in levels], "o-", label="activity")
    if levels[0]["identity_accuracy"] is not None:
        ax.plot(rate, [lv["identity_accuracy"] for lv in levels], "s-", label="identity")
    unq = summary["unquantized"]
    ax.axhline(unq["activity_accuracy"], ls="--", c="C0", lw=0.8, label="activity, unquantized")
    ax.set_xscale("log")
    ax.set_xlabel("payload bytes/s (real payloads)")
    ax.set_ylabel("accuracy")
    ax.set_title("rate - accuracy over rate levels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmap(x: np.ndarray, x_hat: np.ndarray, level: int, path: Path) -> None:
    plt = _plt()
    real = x.reshape(x.shape[0] * x.shape[1], -1)[:300].T
    recon = x_hat.reshape(x_hat.shape[0] * x_hat.shape[1], -1)[:300].T
    vmin, vmax = np.percentile(real, [1, 99])
    fig, ax = plt.subplots(2, 1, figsize=(7, 3.6), sharex=True)
    ax[0].imshow(real, aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis")
    ax[0].set_title("real CSI (standardised log amplitude), subcarrier x frame")
    ax[1].imshow(recon, aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis")
    ax[1].set_title(f"reconstructed from the level-{level} payload")
    ax[1].set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(k)) for k in keys) + " |\n" for r in rows)


METRIC_KEYS = ["level", "payload_bytes_per_s", "payload_bytes_per_segment", "compression_ratio",
               "activity_accuracy", "activity_accuracy_per_second",
               "activity_accuracy_live_per_second", "activity_accuracy_smoothed_per_second",
               "activity_macro_f1",
               "identity_accuracy", "identity_accuracy_per_second", "identity_macro_f1",
               "nmse_db", "encoder_ms_per_segment"]


def header_line(manifest: dict[str, Any]) -> str:
    """The report's line naming the bundle; where the test-split figures were measured under
    another id (the same weights, the calibration refitted since), it names that id too."""
    line = f"Bundle id `{manifest['id']}`, created {manifest['created']}."
    measured = ((manifest.get("metrics") or {}).get("test_split") or {}).get("model")
    if measured and measured != manifest["id"]:
        line += (f" The test-split figures were measured under id `{measured}`: the same "
                 f"weights, before its calibration was refitted (`csi calibrate`); the "
                 f"live and smoothed per-second figures depend on that calibration.")
    return line


def refresh_header(folder: Path, manifest: dict[str, Any]) -> bool:
    """Point an existing report.md at the bundle's current id (:func:`header_line`), after
    something rewrote the manifest without rewriting the report. Returns whether it did."""
    path = folder / "report.md"
    if not path.is_file():
        return False
    lines = path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("Bundle id `"):
            lines[i] = header_line(manifest) + "\n"
            path.write_text("".join(lines))
            return True
    return False


def write_report(folder: Path, *, manifest: dict[str, Any],
                 history: list[dict[str, Any]] | None, evaluation: Any,
                 protocols: dict[str, Any] | None, notes: list[str]) -> Path:
    """Write report.md and plots into the bundle folder. ``history`` None: the training
    curves are not redrawn (a head refitted on a trained network: the bundle's plot stays)."""
    summary = evaluation.summary
    preds = evaluation.predictions
    labels = manifest["labels"]
    if history is not None:
        _curves(history, folder / "training_curves.png")
    low = 0
    _confusion(preds[low]["activity_true"], preds[low]["activity"], labels["activity"],
               f"activity, level {low} (held-out test recordings)",
               folder / "confusion_activity.png")
    has_id = labels.get("identity") and preds[low]["identity"] is not None
    if has_id:
        known = preds[low]["identity_true"] >= 0
        _confusion(preds[low]["identity_true"][known], preds[low]["identity"][known],
                   labels["identity"], f"identity, level {low}", folder / "confusion_identity.png")
    _rate_curve(summary, folder / "rate_accuracy.png")
    top = summary["levels"][-1]["level"]
    _heatmap(preds[f"recon{top}"]["x"], preds[f"recon{top}"]["x_hat"], top,
             folder / "reconstruction.png")

    spec = manifest["input_spec"]
    train = manifest["training"]
    held_out = manifest.get("held_out") is not False
    test_title = ("## Held-out test recordings (one split)" if held_out else
                  "## Test recordings OVERLAP the training recordings (not held out)")
    lines = [
        f"# {manifest['name']}: model report"
        + ("" if held_out else " (NOT held out: tested on its training recordings)"),
        "",
        header_line(manifest),
        "",
        "## Input and data",
        f"- source `{spec['source_kind']}`, {len(spec['subcarriers'])} subcarriers "
        f"({spec['band']}), {spec['antennas']} antenna(s), resampled to "
        f"{spec['nominal_rate_hz']} Hz, segments of {spec['segment_frames']} frames, "
        f"context {manifest['model']['context_segments']} segments",
        f"- dataset `{train.get('dataset')}`: {train.get('recordings')} recordings, split "
        f"{train.get('split')} (seed {train.get('seed')}): train {train.get('train')}, "
        f"val {train.get('val')}, test {train.get('test')}; training took "
        f"{train.get('seconds', 0):.0f} s, best epoch {train.get('best_epoch')}",
        "",
        test_title,
        *([] if held_out else [
            "Too few recordings for a held-out test split: the numbers below are measured on "
            "recordings the bundle was trained or validated on and say nothing about new "
            "ones (`held_out: false` in bundle.json).", ""]),
        "Payload bytes are `len()` of the real wire payloads (header, codes, CRC). NMSE: "
        "`10 log10(sum (x - x_hat)^2 / sum x^2)` on the standardised log amplitude. "
        "Accuracy per recording: the window ending at each recording's last segment; "
        "per second: every prediction the service makes while the recording streams (one "
        "per segment, windows that start mid-recording included), read from the full "
        "context window (`activity_accuracy_per_second`), as a prediction's live `activity` "
        "(`..._live_per_second`: the window read at the bundle's context lengths) and as the "
        "smoothed label the dashboard and the events show (`..._smoothed_per_second`: the "
        "bundle's filter, each recording streamed alone from a fresh start).",
        "",
        _table([{**summary["unquantized"], "level": "unquantized"}, *summary["levels"]],
               METRIC_KEYS),
        "",
        f"Native stream: {summary['native_bytes_per_s']:.0f} bytes/s.",
        "",
        "![training curves](training_curves.png)",
        "![rate-accuracy](rate_accuracy.png)",
        "![activity confusion](confusion_activity.png)",
    ]
    if has_id:
        lines.append("![identity confusion](confusion_identity.png)")
    lines += ["![real vs reconstructed](reconstruction.png)", ""]
    if protocols:
        lines += ["## Protocols (cross-validated)", ""]
        for name, result in protocols.items():
            lines += [f"### {name}: {result['tasks']} train/test tasks x {result['seeds']} "
                      "seed(s), mean (std)", ""]
            rows = [{"level": "unquantized", **result["unquantized"]}, *result["levels"]]
            lines.append(_table([{k: (f"{v['mean']:.3f} ({v['std']:.3f})"
                                      if isinstance(v, dict) else v) for k, v in r.items()}
                                 for r in rows],
                                [k for k in METRIC_KEYS if k in result["levels"][0]
                                 or k == "level"]))
            lines += ["Level-0 activity accuracy per task: " + ", ".join(
                f"{task} {v['activity_accuracy']['mean']:.3f}"
                for task, v in result["per_task_level0"].items()), ""]
        lines += ["```json", json.dumps(protocols, indent=1)[:4000], "```", ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
