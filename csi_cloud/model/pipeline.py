"""Train a bundle end to end, and evaluate one on any folder of a registered dataset."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from csi_edge.bundle import Bundle, EdgeEncoder, write_manifest

from ..datasets import Example, index_dataset, random_split
from .compression import CloudModel
from .data import SegmentData, input_spec_for, load_segments
from .evaluate import Evaluation, evaluate_bundle
from .fitting import fit
from .report import write_report
from .train import EpochLog, TrainOptions

__all__ = ["evaluate_folder", "prepare", "report_notes", "train_bundle"]


def prepare(dataset: str, data_dir: Path, **spec_options: Any) -> tuple[SegmentData, Any,
                                                                       list[str], list[str]]:
    """Index a dataset and preprocess every recording: (data, spec, activities, identities)."""
    index = index_dataset(dataset, data_dir)
    examples: list[Example] = list(index)
    spec = input_spec_for(examples, **spec_options)
    activities = sorted({e.activity for e in examples})
    identities = sorted({e.identity for e in examples if e.identity})
    return load_segments(examples, spec, activities, identities), spec, activities, identities


def _indices(data: SegmentData, examples: Sequence[Example]) -> np.ndarray:
    position = {id(e): i for i, e in enumerate(data.examples)}
    return np.array([position[id(e)] for e in examples if id(e) in position], dtype=np.int64)


def train_bundle(dataset: str, data_dir: Path, out: Path, opts: TrainOptions, *,
                 model: dict[str, Any] | None = None, val: float = 0.15, test: float = 0.15,
                 progress: Callable[[EpochLog], None] | None = None,
                 protocols: list[str] | None = None, protocol_folds: int = 5,
                 protocol_seeds: int = 1,
                 log: Callable[[str], None] | None = None) -> tuple[Any, Evaluation]:
    """The ``csi train`` command: split by recording, train, bundle, evaluate, report; with
    ``protocols``, also the cross-validated protocols (extra trainings) for the report."""
    from .protocols import run_protocols

    started = time.perf_counter()
    data, spec, activities, identities = prepare(dataset, data_dir)
    split = random_split(data.examples, seed=opts.seed, val=val, test=test)
    train_recs, val_recs = _indices(data, split.train), _indices(data, split.val)
    test_recs = _indices(data, split.test)
    if len(val_recs) == 0:  # tiny datasets: validate on the training recordings
        val_recs = train_recs
    if len(test_recs) == 0:
        test_recs = val_recs
    held_out = not np.isin(test_recs, np.concatenate([train_recs, val_recs])).any()
    training = {"dataset": dataset, "data_dir": data_dir.name, "recordings": len(data),
                "split": f"random by recording, stratified by activity, val {val}, test {test}",
                "seed": opts.seed, "train": len(train_recs), "val": len(val_recs),
                "test": len(test_recs), "skipped": data.skipped,
                "dropped": data.dropped.as_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "bundle"
        checkpoints = out.with_name(out.name + ".checkpoints")
        result, manifest = fit(data, spec, activities, identities, train_recs, val_recs, opts,
                               staging, name=out.name, model=model, training=training,
                               progress=progress, checkpoints=checkpoints)
        bundle = Bundle(staging, manifest)  # as ``fit`` wrote it: not read back
        cloud = CloudModel.load(bundle)
        evaluation = evaluate_bundle(cloud, EdgeEncoder(bundle), data, test_recs,
                                     dataset=dataset)
        training["seconds_bundle"] = round(time.perf_counter() - started, 1)
        protocol_results = (
            run_protocols(data, spec, activities, identities, protocols, opts,
                          folds=protocol_folds, seeds=protocol_seeds, model=model, log=log)
            if protocols else None)
        training["seconds_total"] = round(time.perf_counter() - started, 1)
        manifest.metrics = {"test_split": evaluation.summary,
                            **({"protocols": protocol_results} if protocol_results else {})}
        manifest.training = {**manifest.training, **training}
        manifest.held_out = held_out
        # Metrics are not part of the id (it covers weights and behaviour only).
        write_manifest(staging, manifest)
        notes = report_notes(dataset, cloud)
        write_report(staging, manifest=manifest.model_dump(mode="json"),
                     history=[asdict(h) for h in result.history], evaluation=evaluation,
                     protocols=protocol_results, notes=notes)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)
        shutil.rmtree(checkpoints, ignore_errors=True)  # the bundle now holds the weights
    return manifest, evaluation


def evaluate_folder(bundle: Path, dataset: str, data_dir: Path) -> Evaluation:
    """Evaluate a bundle on every recording of a dataset folder (seen or not)."""
    from .robustness import load_folder

    loaded = Bundle.load(bundle)
    data = load_folder(loaded, dataset, data_dir)
    return evaluate_bundle(CloudModel.load(loaded), EdgeEncoder(loaded), data,
                           np.arange(len(data)), dataset=dataset)


def report_notes(dataset: str, cloud: CloudModel) -> list[str]:
    """The notes of a bundle's report: what its figures mean on ``dataset``, and how its head
    reads identity."""
    notes = []
    if dataset == "fition":
        notes.append("On Fition each user was recorded in one room and one session, so "
                     "identity accuracy measures recognising the session and room as much as "
                     "the person; a random split by recording also rewards recognising the "
                     "session. Cross-session activity accuracy is the honest number.")
    head = cloud.net.context_head
    mixed = [] if head is None else [(i, part.neighbours) for i, part in enumerate(head.levels)
                                     if part.neighbours is not None]
    if head is not None and mixed:
        where = ", ".join(
            f"{'unquantized' if i == len(head.levels) - 1 else f'level {i}'}: "
            f"{nn.k} neighbours, weight {nn.weight:g}" for i, nn in mixed if nn is not None)
        notes.append("Identity mixes the head's ridge layer with the nearest training windows "
                     "by window-mean profile, where the validation windows chose it "
                     f"(docs/model.md, \"Identity neighbours\"): {where}.")
    return notes
