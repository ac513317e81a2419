"""Calibration math: the temperature fit finds a known temperature, the scores measure what they
claim, and the raw softmax is recovered from calibrated probabilities."""

from __future__ import annotations

import torch

from graft.core.calibration import fit_temperature, raw_probabilities, scores


def _sampled(n: int, t_true: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits / t_true): calibrated at t_true exactly."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 5, generator=g) * 3
    labels = torch.multinomial((logits / t_true).softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


def test_the_fit_recovers_the_temperature_the_labels_were_drawn_at():
    for t_true in (0.5, 1.0, 2.5):
        logits, labels = _sampled(20_000, t_true)
        assert abs(fit_temperature(logits, labels) - t_true) < 0.1 * t_true


def test_calibrated_probabilities_score_better_than_overconfident_ones():
    logits, labels = _sampled(20_000, 2.0)
    over = scores(logits.softmax(1), labels)  # the raw softmax is too sure: T should be 2
    right = scores((logits / 2.0).softmax(1), labels)
    assert over["ece"] > 0.05 and right["ece"] < 0.02
    assert right["nll"] < over["nll"] and over["confidence"] > over["accuracy"]
    assert right["accuracy"] == over["accuracy"]  # the ranking, and so the accuracy, stays


def test_scores_on_a_case_worked_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    s = scores(probs, torch.tensor([0, 1]))
    assert s["accuracy"] == 0.5 and abs(s["confidence"] - 0.75) < 1e-6
    # bins: 0.9 (right, gap 0.1) and 0.6 (wrong, gap 0.6), each half the images
    assert abs(s["ece"] - 0.35) < 1e-6
    assert abs(s["nll"] - (-(torch.tensor(0.9).log() + torch.tensor(0.4).log()) / 2)) < 1e-5


def test_the_raw_softmax_is_recovered_from_calibrated_probabilities():
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(1)) * 4
    recovered = raw_probabilities((logits / 1.7).softmax(1), 1.7)
    assert torch.allclose(recovered, logits.softmax(1), atol=1e-5)


def test_scores_that_are_all_right_are_not_sharpened_to_the_bound():
    """Every held-out score right: the NLL falls as T -> 0, so the plain fit would go to the
    lower bound and call every unseen image certain. Against Platt's targets T is finite and the
    mean probability of the true class lands near (n + 1) / (n + 2) (n = 40 a class here)."""
    from graft.core.calibration import T_RANGE

    g = torch.Generator().manual_seed(2)
    labels = torch.arange(3).repeat(40)
    logits = torch.randn(120, 3, generator=g)
    logits[torch.arange(120), labels] += 4.0  # every top class right, margins varied
    assert bool((logits.argmax(1) == labels).all())
    t = fit_temperature(logits, labels)
    assert T_RANGE[0] * 2 < t < T_RANGE[1]
    p_true = (logits / t).softmax(1)[torch.arange(120), labels].mean()
    assert abs(float(p_true) - 41 / 42) < 0.02
    # one wrong score makes the NLL's minimum finite again: the labels themselves are used
    logits[0] = torch.tensor([0.0, 5.0, 0.0])
    plain = fit_temperature(logits, labels)
    assert plain != t and T_RANGE[0] < plain < T_RANGE[1]
