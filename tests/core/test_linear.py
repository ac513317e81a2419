"""The fitted head: L-BFGS softmax regression with its L2 chosen by cross-validation over images."""

from __future__ import annotations

import torch

from graft.core.linear import L2_GRID, fit_logistic_cv


def _blobs(n_per: int, classes: int, dim: int, spread: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=g)
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(
        n_per * classes, dim, generator=g
    )
    return x, torch.arange(classes).repeat_interleave(n_per)


def test_fitted_head_generalises_and_reports_its_path():
    x, y = _blobs(60, 3, 16, spread=4.0)
    fitted = fit_logistic_cv(x[::2], y[::2], 3)
    held_out = (fitted.linear()(x[1::2]).argmax(1) == y[1::2]).float().mean()
    assert held_out >= 0.85
    assert fitted.folds == 5 and len(fitted.path) == len(L2_GRID)
    assert fitted.l2 == min(fitted.path, key=lambda r: r["cv_loss"])["l2"]
    assert fitted.oof_logits.shape == (90, 3)
    # the head works on the features as they are: scaling is folded into its weights
    assert fitted.weight.shape == (3, 16) and fitted.record()["method"] == "lbfgs"


def test_views_stay_in_their_images_fold():
    """Labels that are pure noise: if an image's copies landed in other folds, the out-of-fold
    scores would recognise them (near 1.0); kept together they are at chance."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 200, generator=g)
    y = torch.randint(0, 2, (60,), generator=g)
    views = 3
    xs = torch.cat([x, x.repeat_interleave(views, 0)])
    ys = torch.cat([y, y.repeat_interleave(views)])
    image = torch.arange(60)
    grouped = fit_logistic_cv(xs, ys, 2, groups=torch.cat([image, image.repeat_interleave(views)]))
    leaky = fit_logistic_cv(xs, ys, 2)  # every copy its own "image"
    acc = lambda f, labels: float((f.oof_logits.argmax(1) == labels).float().mean())  # noqa: E731
    assert acc(grouped, y) < 0.7
    assert acc(leaky, ys) > 0.95


def test_class_weights_raise_the_rare_class_recall():
    x, y = _blobs(200, 2, 8, spread=6.0, seed=3)
    keep = torch.cat([torch.arange(200), torch.arange(200, 220)])  # 200 against 20
    x, y = x[keep], y[keep]
    plain = fit_logistic_cv(x, y, 2).linear()
    weights = torch.tensor([220 / (2 * 200), 220 / (2 * 20)])
    balanced = fit_logistic_cv(x, y, 2, class_weight=weights).linear()
    test_x, test_y = _blobs(200, 2, 8, spread=6.0, seed=4)
    rare = test_y == 1
    recall = lambda h: float((h(test_x[rare]).argmax(1) == 1).float().mean())  # noqa: E731
    assert recall(balanced) > recall(plain) + 0.05


def test_a_class_with_one_image_gets_the_default_strength():
    x, y = _blobs(5, 2, 4, spread=0.5)
    fitted = fit_logistic_cv(x[:6], y[:6], 2)  # class 1 has one image
    assert fitted.folds == 0 and fitted.oof_logits is None and fitted.path == []
    assert "no cross-validation" in fitted.record()["chosen_by"]
