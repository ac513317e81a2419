"""Metrics against known values: Wilson intervals, confusion matrix, per-class report."""

from __future__ import annotations

import pytest

from graft.core.metrics import (
    classification_report,
    confusion_matrix,
    most_confused,
    wilson_interval,
)


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [(50, 100, 0.4038, 0.5962), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0)],  # textbook values
)
def test_wilson_interval(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_report_from_confusion_matrix():
    cm = confusion_matrix([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 0], 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    rep = classification_report(cm, ["a", "b", "c"])
    assert rep["accuracy"] == pytest.approx(4 / 6) and rep["n"] == 6
    assert rep["per_class"]["a"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert rep["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert rep["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert most_confused(cm, ["a", "b", "c"]) == [("a", "b", 1), ("c", "a", 1)]
