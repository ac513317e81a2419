"""Metrics: accuracy, confusion matrix, per-class precision/recall/F1, Wilson intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(targets: Sequence[int], preds: Sequence[int], num_classes: int) -> np.ndarray:
    """cm[i, j] = images of true class i predicted as j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(targets, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: honest for small n and for 0% or 100%."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def classification_report(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy (with its 95% interval) and per-class precision, recall, F1 and support."""
    n = int(cm.sum())
    correct = int(np.trace(cm))
    per_class = {}
    for i, name in enumerate(classes):
        tp = int(cm[i, i])
        predicted, support = int(cm[:, i].sum()), int(cm[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    lo, hi = wilson_interval(correct, n)
    supported = [v for v in per_class.values() if v["support"]]
    return {
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci95": [lo, hi],
        "balanced_accuracy": float(np.mean([v["recall"] for v in supported])) if supported else 0.0,
        "n": n,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }


def most_confused(cm: np.ndarray, classes: Sequence[str], k: int = 5) -> list[tuple[str, str, int]]:
    """(true, predicted, count) off-diagonal pairs, most frequent first."""
    pairs = [
        (classes[i], classes[j], int(cm[i, j]))
        for i in range(len(classes))
        for j in range(len(classes))
        if i != j and cm[i, j] > 0
    ]
    return sorted(pairs, key=lambda t: -t[2])[:k]
