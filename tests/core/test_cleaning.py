"""The audit's and suggest's math on planted data: out-of-fold heads, confident learning,
near-duplicates, outliers, typical-and-diverse picks."""

from __future__ import annotations

import torch

from graft.core.cleaning import (
    label_issues,
    near_duplicates,
    out_of_fold,
    outlier_scores,
    typical_and_diverse,
)
from graft.core.decisions import normalise


def _clusters(n_per: int, centres: int, dim: int = 32, seed: int = 0, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    c = normalise(torch.randn(centres, dim, generator=g))
    x = c.repeat_interleave(n_per, 0) + spread * torch.randn(n_per * centres, dim, generator=g)
    return normalise(x), torch.arange(centres).repeat_interleave(n_per)


def test_moved_labels_are_found_and_the_class_suggested():
    x, y = _clusters(40, 4, spread=0.1)
    noisy = y.clone()
    moved = [3, 50, 97, 141]
    for i in moved:
        noisy[i] = (y[i] + 1) % 4
    probs = out_of_fold(x, noisy, 4)
    found = {i: k for i, k, _ in label_issues(probs, noisy)}
    assert set(moved) <= set(found) and all(found[i] == y[i] for i in moved)
    assert len(found) <= len(moved) + 2  # precision: hardly anything else


def test_near_duplicates_and_outliers():
    x, _ = _clusters(30, 3, spread=0.1)
    copy = normalise(x[7:8] + 0.01 * torch.randn(1, 32, generator=torch.Generator().manual_seed(1)))
    far = normalise(torch.randn(1, 32, generator=torch.Generator().manual_seed(2)))
    data = torch.cat([x, copy, far])
    pairs = near_duplicates(data)
    assert [(i, j) for i, j, _ in pairs] == [(7, 90)] and pairs[0][2] > 0.99
    distance, fence = outlier_scores(data)
    assert distance[91] > fence and (distance[:90] <= fence).all()


def test_picks_cover_what_no_label_covers_first():
    x, y = _clusters(50, 4, spread=0.2)
    labelled = x[y == 0][:5]  # only cluster 0 has labels
    picks = typical_and_diverse(x, labelled, 3)
    assert sorted(int(y[i]) for i in picks) == [1, 2, 3]  # one typical image of each other
    assert len(set(typical_and_diverse(x, labelled, 40))) == 40  # never the same image twice
