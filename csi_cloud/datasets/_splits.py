"""Train/validation/test splits by recording, never by window.

Every function splits whole groups (by default the ``recording_id``, so every example and
every later window of one file lands on one side), sorts its input first and draws from a
seeded ``numpy.random.Generator``: the same examples and seed give the same split whatever
the input order.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ._layouts import FITION_SAME_ROOM_USERS
from ._model import LABEL_KEYS, Example

__all__ = ["Split", "cross_session_splits", "kfold", "random_split", "split_by"]

Examples = tuple[Example, ...]


@dataclass(frozen=True, slots=True)
class Split:
    """Three disjoint sets of examples."""

    train: Examples
    val: Examples
    test: Examples

    def parts(self) -> dict[str, Examples]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def counts(self, key: str = "activity") -> dict[str, dict[str, int]]:
        """Examples per value of ``key`` in each part."""
        return {
            part: dict(sorted(Counter(str(e.label(key)) for e in examples).items()))
            for part, examples in self.parts().items()
        }


def _sort_key(e: Example) -> tuple[str, str, float]:
    return (str(e.path), e.recording_id, -1.0 if e.start is None else e.start)


def _check_key(key: str, what: str) -> None:
    if key not in LABEL_KEYS:
        raise ValueError(f"unknown {what} key {key!r}; choose one of {', '.join(LABEL_KEYS)}")


def _groups(examples: Iterable[Example], group: str) -> dict[str, list[Example]]:
    """Examples by value of ``group``, each list and the dict in sorted order."""
    _check_key(group, "group")
    groups: dict[str, list[Example]] = defaultdict(list)
    for e in sorted(examples, key=_sort_key):
        value = e.label(group)
        if value is None:
            raise ValueError(f"cannot group by {group}: {e.path} has no {group}")
        groups[value].append(e)
    if not groups:
        raise ValueError("no examples to split")
    return dict(sorted(groups.items()))


def _strata(groups: dict[str, list[Example]], stratify: str | None) -> dict[str, list[str]]:
    """Group keys by the label they carry (the most common one where a group mixes labels)."""
    if stratify is None:
        return {"": list(groups)}
    _check_key(stratify, "stratify")
    strata: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        counts = Counter(str(e.label(stratify)) for e in members)
        label = min(counts, key=lambda v: (-counts[v], v))  # ties: the first value, sorted
        strata[label].append(key)
    return dict(sorted(strata.items()))


def _collect(groups: dict[str, list[Example]], keys: Iterable[str]) -> Examples:
    return tuple(sorted((e for k in keys for e in groups[k]), key=_sort_key))


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))  # half up: Python's round() sends 0.5 and 2.5 to even


def random_split(
    examples: Iterable[Example],
    seed: int,
    val: float = 0.15,
    test: float = 0.15,
    stratify: str | None = "activity",
    group: str = "recording_id",
) -> Split:
    """A seeded random split of whole groups, stratified by ``stratify`` (None: not).

    Each class gives round(n * test) groups to test and round(n * val) to validation, so a
    class with one recording stays in train.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val={val} and test={test} must be fractions adding up to less than 1")
    groups = _groups(examples, group)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for keys in _strata(groups, stratify).values():
        shuffled = [keys[i] for i in rng.permutation(len(keys))]
        n_test = min(len(keys), _round(len(keys) * test))
        n_val = min(len(keys) - n_test, _round(len(keys) * val))
        parts["test"] += shuffled[:n_test]
        parts["val"] += shuffled[n_test : n_test + n_val]
        parts["train"] += shuffled[n_test + n_val :]
    return Split(
        train=_collect(groups, parts["train"]),
        val=_collect(groups, parts["val"]),
        test=_collect(groups, parts["test"]),
    )


def kfold(
    examples: Iterable[Example],
    k: int,
    seed: int,
    stratify: str | None = "activity",
    group: str = "recording_id",
) -> list[tuple[Examples, Examples]]:
    """``k`` (train, test) folds of whole groups; every group is tested exactly once.

    Stratified: each class is shuffled and dealt round-robin over the folds, carrying on
    where the previous class stopped so fold sizes differ by at most one group.
    """
    groups = _groups(examples, group)
    if not 2 <= k <= len(groups):
        raise ValueError(f"k={k} must be between 2 and the number of {group}s ({len(groups)})")
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(k)]
    dealt = 0
    for keys in _strata(groups, stratify).values():
        for key in (keys[i] for i in rng.permutation(len(keys))):
            folds[dealt % k].append(key)
            dealt += 1
    return [
        (_collect(groups, (key for j, f in enumerate(folds) if j != i for key in f)),
         _collect(groups, fold))
        for i, fold in enumerate(folds)
    ]


def split_by(
    examples: Iterable[Example],
    key: str = "identity",
    test_values: Sequence[str] = (),
    val_values: Sequence[str] = (),
) -> Split:
    """Cross-domain split: examples whose ``key`` is in ``test_values`` (``val_values``) go to
    test (validation), the rest to train. Every value named must occur."""
    _check_key(key, "split")
    ordered = sorted(examples, key=_sort_key)
    missing = [e.path for e in ordered if e.label(key) is None]
    if missing:
        raise ValueError(f"cannot split by {key}: {len(missing)} examples have none, e.g. "
                         f"{missing[0]}")
    if not test_values:
        raise ValueError(f"name at least one {key} for the test set")
    overlap = sorted(set(test_values) & set(val_values))
    if overlap:
        raise ValueError(f"{key} values {overlap} are named for both test and validation")
    present = {str(e.label(key)) for e in ordered}
    absent = sorted((set(test_values) | set(val_values)) - present)
    if absent:
        raise ValueError(f"{key} values {absent} do not occur; present: {sorted(present)}")
    test_set, val_set = set(test_values), set(val_values)
    return Split(
        train=tuple(e for e in ordered if e.label(key) not in test_set | val_set),
        val=tuple(e for e in ordered if e.label(key) in val_set),
        test=tuple(e for e in ordered if e.label(key) in test_set),
    )


def cross_session_splits(
    examples: Iterable[Example],
    pairs: Sequence[tuple[str, str]] = FITION_SAME_ROOM_USERS,
    key: str = "identity",
) -> list[tuple[str, Examples, Examples]]:
    """Train on one member of each pair, test on the other, both directions.

    The default pairs are Fition's users recorded in the same physical room in different
    sessions (user1/user2, user3/user4): the activity accuracy that carries across sessions.
    Names read ``"user1->user2"`` (train on user1, test on user2).
    """
    _check_key(key, "split")
    by_value: dict[str, list[Example]] = defaultdict(list)
    for e in sorted(examples, key=_sort_key):
        by_value[str(e.label(key))].append(e)
    result: list[tuple[str, Examples, Examples]] = []
    for a, b in pairs:
        for train, test in ((a, b), (b, a)):
            for value in (train, test):
                if not by_value.get(value):
                    raise ValueError(
                        f"no example has {key} {value!r}; present: {sorted(by_value)}"
                    )
            result.append((f"{train}->{test}", tuple(by_value[train]), tuple(by_value[test])))
    return result
