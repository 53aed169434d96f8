"""bench/refit_head.py without data: the report's notes it keeps when it writes the report
anew (those added by hand), with and without a Notes heading."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
from _bench import bench_module

GENERATED = "On Fition each user was recorded in one room and one session, so identity"


@pytest.fixture(scope="module")
def refit() -> Iterator[ModuleType]:
    with bench_module("refit_head") as module:
        yield module


def _report(notes: str) -> str:
    return ("# x: model report\n\n| level | a |\n|---|---|\n| 0 | 1 |\n\n"
            "![training curves](training_curves.png)\n![rate](rate_accuracy.png)\n"
            f"{notes}\n<!-- trust:begin -->\n- a bench's bullet\n<!-- trust:end -->\n")


def test_hand_notes_keep_what_no_code_writes(refit: ModuleType) -> None:
    text = _report(
        "\n## Notes\n\n"
        f"- {GENERATED} accuracy measures recognising the session.\n"
        "- Identity mixes the head's ridge layer with the nearest training windows.\n"
        f"- {refit.REFIT_NOTE} on one machine (x), after it fitted the head again.\n"
        "- A note added by hand,\n  over two lines.\n")
    assert refit.hand_notes(text, [GENERATED + " accuracy"]) == [
        "A note added by hand, over two lines."]


def test_hand_notes_without_a_heading_are_the_bullets_after_the_plots(
        refit: ModuleType) -> None:
    text = _report("\n- Added by hand, with no Notes heading.\n")
    assert refit.hand_notes(text, []) == ["Added by hand, with no Notes heading."]
    assert refit.hand_notes(_report(""), []) == []
