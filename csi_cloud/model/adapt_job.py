"""``csi adapt`` end to end, as the command and the service's adapt jobs run it: read the
labelled recordings of the new setting (and, for self-training, its unlabelled ones), pick
the support, adapt (:mod:`.adapt`), self-train where asked and where the guard keeps it
(:mod:`.self_training`), measure before and after on the recordings left out, and write
the derived bundle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from csi_edge.bundle import Bundle

from ..datasets import Example, index_dataset
from .adapt import (
    Method,
    _accuracy,
    adapt_codes,
    adapt_head,
    head_windows,
    load_codes,
    pick_support,
    shrinkage,
)
from .heads import Part, save_derived
from .network import ModelConfig
from .self_training import self_train

__all__ = ["LIVE_SETTINGS", "UNLABELLED_LIMIT", "adapt_bundle", "adapted_calibration",
           "unlabelled_examples"]

# At most this many unlabelled pieces of stream are read for self-training (the newest):
# the pseudo-labelling and the guard's refits grow with them.
UNLABELLED_LIMIT = 400


def unlabelled_examples(dataset: str, data_dir: Path, labelled: list[Example],
                        unlabelled_dir: Path | None, *, chunk_s: float,
                        limit: int = UNLABELLED_LIMIT) -> list[Example]:
    """The unlabelled recordings self-training reads. For the service's own ``recordings``:
    the stored stream outside every labelled range, in pieces of ``chunk_s`` seconds, the
    newest ``limit``, from the APs whose recordings are labelled (the folders of the
    labelled files: the rooms being taught, not every AP of the building), and from every
    file under ``unlabelled_dir``. For other datasets: every recording of ``unlabelled_dir``
    (its labels are not read), except files that are among the labelled ones."""
    if dataset == "recordings":
        from ..storage import unlabelled_ranges

        folders = {e.path.parent for e in labelled}
        files = {p for folder in folders for p in folder.glob("*.h5")}
        if unlabelled_dir is not None:
            files |= set(Path(unlabelled_dir).rglob("*.h5"))
        return [Example(path, "", None, None, path.stem, "", "hdf5", dataset, lo, hi)
                for path, lo, hi in unlabelled_ranges(sorted(files), chunk_s, limit)]
    if unlabelled_dir is None:
        raise ValueError(f"self-training on dataset {dataset!r} needs a folder of its "
                         "unlabelled recordings (--unlabelled); the service's own "
                         "recordings give theirs from the stream")
    seen = {e.recording_id for e in labelled}
    return [e for e in index_dataset(dataset, unlabelled_dir)
            if e.recording_id not in seen][-limit:]


def adapt_bundle(bundle: Path | Bundle, dataset: str, data_dir: Path, shots: int, out: Path, *,
                 seed: int = 0, part: Part = "classifier", epochs: int = 60,
                 method: Method = "ridge", name: str | None = None,
                 self_training: bool = False, unlabelled_dir: Path | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The ``csi adapt`` command: pick the support, fine-tune, write the derived bundle, and
    measure activity accuracy on the recordings left out, before and after.

    ``self_training``: then one round of self-training on the setting's unlabelled
    recordings (:func:`unlabelled_examples`), kept where its guard says it helps
    (:func:`~.self_training.self_train`; method ridge only); ``result["self_training"]``
    says what it did."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if self_training and method != "ridge":
        raise ValueError(f"self-training refits the context head towards the parent's: "
                         f"method {method!r} does not (use ridge)")
    bundle = Bundle.load(bundle)  # read once: the codes and the derived bundle use it
    examples = list(index_dataset(dataset, data_dir))
    pool_examples: list[Example] = []
    if self_training:
        pool_examples = unlabelled_examples(dataset, data_dir, examples, unlabelled_dir,
                                            chunk_s=_chunk_s(bundle, examples))
    model, codes = load_codes(bundle, dataset, data_dir, examples, unlabelled=pool_examples)
    labelled = np.flatnonzero(codes.activity >= 0)
    pool = np.flatnonzero(codes.activity < 0)
    support, query = pick_support(codes, labelled, shots, seed)
    if log:
        per = np.bincount(codes.activity[support])
        fewer = int((per[per > 0] < shots).sum())
        log(f"{len(support)} support recordings ({shots} per activity"
            + (f"; {fewer} activit{'y has' if fewer == 1 else 'ies have'} fewer here, all "
               "of whose recordings are in the support" if fewer else "")
            + f"), {len(query)} held out")
    # Measured on recordings the adaptation never saw; with none left over, on the support
    # itself, and then the result and the bundle say so (held_out false).
    held_out = bool(len(query))
    scored = query if held_out else support
    # The ridge methods only swap the head's activity layers: the features of every window
    # are computed once, for the fit and for every score before and after.
    windows = (head_windows(model.net, codes, np.union1d(np.union1d(support, scored), pool))
               if method in ("ridge", "ridge-alone") and model.net.context_head is not None
               else None)
    short_lengths = [int(k) for k in
                     (model.manifest.training.get("options") or {}).get("head_lengths") or ()]
    if windows is not None:
        adapted = adapt_head(model.net, codes, support, prior=method == "ridge",
                             windows=windows, short_lengths=short_lengths)
    else:
        if self_training:
            raise ValueError("self-training refits the context head: this bundle has none")
        adapted = adapt_codes(model.net, codes, support, part=part, epochs=epochs, seed=seed,
                              method=method)
    trained = None
    if self_training:
        assert windows is not None
        trained = self_train(model.net, adapted, codes, support, pool, windows=windows,
                             short_lengths=short_lengths, seed=seed)
        if log:
            log(f"self-training on {trained.unlabelled} unlabelled recordings: "
                + ("kept" if trained.kept else f"not kept ({trained.reason})")
                + (f"; guard on the held-out support {trained.guard.as_dict()}"
                   if trained.guard is not None else ""))
    result: dict[str, Any] = {
        "base": model.id, "dataset": dataset, "data": str(data_dir), "shots": shots,
        "seed": seed, "method": method, "part": part, "epochs": epochs,
        "support": len(support),
        "held_out": len(query),
        "support_recordings": [codes.names[i] for i in support.tolist()],
    }
    result["held_out_accuracy"] = held_out
    if trained is not None:
        result["self_training"] = trained.as_dict(model.manifest.labels["activity"])
        if trained.kept:  # the adapted head before self-training, for comparison
            result["self_training"]["activity_accuracy_without"] = _accuracy(
                adapted, codes, scored, windows=windows)
            adapted = trained.net
    for key, net in (("before", model.net), ("after", adapted)):
        result[f"activity_accuracy_{key}"] = _accuracy(net, codes, scored, windows=windows)
    for key, net in (("before", model.net), ("after", adapted)):
        result[f"activity_accuracy_per_second_{key}"] = _accuracy(net, codes, scored,
                                                                  every=True, windows=windows)
    if windows is not None:
        result["shrinkage"] = shrinkage(adapted)
    manifest = save_derived(
        bundle, out, adapted, name=name or out.name, held_out=held_out,
        calibration=adapted_calibration(model.manifest.calibration,
                                        head=model.net.context_head is not None),
        training={"kind": "few-shot adaptation", **{k: v for k, v in result.items()
                                                    if not k.startswith("activity")},
                  # what a later adaptation of this bundle refits its short layer on, and
                  # whether its head kept a complete-window layer
                  "options": {"head_lengths": short_lengths, "head_complete": any(
                      part.complete is not None for part in adapted.context_head.levels)
                      if adapted.context_head is not None else False}},
        metrics={"adaptation": {k: v for k, v in result.items()
                                if k.startswith("activity")
                                or k in ("shots", "held_out", "held_out_accuracy")}})
    result["bundle"] = manifest.id
    result["out"] = str(out)
    return result


def _chunk_s(bundle: Bundle, labelled: list[Example]) -> float:
    """How long each unlabelled piece of stream is: as long as the labelled ranges are
    (their median; a piece should hold one activity, as a labelled recording does), at least
    one context window and at most a minute."""
    context_s = (bundle.manifest.input_spec.segment_s
                 * ModelConfig.model_validate(bundle.manifest.model).context_segments)
    spans = [e.end - e.start for e in labelled if e.start is not None and e.end is not None]
    return float(np.clip(np.median(spans) if spans else context_s, context_s, 60.0))


# The live-output settings of calibration["activity"] an adapted bundle keeps.
LIVE_SETTINGS = ("temperature", "contexts", "stay", "threshold", "target_accuracy")


def adapted_calibration(parent: dict[str, Any], *, head: bool) -> dict[str, Any]:
    """The calibration of a bundle adapted from one calibrated as ``parent``.

    ``head``: the bundle's activity output is its context head's, which the ridge methods
    refit (the short-reading layer included) and the others leave as it is. The live
    output's settings then carry over: the lengths read, their temperatures and pool
    weights, the filter's stay and the abstention threshold. The setting's few labelled
    recordings are too few to fit them again, and without them the live output would read
    the full window alone and lag every change by the context length. On Fition's
    cross-session adaptations, live smoothed per-second accuracy at level 0 is 0.867 with the
    parent's settings and the short-reading layer refitted (:func:`adapt_head`), against
    0.569 without them (bench/adapt_live.py). ``fitted_on`` says where they came from. A
    bundle without a context head goes without (temperature 1, defaults): its fine-tuned
    network is another classifier than the one they were fitted for."""
    out = {k: v for k, v in parent.items() if k != "activity"}
    activity = parent.get("activity")
    if head and activity:
        # The settings only: the parent's diagnostics (NLL, ECE, the scores of each option)
        # describe its own head, not this one.
        out["activity"] = {
            **{k: activity[k] for k in LIVE_SETTINGS if k in activity},
            "fitted_on": "carried over from the parent bundle by csi adapt",
            "parent_fitted_on": activity.get("parent_fitted_on",
                                             activity.get("fitted_on", "unknown"))}
    return out


