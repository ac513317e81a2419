"""Decisions: the rule (a class, unknown or review), the thresholds a target chooses, the
unknown score's distance and threshold, and every bad --target in one line."""

from __future__ import annotations

import re

import pytest
import torch

from graft.core.decisions import (
    Policy,
    Target,
    Threshold,
    choose_threshold,
    fit_unknown,
    knn_distance,
    normalise,
    operating_report,
    parse_target,
    parse_targets,
)
from graft.core.errors import ConfigError

CLASSES = ("approved", "not_suitable", "risked")


def test_the_rule_class_review_or_unknown():
    policy = Policy(
        CLASSES,
        {"approved": Threshold("precision", 0.99, 0.9), "risked": Threshold("recall", 0.95, 0.15)},
        unknown_threshold=0.5,
    )
    probs = torch.tensor(
        [
            [0.95, 0.03, 0.02],  # approved clears its precision threshold
            [0.85, 0.10, 0.05],  # approved but below 0.9, nobody else claims it: review
            [0.60, 0.05, 0.35],  # risked's recall threshold claims it, approved does not
            [0.10, 0.70, 0.20],  # not_suitable (arg-max) and risked both claim it: review
            [0.05, 0.90, 0.05],  # not_suitable alone
            [0.95, 0.03, 0.02],  # far from every training image
        ]
    )
    unknown = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.7])
    assert policy.decide(probs, unknown) == [
        "approved",
        "review",
        "risked",
        "review",
        "not_suitable",
        "unknown",
    ]
    assert Policy(CLASSES).decide(probs) == ["approved"] * 3 + ["not_suitable"] * 2 + ["approved"]


def test_a_recall_target_is_met_with_the_conformal_rank():
    # 19 images of class 0 with scores 0.05 .. 0.95: recall 0.9 needs the ceil(0.9 * 20) = 18th
    # highest, so that a new image of the class reaches it 90% of the time
    own = torch.linspace(0.05, 0.95, 19)
    probs = torch.stack([own, 1 - own], 1)
    labels = torch.zeros(19, dtype=torch.long)
    t = choose_threshold(probs, labels, 0, Target("a", "recall", 0.9))
    assert t == pytest.approx(own.sort(descending=True).values[17].item())
    assert (own >= t).float().mean() >= 0.9
    with pytest.raises(ConfigError) as e:
        choose_threshold(probs, labels, 0, Target("a", "recall", 0.96))
    assert str(e.value) == (
        "--target a:recall=0.96: 19 held-out image(s) of 'a' can promise a recall of 0.950 at "
        "most (0.96 needs 24 or more); lower the target or add images of the class"
    )


def test_a_precision_target_takes_the_lowest_threshold_that_meets_it():
    # class 0 decided on 10 images, highest first: right x6, wrong, right x2, wrong
    p0 = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.90])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 0, 0, 1])
    probs = torch.stack([p0, 1 - p0], 1)
    assert choose_threshold(probs, labels, 0, Target("a", "precision", 1.0)) == pytest.approx(0.94)
    t = choose_threshold(probs, labels, 0, Target("a", "precision", 0.85))
    assert t == pytest.approx(0.91)  # 8 of 9 right above it; 8 of 10 at 0.90
    with pytest.raises(ConfigError, match=r"no threshold reaches a precision of 1 for 'b'"):
        choose_threshold(probs, 1 - labels, 0, Target("b", "precision", 1.0))


def test_knn_distance_and_its_threshold():
    g = torch.Generator().manual_seed(0)
    centres = normalise(torch.randn(4, 64, generator=g)) * 10
    train = normalise(centres.repeat_interleave(100, 0) + torch.randn(400, 64, generator=g))
    new = normalise(centres.repeat_interleave(250, 0) + torch.randn(1000, 64, generator=g))
    far = normalise(torch.randn(500, 64, generator=g))
    u = fit_unknown(train)
    assert u["k"] == 1 and u["references"] == 400 and u["flag_rate"] == 0.05
    flagged_new = (knn_distance(new, train, u["k"]) > u["threshold"]).float().mean()
    flagged_far = (knn_distance(far, train, u["k"]) > u["threshold"]).float().mean()
    assert 0.02 <= flagged_new <= 0.09 and flagged_far == 1.0
    # an image among the references is at distance 0 from itself, unless left out
    assert knn_distance(train[:3], train, 1).abs().max() < 1e-5
    assert (knn_distance(train[:3], train[:3], 1, leave_one_out=True) > 0).all()


def test_operating_report_counts_and_intervals():
    report = operating_report(
        ["a", "a", "review", "b", "unknown", "b"], [0, 0, 0, 1, 1, 0], ["a", "b"]
    )
    a, b = report["per_class"]["a"], report["per_class"]["b"]
    assert a["precision"]["value"] == 1.0 and a["recall"]["value"] == 0.5
    assert a["review"]["value"] == 0.25 and a["caught"]["value"] == 0.75
    assert b["precision"]["value"] == 0.5 and b["unknown"]["value"] == 0.5
    assert report["review"]["value"] == pytest.approx(1 / 6, abs=1e-6)
    assert a["recall"]["ci95"] == [0.15, 0.85]


@pytest.mark.parametrize(
    "text, message",
    [
        ("risked=0.9", "--target 'risked=0.9': write CLASS:recall=X or CLASS:precision=X"),
        ("risked:f1=0.9", "--target 'risked:f1=0.9': 'f1' is not recall or precision"),
        ("risked:recall=1.5", "the recall must be a number in (0, 1], got '1.5'"),
        ("risked:recall=0", "the recall must be a number in (0, 1], got '0'"),
        ("risked:recall=nan", "the recall must be a number in (0, 1], got 'nan'"),
        ("risk:recall=0.9", "there is no class 'risk' (did you mean: risked?); the classes are"),
    ],
)
def test_bad_targets_are_named(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_target(text, CLASSES)


def test_one_target_per_class():
    assert parse_targets(["risked:recall=0.95", "approved:precision=0.99"], CLASSES)[1] == Target(
        "approved", "precision", 0.99
    )
    with pytest.raises(ConfigError, match="--target names 'risked' twice"):
        parse_targets(["risked:recall=0.95", "risked:precision=0.5"], CLASSES)
