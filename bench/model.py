"""Model baselines and protocols on one dataset, one command.

    python bench/model.py [--data ../shared/data/fition] [--seeds 3] [--folds 5] [--epochs 40]

Same data, same splits for every method:
  (a) ceiling: our classifier on the uncompressed latent (quantizer bypassed, no rate limit);
  (b) zstd-19 of the raw native stream (every UDP payload of the capture), bytes/s;
  (c) EfficientFi-style reference (bench/efficientfi.py): honest bits = codebook indices
      + the MaxUnpool pooling indices its decoder needs;
  (d) ours at each rate level, evaluated through real payloads (csi evaluate's code path).
Protocols: (i) ``random``: k-fold by recording (stratified, seeded); (ii) ``cross-session``
(Fition): train on one user of a room, test on the other user of the same room, 4 directions,
activity only. Results (mean and std over folds/directions and seeds) and the targets go to
bench/results/model.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from efficientfi import EfficientFiReference  # noqa: E402

from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.data import SegmentData, windows  # noqa: E402
from csi_cloud.model.evaluate import evaluate_bundle, macro_f1  # noqa: E402
from csi_cloud.model.network import ModelConfig  # noqa: E402
from csi_cloud.model.pipeline import fit, prepare  # noqa: E402
from csi_cloud.model.protocols import aggregate, split_tasks  # noqa: E402
from csi_cloud.model.train import TrainOptions, evaluate_windows, train  # noqa: E402
from csi_edge.bundle import EdgeEncoder  # noqa: E402


def run_ours(data, spec, acts, ids, tr, va, te, opts, with_identity):  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b"
        fit(data, spec, acts, ids if with_identity else [], tr, va, opts, out, name="bench")
        ev = evaluate_bundle(CloudModel.load(out), EdgeEncoder(out), data, te)
    return ev.summary


def run_ceiling(data, spec, acts, ids, tr, va, te, opts, with_identity):  # type: ignore[no-untyped-def]
    cfg = ModelConfig(antennas=spec.antennas, subcarriers=len(spec.subcarriers),
                      segment_frames=spec.segment_frames, activities=len(acts),
                      identities=len(ids) if with_identity else 0, quantizer="none")
    res = train(cfg, data, tr, va, opts.model_copy(update={"recon_weight": 0.0}))
    r = evaluate_windows(res.net, data, te, cfg.levels)
    out = {"activity_accuracy": float((r["activity_logits"].argmax(1) == r["activity_true"])
                                      .mean()),
           "activity_macro_f1": macro_f1(r["activity_true"], r["activity_logits"].argmax(1),
                                         len(acts))}
    if "identity_logits" in r:
        known = r["identity_true"] >= 0
        out["identity_accuracy"] = float((r["identity_logits"][known].argmax(1)
                                          == r["identity_true"][known]).mean())
    return out


def _windows_2d(data: SegmentData, recs: np.ndarray, n: int, mean: np.ndarray,
                scale: float) -> torch.Tensor:
    rows, _ = windows(data, recs, n)
    x = np.where((rows >= 0)[..., None, None, None], data.x[np.where(rows >= 0, rows, 0)], 0)
    w, _, length, a, s = x.shape
    x = (x.reshape(w, n * length, a * s) - mean) / scale
    x[np.repeat(rows < 0, length, axis=1)] = 0
    return torch.from_numpy(x.transpose(0, 2, 1)[:, None].astype(np.float32))


def run_efficientfi(data, spec, acts, ids, tr, va, te, opts, with_identity):  # type: ignore[no-untyped-def]
    torch.manual_seed(opts.seed)
    n = 8
    flat = data.x[np.isin(data.recording, tr)].reshape(-1, len(spec.subcarriers) * spec.antennas)
    mean, scale = flat.mean(0), float(flat.std())
    xtr, xva, xte = (_windows_2d(data, r, n, mean, scale) for r in (tr, va, te))
    ytr, yva, yte = (torch.from_numpy(data.activity[r]) for r in (tr, va, te))
    itr, ite = (torch.from_numpy(data.identity[r]) for r in (tr, te))
    model = EfficientFiReference(xtr.shape[2], xtr.shape[3], len(acts),
                                 len(ids) if with_identity else 0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    best, best_state, stale = -1.0, None, 0
    for _epoch in range(opts.epochs):
        model.train()
        order = torch.randperm(len(xtr))
        for i in range(0, len(order), 16):
            b = order[i : i + 16]
            out = model(xtr[b])
            loss = (F.mse_loss(out["recon"], xtr[b]) + out["vq_loss"]
                    + F.cross_entropy(out["activity"], ytr[b]))
            if out["identity"] is not None:
                loss = loss + 0.5 * F.cross_entropy(out["identity"], itr[b])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(xva)["activity"].argmax(1) == yva).float().mean())
        if acc > best:
            best, best_state, stale = acc, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= opts.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        out = model(xte)
        nmse = 10 * np.log10(float(((out["recon"] - xte) ** 2).sum() / (xte**2).sum()))
    window_s = n * spec.segment_s
    result = {
        "activity_accuracy": float((out["activity"].argmax(1) == yte).float().mean()),
        "activity_macro_f1": macro_f1(yte.numpy(), out["activity"].argmax(1).numpy(), len(acts)),
        "codes_bytes_per_s": model.code_bits() / 8 / window_s,
        "side_information_bytes_per_s": model.side_bits() / 8 / window_s,
        "honest_bytes_per_s": (model.code_bits() + model.side_bits()) / 8 / window_s,
        "nmse_db": nmse,
    }
    if out["identity"] is not None:
        known = ite >= 0
        result["identity_accuracy"] = float((out["identity"][known].argmax(1) == ite[known])
                                            .float().mean())
    return result


def zstd_rates(data: SegmentData) -> dict[str, float]:
    import zstandard

    from csi_edge.readers._pcap import read_udp_payloads

    raw = packed = seconds = 0.0
    for example in data.examples:
        capture = read_udp_payloads(example.path)
        blob = b"".join(capture.payloads)
        raw += len(blob)
        packed += len(zstandard.ZstdCompressor(level=19).compress(blob))
        seconds += capture.timestamps[-1] - capture.timestamps[0]
    return {"native_bytes_per_s": raw / seconds, "zstd19_bytes_per_s": packed / seconds}


def _ours_rows(summary: dict) -> list[dict]:  # type: ignore[type-arg]
    return [{**lv} for lv in summary["levels"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fition")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fition")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--protocols", default="random,cross-session")
    parser.add_argument("--methods", default="ours,ceiling,efficientfi,zstd")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    started = time.perf_counter()
    data, spec, acts, ids = prepare(args.dataset, args.data)
    report: dict = {"benchmark": "model", "dataset": args.dataset, "recordings": len(data),
                    "seeds": args.seeds, "folds": args.folds, "epochs": args.epochs,
                    "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                "threads": args.threads}, "protocols": {}}
    if "zstd" in methods and args.dataset == "fition":
        report["zstd"] = zstd_rates(data)
    runners = {"ours": run_ours, "ceiling": run_ceiling, "efficientfi": run_efficientfi}
    for protocol in args.protocols.split(","):
        with_identity = protocol == "random" and bool(ids)
        per_method: dict[str, list] = {m: [] for m in runners if m in methods}  # type: ignore[type-arg]
        per_task: dict[str, dict[str, list]] = {}  # type: ignore[type-arg]
        for seed in range(args.seeds):
            opts = TrainOptions(epochs=args.epochs, seed=seed, threads=args.threads)
            for name, tr, va, te in split_tasks(data, protocol, args.folds, seed):
                for method in per_method:
                    t0 = time.perf_counter()
                    result = runners[method](data, spec, acts, ids, tr, va, te, opts,
                                             with_identity)
                    per_method[method].append(result)
                    per_task.setdefault(name, {}).setdefault(method, []).append(result)
                    brief = (result["levels"][0]["activity_accuracy"] if method == "ours"
                             else result["activity_accuracy"])
                    print(f"{protocol:13s} seed {seed} {name:13s} {method:11s} activity "
                          f"{brief:.3f}  {time.perf_counter() - t0:5.0f}s", flush=True)
        section: dict = {}
        if "ours" in per_method:
            levels = list(zip(*[_ours_rows(s) for s in per_method["ours"]], strict=True))
            section["ours"] = {"levels": [{**aggregate(list(rows)), "level": i}
                                          for i, rows in enumerate(levels)],
                               "unquantized": aggregate([s["unquantized"]
                                                          for s in per_method["ours"]])}
        for method in ("ceiling", "efficientfi"):
            if method in per_method:
                section[method] = aggregate(per_method[method])
        section["per_task"] = {
            name: {m: (aggregate([r["levels"][0] for r in rs]) if m == "ours"
                       else aggregate(rs)) for m, rs in methods_.items()}
            for name, methods_ in per_task.items()}
        report["protocols"][protocol] = section
    report["targets"] = targets(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets"], indent=2))
    print(f"wrote {args.out}")


def targets(report: dict) -> dict:  # type: ignore[type-arg]
    """The issue's targets, checked against the measured means."""
    out: dict = {}
    for protocol, section in report["protocols"].items():
        if "ours" not in section:
            continue
        low, high = section["ours"]["levels"][0], section["ours"]["levels"][-1]
        entry = {"lowest_level_payload_bytes_per_s": low["payload_bytes_per_s"]["mean"],
                 "lowest_level_bytes_target_32": low["payload_bytes_per_s"]["mean"] <= 32,
                 "lowest_level_activity": low["activity_accuracy"]["mean"],
                 "highest_level_activity": high["activity_accuracy"]["mean"],
                 "highest_level_nmse_db": high["nmse_db"]["mean"],
                 "highest_level_nmse_target_minus15": high["nmse_db"]["mean"] <= -15}
        if "ceiling" in section:
            ceil = section["ceiling"]["activity_accuracy"]["mean"]
            entry["ceiling_activity"] = ceil
            entry["lowest_within_2_points"] = low["activity_accuracy"]["mean"] >= ceil - 0.02
            entry["highest_within_0_5_points"] = high["activity_accuracy"]["mean"] >= ceil - 0.005
            if "identity_accuracy" in section["ceiling"] and "identity_accuracy" in low:
                cid = section["ceiling"]["identity_accuracy"]["mean"]
                entry["ceiling_identity"] = cid
                entry["lowest_identity"] = low["identity_accuracy"]["mean"]
                entry["lowest_identity_within_3_points"] = (
                    low["identity_accuracy"]["mean"] >= cid - 0.03)
        if "efficientfi" in section:
            ref = section["efficientfi"]
            entry["efficientfi_activity"] = ref["activity_accuracy"]["mean"]
            entry["efficientfi_honest_bytes_per_s"] = ref["honest_bytes_per_s"]["mean"]
            entry["beats_efficientfi"] = (
                low["activity_accuracy"]["mean"] > ref["activity_accuracy"]["mean"]
                and low["payload_bytes_per_s"]["mean"] <= ref["honest_bytes_per_s"]["mean"])
        if protocol == "cross-session":
            entry["cross_session_target_0_55"] = low["activity_accuracy"]["mean"] >= 0.55
        out[protocol] = entry
    return out


if __name__ == "__main__":
    main()
