"""The training job's child process: ``python -m csi_cloud.job_runner JOB.json``.

It runs the spec :class:`csi_cloud.jobs.JobManager` wrote, reports on stdout as JSON lines
prefixed :data:`EVENT_PREFIX`, writes the bundle to the spec's ``out`` folder for the manager
to install, and exits when the service that started it is gone.

Subsets: ``max_recordings`` picks that many recordings (files), round-robin over the
activity classes in a seeded random order, and trains on a folder of symbolic links to them
in the job folder, so ``train_bundle`` runs unchanged. With a few recordings per class the
random split has no validation or test recording; ``train_bundle`` then validates and tests
on the training recordings, and the job's metrics say ``holdout: false``.

Modes ``adapt`` and ``enroll`` derive a bundle from the base model instead
(:mod:`csi_cloud.model.heads`): only the cloud-side classifier changes, the edge part and wire
id stay the base model's, so activating the result switches no AP. ``adapt`` fine-tunes on
``shots`` labelled recordings per activity (:func:`csi_cloud.model.adapt_job.adapt_bundle`);
``enroll`` adds ``identity`` from the codes stored for ``ranges`` of recorded AP streams
(``POST /identities`` queues it).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["EVENT_PREFIX", "main", "run_derive_job", "run_job"]

EVENT_PREFIX = "@job "


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(EVENT_PREFIX + json.dumps({"event": event, **fields}, default=str) + "\n")
    sys.stdout.flush()


def _watch_parent(parent: int) -> None:
    """Exit when the service that started this process is gone (no orphan trainings)."""
    def loop() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=loop, daemon=True, name="parent watch").start()


def _subset(kind: str, data_dir: Path, work: Path, limit: int | None,
            seed: int) -> tuple[Path, dict[str, Any]]:
    """A folder of links to at most ``limit`` recordings, round-robin over the classes."""
    import numpy as np

    from .datasets import index_dataset

    index = index_dataset(kind, data_dir)
    by_path: dict[Path, str] = {}
    for e in index.examples:
        by_path.setdefault(e.path, e.activity)
    info: dict[str, Any] = {"recordings_available": len(by_path)}
    if limit is None or len(by_path) <= limit:
        info["recordings_used"] = len(by_path)
        return data_dir, info
    rng = np.random.default_rng(seed)
    classes: dict[str, list[Path]] = {}
    for path, activity in sorted(by_path.items()):
        classes.setdefault(activity, []).append(path)
    queues = {c: [paths[i] for i in rng.permutation(len(paths))]
              for c, paths in sorted(classes.items())}
    picked: list[Path] = []
    while len(picked) < limit and any(queues.values()):
        for queue in queues.values():
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    root = work / "data" / index.root.name
    for path in picked:
        link = root / path.relative_to(index.root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    info["recordings_used"] = len(picked)
    return root, info


def run_derive_job(spec: dict[str, Any]) -> dict[str, Any]:
    """An ``adapt`` or ``enroll`` job: a derived bundle from the base model (in this process)."""
    import numpy as np
    import torch

    from csi_edge.bundle import Bundle

    from .model.adapt_job import adapt_bundle
    from .model.compression import CloudModel
    from .model.heads import codes_from_stored, enroll_identity, family_wire_ids, save_derived
    from .storage import safe_name

    torch.set_num_threads(int(spec["threads"]))
    base, out = Path(spec["base_folder"]), Path(spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec["mode"] == "adapt":
        _emit("log", line=f"adapting {base.name} with {spec['shots']} recordings per activity "
                          f"from {spec['kind']} at {spec['data_dir']}", progress=0.05)
        result = adapt_bundle(base, spec["kind"], Path(spec["data_dir"]), int(spec["shots"]),
                              out, seed=int(spec["seed"]), epochs=int(spec["epochs"]),
                              name=out.name, self_training=bool(spec.get("self_train")),
                              log=lambda line: _emit("log", line=line))
        return {k: v for k, v in result.items() if k != "support_recordings"}
    bundle = Bundle.load(base)  # read once: the model and the derived bundle use it
    model = CloudModel.load(bundle)
    recordings = Path(spec["recordings"])
    ranges = [(sorted((recordings / safe_name(r["site"]) / safe_name(r["ap"])).glob("*.h5")),
               float(r["start"]), float(r["end"])) for r in spec["ranges"]]
    _emit("log", line=f"enrolling {spec['identity']!r} from {len(ranges)} range(s) of "
                      f"recorded codes", progress=0.05)
    codes = codes_from_stored(model, ranges, wire_ids=family_wire_ids(base.parent))
    segments = int(codes.count.sum())
    net, stats = enroll_identity(model.net, model.manifest.calibration,
                                 codes, np.arange(len(codes)), seed=int(spec["seed"]))
    identities = [*(model.manifest.labels.get("identity") or []), spec["identity"]]
    manifest = save_derived(
        bundle, out, net, name=out.name,
        labels={**model.manifest.labels, "identity": identities},
        calibration={**model.manifest.calibration, "identity": stats},
        training={"kind": "identity enrollment", "identity": spec["identity"],
                  "ranges": spec["ranges"], "segments": segments, "job": spec["id"]})
    return {"name": manifest.name, "id": manifest.id, "identity": spec["identity"],
            "identities": identities, "segments": segments,
            "enrolled_windows": stats.get("enrolled_windows"),
            "enrolled_accepted": stats.get("enrolled_accepted")}


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one job's bundle (in this process); returns the metrics."""
    if spec.get("mode", "train") != "train":
        return run_derive_job(spec)
    import torch

    from csi_edge.bundle import write_manifest

    from .datasets import index_dataset, random_split
    from .model.pipeline import train_bundle
    from .model.train import TrainOptions

    torch.set_num_threads(int(spec["threads"]))
    epochs = int(spec["epochs"])
    work = Path(spec["work"])
    _emit("log", line=f"indexing {spec['kind']} at {spec['data_dir']}", progress=0.01)
    data_dir, info = _subset(spec["kind"], Path(spec["data_dir"]), work,
                             spec.get("max_recordings"), int(spec["seed"]))
    examples = list(index_dataset(spec["kind"], data_dir).examples)
    split = random_split(examples, seed=int(spec["seed"]))
    holdout = bool(split.test)
    _emit("log", line=f"training on {info['recordings_used']} of "
                      f"{info['recordings_available']} recordings ({len(examples)} examples); "
                      f"split train/val/test {len(split.train)}/{len(split.val)}/"
                      f"{len(split.test)}" + ("" if holdout else
                                              " (no held-out recording: tested on training)"),
          progress=0.03)
    opts = TrainOptions(epochs=epochs, seed=int(spec["seed"]), threads=int(spec["threads"]))
    started = time.perf_counter()
    ran = [0]

    def progress(entry: Any) -> None:
        ran[0] = entry.epoch + 1
        _emit("epoch", epoch=entry.epoch + 1, epochs=epochs, loss=entry.loss,
              val_activity=entry.val_activity, seconds=entry.seconds,
              progress=0.05 + 0.8 * (entry.epoch + 1) / epochs)

    out = Path(spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest, evaluation = train_bundle(spec["kind"], data_dir, out, opts, progress=progress,
                                        log=lambda line: _emit("log", line=str(line)))
    seconds = round(time.perf_counter() - started, 1)
    # The training section is not part of the bundle id: record where the bundle came from
    # (``manifest`` is what ``train_bundle`` wrote to ``out``: it is not read back).
    write_manifest(out, manifest.model_copy(update={"training": {
        **manifest.training, "job": spec["id"], "base_model": spec.get("base_model"),
        "data_dir": Path(data_dir).name, **info}}))
    summary = evaluation.summary
    training = manifest.training or {}
    levels = [{k: lv.get(k) for k in ("level", "payload_bytes_per_s", "activity_accuracy",
                                        "identity_accuracy", "nmse_db")}
              for lv in summary.get("levels", [])]
    unq = summary.get("unquantized") or {}
    return {
        "name": manifest.name, "id": manifest.id, "seconds": seconds,
        "epochs_run": ran[0],
        "best_epoch": training.get("best_epoch"),
        "recordings": training.get("recordings"), "train": training.get("train"),
        "val": training.get("val"), "test": training.get("test"), "holdout": holdout,
        "skipped": len(training.get("skipped") or {}), **info,
        "activity_accuracy": unq.get("activity_accuracy"),
        "identity_accuracy": unq.get("identity_accuracy"),
        "levels": levels,
    }


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m csi_cloud.job_runner JOB.json", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=UserWarning)
    spec = json.loads(Path(args[0]).read_text())
    if spec.get("parent_pid"):
        _watch_parent(int(spec["parent_pid"]))
    try:
        metrics = run_job(spec)
    except Exception as exc:
        _emit("error", error=f"{type(exc).__name__}: {exc}")
        return 1
    _emit("done", metrics=metrics, progress=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
