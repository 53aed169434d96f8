"""Our model against accuracy anchors, on every protocol, one command.

    python bench/model.py [--datasets fition,wiar] [--folds 5] [--seeds 1] [--epochs 40]
                          [--shots 1,3,5] [--draws 3]

Same recordings, same windows, same splits for every method:

- ``ours``: the bundle as shipped (int8 edge encoder, real wire payloads, every byte counted
  by ``len()``), per rate level, and our own uncompressed path (quantizer bypassed, every
  channel, exact profile) through the same kind of head;
- anchors (csi_cloud/model/anchors.py, aeon + scikit-learn, on uncompressed CSI):
  MiniRocket + ridge, static-profile 5-NN, hand-crafted statistics + gradient boosting, and
  their fusion;
- ``zstd``: zstd-19 of the raw native stream (Fition), bytes/s.

Accuracy per recording (the window ending at each recording's last segment, as ``csi
evaluate``) and per second (every window the service classifies while a recording streams).
On the k-fold protocol (``--live``, the default) ours also gets **what the service shows**
each second: the task's bundle calibrated on the task's validation recordings as ``csi
train`` calibrates a bundle (temperatures, context lengths and their pool, the filter's
``stay``, the abstention threshold: csi_cloud.model.trust), then the test recordings laid
end to end on one AP's stream in ``--live-orders`` random orders through the live output
and its filter (bench/trust.py's scoring): ``activity_accuracy_live`` (the smoothed label),
``..._live_raw`` (before the filter), ``..._live_settled`` (the event timeline, settled
2 s late) and ``..._separate_smoothed`` (each recording its own stream). The targets check
the live label against the per-recording figure minus 5 points, per level.
The anchors' per-recording scores come from anchors fitted on each training recording's last
window (the input the score reads), their per-second scores from anchors fitted on every
window (``--anchor-fits``; on the support alone of a few-shot draw, every window for both).

Protocols:
- ``random``: k-fold by recording (stratified, seeded);
- ``cross-session`` (Fition): train on one user, test on the other user of the same room;
- ``few-shot``: K labelled recordings per activity from a new setting (the rest of it is the
  test set; ``--draws`` support draws): our bundle before adaptation, after ``csi adapt``
  (ridge shrunk towards the parent as far as leave-one-recording-out on the support says),
  always shrunk towards the parent, refitted on the support alone, and the anchors on the
  support alone and on the source data plus the support (the support weighted as much as all
  source windows together). Settings: Fition cross-session (the cross-session bundles, 4
  directions) and cross-room (rm1/rm2 <-> rm3/rm4); WiAR 90 cm, a learning curve on each
  random fold's test recordings (bundle trained on the other folds). ``--protocols few-shot``
  runs the few-shot settings alone (``--few-shot-settings`` picks them), e.g.

    python bench/model.py --datasets fition --protocols few-shot \
        --few-shot-settings cross-session --out bench/results/model_few_shot.json

  ``--anchors-only`` measures the anchors' rows without a bundle, on the same splits and
  support draws, to be merged with ours' rows of the same tasks (``--anchor-fits last``: only
  the per-recording scores, merged next to the per-second ones measured before):

    python bench/model.py --datasets fition --protocols few-shot \
        --few-shot-settings cross-session --anchors-only --threads 1 --tasks user1->user2 \
        --out bench/results/model_fewshot_anchors_user1-user2.json
    python bench/model.py --render-only --merge-from bench/results/model_fewshot_anchors_*.json

Results: bench/results/model.json (means and stds over folds/directions, draws and seeds, the
issue's targets checked) and bench/results/model_*.png. Anchor features are cached under
.cache/bench/ (gitignored).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))



from _report import environment, put_section  # noqa: E402
from trust import MARGIN as LIVE_MARGIN  # noqa: E402  (bench/trust.py)
from trust import bench_bundle  # noqa: E402

from csi_cloud.model.anchors import ANCHORS  # noqa: E402
from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.data import SegmentData  # noqa: E402
from csi_cloud.model.evaluate import evaluate_bundle  # noqa: E402
from csi_cloud.model.fewshot import (  # noqa: E402
    ANCHOR_FITS,
    SUPPORT_SHARE,
    Windows,
    few_shot,
    few_shot_anchors,
    run_anchors,
)
from csi_cloud.model.fitting import fit  # noqa: E402
from csi_cloud.model.network import ModelConfig  # noqa: E402
from csi_cloud.model.pipeline import prepare  # noqa: E402
from csi_cloud.model.protocols import aggregate, split_tasks  # noqa: E402
from csi_cloud.model.train import TrainOptions  # noqa: E402
from csi_cloud.model.trust import calibrate_folder  # noqa: E402
from csi_edge.bundle import EdgeEncoder  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
DATA = {"fition": "fition", "wiar": "wiar/height_90"}


def level0_layout(text: str) -> dict[str, tuple[int, ...]]:
    """``--level0 LATENT,PROFILE``: the model config whose level 0 sends LATENT latent
    channels and PROFILE profile coefficients, the other levels as by default ({} for '')."""
    if not text:
        return {}
    latent, profile = (int(v) for v in text.split(","))
    return ModelConfig.level0(latent, profile)


def train_ours(data: SegmentData, spec: Any, acts: list[str], ids: list[str],
               tr: np.ndarray, va: np.ndarray, opts: TrainOptions, folder: Path,
               identity: bool, model: dict[str, Any] | None = None
               ) -> tuple[CloudModel, EdgeEncoder]:
    fit(data, spec, acts, ids if identity else [], tr, va, opts, folder, name="bench",
        model=model, calibrate=False)
    return CloudModel.load(folder), EdgeEncoder(folder)


def calibrated_copy(folder: Path, data: SegmentData, va: np.ndarray, work: Path) -> Path:
    """A copy of the bundle in ``folder`` (left as it is) with the live output's calibration
    fitted on the validation recordings ``va`` (recordings its weights were not fitted on;
    they chose its early-stopping epoch and head penalties), as ``csi train`` fits it."""
    live = work / "live"
    shutil.copytree(folder, live)
    calibrate_folder(live, data, va, fitted_on=f"{len(va)} validation recordings of the task")
    return live


def score_live(folder: Path, data: SegmentData, te: np.ndarray, orders: int
               ) -> list[dict[str, float]]:
    """Per rate level, what the service shows each second on the test recordings ``te``
    laid end to end in ``orders`` random orders: bench/trust.py's scoring of the calibrated
    bundle in ``folder`` (:func:`calibrated_copy`)."""
    scored = bench_bundle("task", "", Path(), orders, folder=folder,
                          loaded=(data, te, f"the task's {len(te)} test recordings"))
    return [{"activity_accuracy_live": lv["live"]["smoothed_accuracy"],
             "activity_accuracy_live_raw": lv["live"]["raw_accuracy"],
             "activity_accuracy_live_settled": lv["target"]["settled"],
             "activity_accuracy_separate_smoothed": lv["separate"]["smoothed_accuracy"]}
            for lv in scored["levels"]]


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


def _ours_row(summary: dict[str, Any]) -> dict[str, Any]:
    return {"levels": summary["levels"], "unquantized": summary["unquantized"]}


def _aggregate_ours(rows: list[dict[str, Any]]) -> dict[str, Any]:
    levels = list(zip(*[r["levels"] for r in rows], strict=True))
    return {"levels": [{**aggregate(list(lv)), "level": i} for i, lv in enumerate(levels)],
            "unquantized": aggregate([r["unquantized"] for r in rows])}


def run_dataset(name: str, args: argparse.Namespace, log: Any,
                partial: Any = None) -> dict[str, Any]:
    data, spec, acts, ids = prepare(name, args.data / DATA[name])
    win = Windows(data, 8)
    n_act, n_id = len(acts), len(ids)
    shots = [int(s) for s in args.shots.split(",")]
    source_shots = [int(s) for s in args.source_anchors_shots.split(",") if s] \
        if args.source_anchors_shots != "all" else None
    report: dict[str, Any] = {"recordings": len(data), "windows": len(win.rows),
                              "max_tasks_per_protocol": args.max_tasks or None,
                              "activities": acts, "identities": ids, "protocols": {}}
    if name == "fition" and "zstd" in args.methods and not args.anchors_only:
        report["zstd"] = zstd_rates(data)
    protocols = [p for p in args.protocols.split(",") if p]
    few: dict[str, dict[str, Any]] = {}
    tasks: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray, int]] = []
    # The few-shot settings ride on the other protocols' bundles (WiAR: the random folds';
    # Fition: the cross-session ones', and cross-room bundles of their own); with
    # ``--protocols few-shot`` alone those bundles are trained (or reused) for it only.
    settings = [s for s in args.few_shot_settings.split(",") if s] \
        if "few-shot" in protocols else []
    fits = [f for f in args.anchor_fits.split(",") if f]
    if settings and source_shots != []:
        report["few_shot_source_and_support"] = {
            "support_share": SUPPORT_SHARE,
            "source_windows": "the source recordings (the task's training and validation "
                              "recordings, none left out) and the support: each one's last "
                              "window for the per-recording score, every window for the "
                              "per-second one",
            "shots": "all" if source_shots is None else source_shots,
            "boosting_threads": args.threads}
    for seed in range(args.first_seed, args.seeds):
        if "random" in protocols or (name == "wiar" and "wiar-learning-curve" in settings):
            tasks += [("random", t, tr, va, te, seed)
                      for t, tr, va, te in split_tasks(data, "random", args.folds, seed)]
        if name == "fition" and ("cross-session" in protocols or "cross-session" in settings):
            tasks += [("cross-session", t, tr, va, te, seed)
                      for t, tr, va, te in split_tasks(data, "cross-session", args.folds, seed)]
        if name == "fition" and "cross-room" in settings:
            rooms = {"rm1/rm2": ("user1", "user2"), "rm3/rm4": ("user3", "user4")}
            for src, dst in (("rm1/rm2", "rm3/rm4"), ("rm3/rm4", "rm1/rm2")):
                train = np.array([i for i, e in enumerate(data.examples)
                                  if e.identity in rooms[src]])
                target = np.array([i for i, e in enumerate(data.examples)
                                   if e.identity in rooms[dst]])
                rng = np.random.default_rng(seed)
                train = rng.permutation(train)
                n_val = max(1, len(train) // 6)
                tasks.append(("cross-room", f"{src}->{dst}", train[n_val:], train[:n_val],
                              target, seed))
    results: dict[str, dict[str, list[Any]]] = {}
    rockets: dict[int, np.ndarray] = {}
    if args.tasks:
        tasks = [t for t in tasks if t[1] in args.tasks.split(",")]
    if args.max_tasks:
        counted: dict[str, int] = {}
        capped = []
        for t in tasks:
            counted[t[0]] = counted.get(t[0], 0) + 1
            if counted[t[0]] <= args.max_tasks:
                capped.append(t)
        tasks = capped
    setting_of = {"random": "wiar-learning-curve" if name == "wiar" else None,
                  "cross-session": "cross-session", "cross-room": "cross-room"}
    for protocol, task, tr, va, te, seed in tasks:
        t0 = time.perf_counter()
        identity = protocol == "random" and n_id > 0
        opts = TrainOptions(epochs=args.epochs, seed=seed, threads=args.threads,
                            segment_dropout=args.segment_dropout,
                            head_complete=args.head_complete)
        source = np.concatenate([tr, va])
        # The anchors' MiniRocket biases are fitted once per dataset and seed, without labels,
        # on windows of every recording (test ones included): one transform of every window
        # instead of one per task, at a slight advantage to the anchors, never to ours.
        if seed not in rockets:
            rockets[seed] = win.rocket(np.arange(len(data)), seed, CACHE)
        rocket = rockets[seed]
        if args.anchors_only:
            # The anchors' rows without a bundle: the splits and the support draws are
            # ours' (they depend only on activities and seeds), so the rows merge with
            # ours' rows of the same task (--render-only --merge-from).
            if protocol in protocols:
                entry = results.setdefault(protocol, {"ours": [], "anchors": [], "tasks": []})
                entry["anchors"].append(run_anchors(
                    win, rocket, source, te, n_act, n_id, identity=protocol == "random"
                    and n_id > 0, seed=seed, threads=args.threads, fits=fits))
                entry["tasks"].append(run_name(task, seed, args.seeds))
            only = setting_of[protocol]
            if only is not None and only in settings:
                def task_log(line: str, prefix: str = f"{name} {task}: ") -> None:
                    log(prefix + line)

                few.setdefault(only, {})[f"{task}/seed{seed}"] = few_shot_anchors(
                    win, rocket, te, n_act, shots, args.draws, source=source,
                    source_shots=source_shots, threads=args.threads, fits=fits,
                    log=task_log)
            if partial is not None:
                partial(_summarise(report, results, few))
            log(f"{name} {protocol:13s} {task:14s} seed {seed}: anchors only "
                f"{time.perf_counter() - t0:.0f} s")
            continue
        entry = results.setdefault(protocol, {"ours": [], "anchors": [], "tasks": []})
        layout = f"-l0-{args.level0.replace(',', '-')}" if args.level0 else ""
        layout += f"-pb{args.profile_blocks}" if args.profile_blocks > 1 else ""
        layout += "-hc" if args.head_complete else ""
        kept = CACHE / "bundles" / name / f"{protocol}-{task.replace('/', '')}-{seed}{layout}"
        split = {"protocol": protocol, "task": task, "seed": seed, "train": tr.tolist(),
                 "val": va.tolist(), "test": te.tolist(), "epochs": args.epochs,
                 "segment_dropout": args.segment_dropout, "level0": args.level0,
                 **({"profile_blocks": args.profile_blocks} if args.profile_blocks > 1 else {}),
                 **({"head_complete": True} if args.head_complete else {})}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "b"
            if args.reuse and (kept / "split.json").is_file() and json.loads(
                    (kept / "split.json").read_text()) == split:
                # The same task trained earlier with the same options (an interrupted run).
                model, edge = CloudModel.load(kept), EdgeEncoder(kept)
                bundle_dir = kept
            else:
                bundle_dir = folder
                model, edge = train_ours(data, spec, acts, ids, tr, va, opts, folder, identity,
                                         {**level0_layout(args.level0),
                                          "profile_blocks": args.profile_blocks})
                if args.keep_bundles:
                    shutil.rmtree(kept, ignore_errors=True)
                    shutil.copytree(folder, kept)
                    (kept / "split.json").write_text(json.dumps(split))
            if protocol in protocols:
                held_out = np.setdiff1d(va, tr)
                live = args.live and protocol == "random" and bool(
                    (data.activity[held_out] >= 0).any())
                if live:
                    # Evaluated calibrated, as `csi train` would have written it: the same
                    # per-recording and full-window figures (the temperature keeps the
                    # argmax), and the live reading and smoothed label as the service gives
                    # them.
                    calibrated = calibrated_copy(bundle_dir, data, held_out, Path(tmp))
                    scored = CloudModel.load(calibrated), EdgeEncoder(calibrated)
                else:
                    scored = model, edge
                summary = evaluate_bundle(*scored, data, te).summary
                if live:
                    scores = score_live(calibrated, data, te, args.live_orders)
                    for lv, extra in zip(summary["levels"], scores, strict=True):
                        lv.update(extra)
                else:  # an uncalibrated bundle (temperature 1, the default stay): not shown
                    for lv in summary["levels"]:
                        lv.pop("activity_accuracy_live_per_second", None)
                        lv.pop("activity_accuracy_smoothed_per_second", None)
                    if args.live and protocol == "random":
                        log(f"{name} {task}: no labelled validation recording, no live "
                            "figures")
                entry["ours"].append(_ours_row(summary))
                entry["anchors"].append(run_anchors(win, rocket, source, te, n_act, n_id,
                                                    identity=identity, seed=seed,
                                                    threads=args.threads, fits=fits))
                entry["tasks"].append(run_name(task, seed, args.seeds))
            setting = setting_of[protocol]
            if setting in settings:
                few.setdefault(setting, {})[f"{task}/seed{seed}"] = few_shot(
                    model, edge, data, te, shots, args.draws, win=win, rocket=rocket,
                    source=source, source_shots=source_shots, threads=args.threads)
        if partial is not None:
            partial(_summarise(report, results, few))
        low = entry["ours"][-1]["levels"][0] if entry["ours"] and protocol in protocols \
            else None
        log(f"{name} {protocol:13s} {task:14s} seed {seed}: ours level 0 "
            + (f"{low['activity_accuracy']:.3f} / {low['activity_accuracy_per_second']:.3f} "
               f"per s, minirocket {entry['anchors'][-1]['minirocket']['activity_accuracy']:.3f}"
               if low else "(few-shot only)")
            + f"  {time.perf_counter() - t0:.0f} s")
    return _summarise(report, results, few)


def run_name(task: str, seed: int, seeds: int) -> str:
    """A task's name in the results: with several seeds, each seed's run of it apart (the
    per-task scores are keyed by it)."""
    return task if seeds == 1 else f"{task}/seed{seed}"


def seeds_of(task_names: list[str]) -> int:
    """How many seeds a protocol's runs span (names from :func:`run_name`)."""
    return len({name.rpartition("/seed")[2] if "/seed" in name else "0"
                for name in task_names})


def _summarise(report: dict[str, Any], results: dict[str, dict[str, list[Any]]],
               few: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The dataset's section from the tasks run so far."""
    report = {**report, "protocols": {}}
    for protocol, entry in results.items():
        if not entry["ours"]:
            if entry["anchors"]:  # --anchors-only: merged into ours' entry of the protocol
                report["protocols"][protocol] = {
                    "anchors_only": True, "tasks": len(entry["anchors"]),
                    "seeds": seeds_of(entry["tasks"]),
                    "task_names": list(entry["tasks"]),
                    "anchors": {a: aggregate([r[a] for r in entry["anchors"]])
                                for a in ANCHORS},
                    "per_task": {t: {a: r[a]["activity_accuracy"] for a in ANCHORS}
                                 for t, r in zip(entry["tasks"], entry["anchors"],
                                                 strict=True)}}
            continue
        report["protocols"][protocol] = {
            "tasks": len(entry["ours"]),
            "seeds": seeds_of(entry["tasks"]),
            "task_names": list(entry["tasks"]),
            "ours": _aggregate_ours(entry["ours"]),
            "anchors": {a: aggregate([r[a] for r in entry["anchors"]]) for a in ANCHORS},
            "per_task": {t: {"ours_level0": o["levels"][0]["activity_accuracy"],
                             **({"ours_level0_live": o["levels"][0]["activity_accuracy_live"]}
                                if "activity_accuracy_live" in o["levels"][0] else {}),
                             **{a: r[a]["activity_accuracy"] for a in ANCHORS}}
                         for t, o, r in zip(entry["tasks"], entry["ours"], entry["anchors"],
                                            strict=True)},
        }
    if few:
        report["few_shot"] = {s: {"runs": runs, "mean": _few_mean(runs)}
                              for s, runs in few.items()}
    return report


def _merge_runs(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Runs of a few-shot setting, ``new``'s methods added to ``old``'s; a method's scores
    measured again replace its earlier ones, the others stay (e.g. per-recording scores of a
    ``--anchor-fits last`` run next to the per-second scores measured before)."""
    out = {run: {k: {m: dict(v) for m, v in methods.items()} for k, methods in ks.items()}
           for run, ks in old.items()}
    for run, ks in new.items():
        for k, methods in ks.items():
            for method, scores in methods.items():
                out.setdefault(run, {}).setdefault(k, {}).setdefault(method, {}).update(scores)
    return out


def _merge_protocol(protocols: dict[str, Any], protocol: str,
                    section: dict[str, Any]) -> dict[str, Any]:
    """A protocol's section added to ``protocols``; an ``--anchors-only`` section replaces the
    anchors' scores of ours' section measured on the same tasks (its scores key by key)."""
    mine = protocols.get(protocol)
    if mine is not None and mine.get("anchors_only") and not section.get("anchors_only"):
        mine, section = section, mine  # the anchors came first: ours' section takes them
    elif not section.get("anchors_only") or mine is None or mine.get("anchors_only"):
        return {**protocols, protocol: section}
    if mine["task_names"] != section["task_names"]:
        raise ValueError(f"{protocol}: the anchors ran on tasks {section['task_names']}, "
                         f"ours on {mine['task_names']}")
    merged = {**mine, "anchors": {a: {**mine["anchors"].get(a, {}), **scores}
                                  for a, scores in section["anchors"].items()},
              "per_task": {t: {**mine["per_task"][t], **section["per_task"][t]}
                           for t in mine["per_task"]}}
    return {**protocols, protocol: merged}


def _few_mean(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Mean over the setting's directions/folds (and seeds) of each K's method means. A score
    measured on some of the K's runs only (the anchors' per-second scores where the runs of
    later seeds fitted the last windows alone; a method run on some seeds only) gets no
    mean: one over fewer runs would stand next to the others' as if it were theirs. The
    anchors' CPU timings (``*_cpu_s``) are the mean of the runs that timed them."""
    out: dict[str, Any] = {}
    at_k: dict[str, int] = {}
    for run in runs.values():
        for k, methods in run.items():
            at_k[k] = at_k.get(k, 0) + 1
            for method, metrics in methods.items():
                for key, value in metrics.items():
                    out.setdefault(k, {}).setdefault(method, {}).setdefault(key, []).append(
                        value["mean"])
    means: dict[str, Any] = {}
    for k, methods in out.items():
        for m, metrics in methods.items():
            kept = {key: round(float(np.mean(v)), 4) for key, v in metrics.items()
                    if len(v) == at_k[k] or m.endswith("_cpu_s")}
            if kept:
                means.setdefault(k, {})[m] = kept
    return means


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets (lowest rate level, <= 20 payload B/s) against the measured means."""
    out: dict[str, Any] = {}
    for name, ds in report["datasets"].items():
        entry: dict[str, Any] = {}
        for protocol, section in ds["protocols"].items():
            if section.get("anchors_only"):
                continue
            low = section["ours"]["levels"][0]
            unq = section["ours"]["unquantized"]["activity_accuracy"]["mean"]
            row = {"lowest_level_payload_bytes_per_s": low["payload_bytes_per_s"]["mean"],
                   "lowest_level_within_20_bytes": low["payload_bytes_per_s"]["mean"] <= 20,
                   "activity": low["activity_accuracy"]["mean"],
                   "activity_per_second": low["activity_accuracy_per_second"]["mean"],
                   "unquantized_activity": unq,
                   "worst_level_cost_points": round(100 * max(
                       unq - lv["activity_accuracy"]["mean"]
                       for lv in section["ours"]["levels"]), 2),
                   "anchors_activity": {a: section["anchors"][a]["activity_accuracy"]["mean"]
                                        for a in ANCHORS}}
            # Per recording is one window a recording: on a test split of tens of recordings
            # its paired 95% interval spans +-5 to 10 points (bench/compression_cost.py), so
            # the per-second cost (every prediction the service makes) is reported next to it.
            unq_s = section["ours"]["unquantized"]["activity_accuracy_per_second"]["mean"]
            row["worst_level_cost_points_per_second"] = round(100 * max(
                unq_s - lv["activity_accuracy_per_second"]["mean"]
                for lv in section["ours"]["levels"]), 2)
            row["compression_costs_at_most_1_point"] = row["worst_level_cost_points"] <= 1
            if all("activity_accuracy_live" in lv for lv in section["ours"]["levels"]):
                row["live_label"] = live_targets(section)
                # Each task against its own per-recording figure, level 0.
                per_task = [t for t in section["per_task"].values() if "ours_level0_live" in t]
                met = sum(t["ours_level0_live"] >= t["ours_level0"] - LIVE_MARGIN
                          for t in per_task)
                row["live_label_level0_tasks_met"] = f"{met} of {len(per_task)}"
            if "identity_accuracy" in low:
                row["identity"] = low["identity_accuracy"]["mean"]
                row["anchors_identity"] = {
                    a: section["anchors"][a]["identity_accuracy"]["mean"] for a in ANCHORS
                    if "identity_accuracy" in section["anchors"][a]}
            if name == "wiar" and protocol == "random":
                row["target_activity_0_95"] = row["activity"] >= 0.95
            if name == "fition" and protocol == "random":
                row["target_activity_0_71"] = row["activity"] >= 0.71
                row["target_identity_0_84"] = row.get("identity", 0) >= 0.84
                # "At least the fusion baseline": 0.84 was its figure outside the project.
                row["target_identity_at_least_fusion"] = row.get("identity", 0) >= row.get(
                    "anchors_identity", {}).get("fusion", 1.0)
            entry[protocol] = row
        for setting, few in ds.get("few_shot", {}).items():
            mean = few["mean"]
            if not mean or not all("ours_adapted" in m for m in mean.values()):
                continue  # no support draw left a test recording (a tiny folder)
            k = str(max(int(x) for x in mean))
            methods = mean[k]
            ours = methods["ours_adapted"]["level0_activity_accuracy"]
            best_name, best = max(
                ((m, v["activity_accuracy"]) for m, v in methods.items()
                 if not m.startswith("ours") and "activity_accuracy" in v),
                key=lambda mv: mv[1])
            # "In every setting": each direction/fold on its own (mean over its draws).
            per_run = {}
            for run, per_k in few["runs"].items():
                if k not in per_k or "ours_adapted" not in per_k[k]:
                    continue
                run_best = _best({m: {"activity_accuracy": v["activity_accuracy"]["mean"]}
                                  for m, v in per_k[k].items() if "activity_accuracy" in v
                                  and not m.startswith("ours")}, "")
                if run_best is None:
                    continue
                run_ours = per_k[k]["ours_adapted"]["level0_activity_accuracy"]["mean"]
                per_run[run] = {"ours_adapted_level0": run_ours,
                                "best_baseline": run_best[0],
                                "best_baseline_activity": run_best[1],
                                "at_least_best_baseline": run_ours >= run_best[1]}
            entry[f"few-shot {setting}"] = {
                "shots": int(k), "ours_before_level0": methods["ours_before"][
                    "level0_activity_accuracy"],
                "ours_adapted_level0": ours,
                "ours_support_only_level0": methods["ours_support_only"][
                    "level0_activity_accuracy"],
                "best_baseline": best_name, "best_baseline_activity": best,
                "at_least_best_baseline": ours >= best,
                "baselines_with_source": any(m.endswith("_source_and_support")
                                             for m in methods),
                "at_least_support_only": ours >= methods["ours_support_only"][
                    "level0_activity_accuracy"],
                "per_run": per_run,
                "at_least_best_baseline_in_every_run": bool(per_run) and all(
                    r["at_least_best_baseline"] for r in per_run.values())}
            if setting == "cross-session":
                entry[f"few-shot {setting}"]["target_0_70"] = ours >= 0.70
        out[name] = entry
    return out


def live_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level, the live label's per-second accuracy (mean over the tasks) against the
    per-recording figure (mean over the tasks) minus :data:`LIVE_MARGIN`."""
    out = []
    for lv in section["ours"]["levels"]:
        per_recording = lv["activity_accuracy"]["mean"]
        live = lv["activity_accuracy_live"]["mean"]
        target = round(per_recording - LIVE_MARGIN, 4)
        out.append({"level": lv["level"], "per_recording": per_recording,
                    "live_smoothed": live,
                    "live_raw": lv["activity_accuracy_live_raw"]["mean"],
                    "live_settled": lv["activity_accuracy_live_settled"]["mean"],
                    "target": target, "met": live >= target,
                    "margin": round(live - target, 4)})
    return out


def plot(report: dict[str, Any], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, ds in report["datasets"].items():
        protocols = list(ds["protocols"])
        fig, axes = plt.subplots(1, max(1, len(protocols)) + (1 if "few_shot" in ds else 0),
                                 figsize=(5.5 * (len(protocols) + 1), 4), squeeze=False)
        for ax, protocol in zip(axes[0], protocols, strict=False):
            sec = ds["protocols"][protocol]
            labels = [f"ours L{lv['level']}\n{lv['payload_bytes_per_s']['mean']:.0f} B/s"
                      for lv in sec["ours"]["levels"]] + ["ours\nunquantized", *ANCHORS]
            rows = [*sec["ours"]["levels"], sec["ours"]["unquantized"],
                    *[sec["anchors"][a] for a in ANCHORS]]
            x = np.arange(len(rows))
            for off, key, label in ((-0.2, "activity_accuracy", "per recording"),
                                    (0.2, "activity_accuracy_per_second", "per second")):
                # A score a run did not measure (the anchors' per-second scores of an
                # --anchor-fits last run) is no bar, not an error after hours of work.
                ax.bar(x + off, [r.get(key, {}).get("mean", np.nan) for r in rows], 0.4,
                       yerr=[r.get(key, {}).get("std", np.nan) for r in rows], label=label)
            ax.set_xticks(x, labels, fontsize=7, rotation=45, ha="right")
            ax.set_ylim(0, 1)
            ax.set_title(f"{name} {protocol}: activity")
            ax.legend(fontsize=7)
        if "few_shot" in ds:
            ax = axes[0][-1]
            for setting, few in ds["few_shot"].items():
                mean = few["mean"]
                ks = sorted(int(k) for k in mean
                            if all(m in mean[k] for m in ("ours_adapted", "ours_support_only",
                                                          "minirocket_support_only",
                                                          "fusion_support_only")))
                for method, style in (("ours_adapted", "-o"), ("ours_support_only", "--o"),
                                      ("minirocket_support_only", ":s"),
                                      ("fusion_support_only", ":^"),
                                      ("fusion_source_and_support", "-.^")):
                    key = ("level0_activity_accuracy" if method.startswith("ours")
                           else "activity_accuracy")
                    if all(method in mean[str(k)] for k in ks):
                        ax.plot(ks, [mean[str(k)][method][key] for k in ks], style,
                                label=f"{setting}: {method}")
            ax.set_xlabel("labelled recordings per activity (K)")
            ax.set_ylabel("activity accuracy (level 0 for ours)")
            ax.set_title(f"{name}: few-shot in a new setting")
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = folder / f"model_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    return written


def _f(v: Any) -> str:
    if isinstance(v, dict):
        return f"{v['mean']:.3f} ± {v['std']:.3f}" if "std" in v else f"{v['mean']:.3f}"
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _best(methods: dict[str, Any], suffix: str) -> tuple[str, float] | None:
    """The anchor with the highest mean activity accuracy among ``*<suffix>`` methods."""
    found = [(v["activity_accuracy"], m) for m, v in methods.items()
             if m.endswith(suffix) and "activity_accuracy" in v]
    return (max(found)[1], max(found)[0]) if found else None


def _source_note(ds: dict[str, Any]) -> str:
    meta = ds.get("few_shot_source_and_support")
    if not meta:
        return ""
    return (f" Source + support: {meta['source_windows']}; the support's windows get "
            f"{meta['support_share']:.0%} of the total training weight (fixed a priori).")


def few_shot_table(few: dict[str, Any]) -> list[str]:
    """One setting's few-shot summary (markdown lines): per K, ours before and after ``csi
    adapt`` (level 0; with the mean prior weight it chose), every anchor on the support alone
    and on the source plus the support, and the best of all those baselines; then, at the
    largest K, the same per direction/fold (the target is "in every setting"). Activity
    accuracy per recording."""
    mean, runs = few["mean"], few["runs"]
    ks = sorted(mean, key=int)
    names = {"minirocket": "MiniRocket", "profile_knn": "kNN", "stats_boosting": "boosting",
             "fusion": "fusion"}

    def cells(methods: dict[str, Any]) -> list[str]:
        row = [_f(methods.get(m, {}).get("level0_activity_accuracy"))
               for m in ("ours_before", "ours_adapted")]
        lam = methods.get("ours_adapted", {}).get("level0_prior_weight")
        if lam is not None:
            row[1] += f" (lam {lam:.2f})"
        for suffix in ("_support_only", "_source_and_support"):
            row.append(" / ".join(_f(methods.get(a + suffix, {}).get("activity_accuracy"))
                                  for a in ANCHORS))
        best = _best(methods, "")
        ours = methods.get("ours_adapted", {}).get("level0_activity_accuracy")
        row.append("-" if best is None else
                   f"{best[1]:.3f} ({best[0].replace('_', ' ')})")
        row.append("-" if best is None or ours is None else f"{100 * (ours - best[1]):+.1f}")
        return row

    anchors = " / ".join(names[a] for a in ANCHORS)
    head = ["before", "adapted", f"support only: {anchors}", f"source + support: {anchors}",
            "best baseline", "adapted - best (points)"]
    lines = ["| K | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    lines += [f"| {k} | " + " | ".join(cells(mean[k])) + " |" for k in ks]
    top = ks[-1] if ks else None
    # A direction's runs of every seed, averaged (a run is "<direction>/seed<N>").
    directions: dict[str, dict[str, Any]] = {}
    for run, per_k in runs.items():
        directions.setdefault(run.rsplit("/seed", 1)[0], {})[run] = per_k
    if top is not None and len(directions) > 1:
        seeds = max(len(of) for of in directions.values())
        over = f"the {seeds} seeds and " if seeds > 1 else ""
        lines += ["", f"At K = {top}, per direction (mean over {over}the support draws):", "",
                  "| direction | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for direction, of in sorted(directions.items()):
            flat = _few_mean({r: per_k for r, per_k in of.items() if top in per_k}).get(top)
            if flat:
                lines.append(f"| {direction} | " + " | ".join(cells(flat)) + " |")
    return lines


def render(report: dict[str, Any], name: str) -> str:
    """The report.md section of one dataset, from the results (never typed by hand)."""
    ds = report["datasets"][name]
    lines = ["## Against the anchors, every protocol (bench/model.py)", "",
             f"`python bench/model.py` (results in `bench/results/model.json`, plot "
             f"`bench/results/model_{name}.png`): {report['folds']}-fold by recording, "
             f"{report['epochs']} epochs; anchors read uncompressed "
             "CSI. Accuracy per recording (window ending at its last segment) / per second "
             "(every prediction the service makes while it streams). Mean ± std over tasks.",
             ""]
    for protocol, sec in ds["protocols"].items():
        has_id = "identity_accuracy" in sec["ours"]["levels"][0]
        head = ["method", "payload B/s", "activity", "activity per second"]
        has_live = "activity_accuracy_live" in sec["ours"]["levels"][0]
        if has_live:
            head += ["live label per second (raw)"]
        if has_id:
            head += ["identity", "identity per second"]
        seeds = sec.get("seeds", report["seeds"])
        lines += [f"### {protocol} ({sec['tasks']} tasks, {seeds} seed{'s' * (seeds > 1)})",
                  "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows = [(f"ours, level {lv['level']}", lv) for lv in sec["ours"]["levels"]]
        rows += [("ours, uncompressed path", sec["ours"]["unquantized"])]
        rows += [(f"anchor: {a}", sec["anchors"][a]) for a in ANCHORS]
        for label, r in rows:
            cells = [label, _f(r.get("payload_bytes_per_s")), _f(r.get("activity_accuracy")),
                     _f(r.get("activity_accuracy_per_second"))]
            if has_live:
                cells += [f"{_f(r['activity_accuracy_live'])} "
                          f"({_f(r['activity_accuracy_live_raw'])})"
                          if "activity_accuracy_live" in r else "-"]
            if has_id:
                cells += [_f(r.get("identity_accuracy")),
                          _f(r.get("identity_accuracy_per_second"))]
            lines.append("| " + " | ".join(cells) + " |")
        if has_live:
            lines += ["", "Live label: what the service shows each second, the test "
                      "recordings end to end on one stream (each task's bundle calibrated "
                      "on its validation recordings; smoothed, and before the filter in "
                      "brackets)."]
        lines.append("")
    for setting, few in ds.get("few_shot", {}).items():
        mean = few["mean"]
        ks = sorted(mean, key=int)
        if not ks:
            continue
        methods = sorted({m for k in ks for m in mean[k]}
                         - {"anchors_cpu_s", "anchors_last_fit_cpu_s"})
        lines += [f"### few-shot: {setting} ({len(few['runs'])} settings x {report['draws']} "
                  "support draws; mean)", "",
                  "Activity accuracy per recording on the rest of the new setting; ours at "
                  "level 0 (the lowest rate); anchors on uncompressed CSI." + _source_note(ds),
                  "", *few_shot_table(few), "",
                  "Every method, per recording / per second:", "",
                  "| method | " + " | ".join(f"K={k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for m in methods:
            key = "level0_activity_accuracy" if m.startswith("ours") else "activity_accuracy"
            cells = [f"{_f(row[key])} / {_f(row.get(key + '_per_second'))}"
                     if key in (row := mean[k].get(m, {})) else "-" for k in ks]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        weights = [f"K={k}: {mean[k]['ours_adapted']['level0_prior_weight']:.2f}" for k in ks
                   if "level0_prior_weight" in mean[k].get("ours_adapted", {})]
        if weights:
            lines += ["", "Prior weight `csi adapt` chose at level 0 (mean; 0 = the support "
                      "alone, 1 = shrunk towards the bundle's weights): " + ", ".join(weights)]
        lines.append("")
    lines += ["### Targets", "", "```json", json.dumps(report["targets"].get(name, {}),
                                                       indent=1), "```", ""]
    return "\n".join(lines)


BEGIN, END = "<!-- bench-model:begin -->", "<!-- bench-model:end -->"


FEW_BEGIN, FEW_END = "<!-- bench-model-few-shot:begin -->", "<!-- bench-model-few-shot:end -->"


def write_sections(report: dict[str, Any]) -> list[str]:
    """Put each dataset's section into models/<dataset>/report.md (between markers), and the
    Fition cross-session few-shot table into docs/model.md."""
    written = []
    few = report["datasets"].get("fition", {}).get("few_shot", {}).get("cross-session")
    docs = ROOT / "docs" / "model.md"
    if few and docs.is_file():
        put_section(docs, FEW_BEGIN, FEW_END, "\n".join(
            [*few_shot_table(few), "", _source_note(report["datasets"]["fition"]).strip()]))
        written.append(str(docs.relative_to(ROOT)))
    for name in report["datasets"]:
        path = ROOT / "models" / name / "report.md"
        if not path.is_file():
            continue
        put_section(path, BEGIN, END, render(report, name))
        written.append(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="wiar,fition")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds FIRST_SEED..SEEDS-1 only (named as in a --seeds "
                             "SEEDS run), to add seeds to an earlier run with --merge-from")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=12,
                        help="network training epochs per task (the context head, which "
                             "classifies, is fitted in closed form afterwards)")
    parser.add_argument("--segment-dropout", type=float, default=0.5)
    parser.add_argument("--shots", default="1,3,5")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--source-anchors-shots", default="all",
                        help="few-shot: the K at which the anchors also train on the source "
                             "data plus the support ('all', or e.g. '5'; '' for none)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads, and the OpenMP threads of the anchors' boosting")
    parser.add_argument("--anchors-only", action="store_true",
                        help="only the anchors' rows (no bundle trained or loaded; the same "
                             "splits and support draws as ours), to merge with ours' rows "
                             "(--render-only --merge-from)")
    parser.add_argument("--anchor-fits", default=",".join(ANCHOR_FITS),
                        help="which anchor fits run: 'last' (per-recording scores, fitted on "
                             "each training recording's last window) and/or 'every' "
                             "(per-second scores, fitted on every window; the support-alone "
                             "few-shot rows use it for both)")
    parser.add_argument("--protocols", default="random,cross-session,few-shot",
                        help="few-shot alone runs only the few-shot settings (their bundles "
                             "trained or reused, no other protocol scored)")
    parser.add_argument("--few-shot-settings",
                        default="cross-session,cross-room,wiar-learning-curve",
                        help="which few-shot settings run (with --protocols few-shot)")
    parser.add_argument("--level0", default="",
                        help="LATENT,PROFILE: train ours with level 0 sending this many latent "
                             "channels and profile coefficients (default: ModelConfig's)")
    parser.add_argument("--profile-blocks", type=int, default=1,
                        help="train ours with this many profiles a segment (ModelConfig."
                             "profile_blocks; default 1, the segment's mean)")
    parser.add_argument("--head-complete", action="store_true",
                        help="train ours with the complete-window activity layer "
                             "(TrainOptions.head_complete; the WiAR bundle's choice, "
                             "docs/model.md \"Complete windows\")")
    parser.add_argument("--live", action=argparse.BooleanOptionalAction, default=True,
                        help="k-fold: also score what the service shows each second (the "
                             "bundle calibrated on the task's validation recordings, the test "
                             "recordings end to end through the live output and its filter)")
    parser.add_argument("--live-orders", type=int, default=3,
                        help="random orders the test recordings are streamed in (--live)")
    parser.add_argument("--methods", default="zstd")
    parser.add_argument("--keep-bundles", action=argparse.BooleanOptionalAction, default=True,
                        help="keep every trained bundle and its split under "
                             ".cache/bench/bundles (for bench/ablation.py)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model.json")
    parser.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse a kept bundle of the same task and options")
    parser.add_argument("--max-tasks", type=int, default=0,
                        help="run at most this many tasks per protocol (0: all); the "
                             "results say how many ran")
    parser.add_argument("--tasks", default="",
                        help="run only these tasks (comma-separated names, e.g. "
                             "user3->user4); the results list the tasks that ran")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other datasets' results already in --out")
    parser.add_argument("--render-only", action="store_true",
                        help="only recompute targets, plots and report sections of --out")
    parser.add_argument("--merge-from", type=Path, nargs="*", default=[],
                        help="with --render-only: add these results files' protocols")
    args = parser.parse_args()
    if not 0 <= args.first_seed < args.seeds:
        parser.error(f"--first-seed {args.first_seed} must be in 0..{args.seeds - 1} "
                     f"(--seeds {args.seeds})")
    if args.render_only:
        report = (json.loads(args.out.read_text()) if args.out.is_file() else
                  {"benchmark": "model", "seeds": args.seeds, "folds": args.folds,
                   "epochs": args.epochs, "segment_dropout": args.segment_dropout,
                   "shots": args.shots, "draws": args.draws, "datasets": {}})
        for extra in args.merge_from:
            # Protocols of the same dataset measured by another run (run in parallel), or
            # the partial results (<out>.partial-<dataset>.json) of an interrupted run.
            other = json.loads(extra.read_text())
            if "datasets" not in other:
                other = {"datasets": {extra.stem.rsplit("partial-", 1)[-1]: other}}
            for name, ds in other["datasets"].items():
                mine = report["datasets"].setdefault(name, ds)
                if mine is not ds:
                    for protocol, section in ds["protocols"].items():
                        mine["protocols"] = _merge_protocol(mine.get("protocols", {}),
                                                            protocol, section)
                    for setting, few in ds.get("few_shot", {}).items():
                        # Runs (directions, folds) of a setting measured apart add up, and
                        # so do the methods of one run measured apart (the anchors of
                        # --anchors-only next to ours); a method measured again replaces it.
                        runs = _merge_runs(mine.setdefault("few_shot", {}).get(
                            setting, {}).get("runs", {}), few["runs"])
                        mine["few_shot"][setting] = {"runs": runs, "mean": _few_mean(runs)}
                    if "few_shot_source_and_support" in ds:
                        mine["few_shot_source_and_support"] = ds["few_shot_source_and_support"]
        report["targets"] = targets(report)
        report["plots"] = plot(report, args.out.parent)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(write_sections(report))
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "model", "seeds": args.seeds, "folds": args.folds, "epochs": args.epochs,
        "segment_dropout": args.segment_dropout, "shots": args.shots, "draws": args.draws,
        "level0": level0_layout(args.level0) or "default",
        # A run that adds seeds to an earlier one says which of them it ran.
        **({"first_seed": args.first_seed} if args.first_seed else {}),
        "head_complete": args.head_complete,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": args.threads}, "environment": environment(), "datasets": {}}
    def save(name: str, section: dict[str, Any]) -> None:
        """Write what has run so far (a long run leaves its finished tasks behind)."""
        section = {**section, "seconds": round(time.perf_counter() - started, 1)}
        partial_out = args.out.with_name(args.out.stem + f".partial-{name}.json")
        partial_out.parent.mkdir(parents=True, exist_ok=True)
        partial_out.write_text(json.dumps(section, indent=1) + "\n")

    for name in args.datasets.split(","):
        report["datasets"][name] = run_dataset(
            name, args, lambda line: print(line, flush=True),
            partial=lambda section, name=name: save(name, section))
        report["datasets"][name]["seconds"] = round(time.perf_counter() - started, 1)
    if args.merge and args.out.is_file():
        # Datasets measured by an earlier run (e.g. the other dataset, run in parallel)
        # stay; those measured now replace theirs.
        earlier = json.loads(args.out.read_text()).get("datasets", {})
        report["datasets"] = {**{k: v for k, v in earlier.items()
                                 if k not in report["datasets"]}, **report["datasets"]}
    report["targets"] = targets(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Anchor rows alone plot nothing (the plot needs ours), and must not replace the plot.
    report["plots"] = plot(report, args.out.parent) if not args.anchors_only else []
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.out == ROOT / "bench" / "results" / "model.json":
        print("report sections:", write_sections(report))
    print(json.dumps(report["targets"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
