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


def test_above_cv_images_the_strength_is_chosen_on_a_subsample_then_scaled():
    from graft.training.calibrate import calibrate_fitted

    x, y = _blobs(100, 3, 16, spread=4.0, seed=5)
    views = 2
    g = torch.Generator().manual_seed(6)
    aug = x.repeat_interleave(views, 0) + 0.1 * torch.randn(len(x) * views, 16, generator=g)
    image = torch.arange(len(y))
    xs = torch.cat([x[::2], aug.view(len(y), views, 16)[::2].flatten(0, 1)])
    ys = torch.cat([y[::2], y[::2].repeat_interleave(views)])
    groups = torch.cat([image[:150], image[:150].repeat_interleave(views)])
    fitted = fit_logistic_cv(xs, ys, 3, groups=groups, cv_images=60)
    sub = fitted.subsample
    assert sub["images"] == 60 and sub["of"] == 150
    assert fitted.l2 == sub["l2"] * 60 / 150 and sub["l2"] in L2_GRID
    # the out-of-fold scores cover the subsample's images, each class in its share
    assert fitted.oof_images.tolist() == sorted(fitted.oof_images.tolist())
    assert torch.bincount(y[::2][fitted.oof_images]).tolist() == [20, 20, 20]
    assert fitted.oof_logits.shape == (60, 3) and len(fitted.path) == len(L2_GRID)
    assert "subsample of 60 of the 150 training images" in fitted.record()["chosen_by"]
    held_out = (fitted.linear()(x[1::2]).argmax(1) == y[1::2]).float().mean()
    assert held_out >= 0.85
    # the same choice as the cross-validation of those 60 images (with their views) alone
    alone = torch.isin(groups, fitted.oof_images)
    again = fit_logistic_cv(xs[alone], ys[alone], 3, groups=groups[alone], cv_images=None)
    assert again.l2 == sub["l2"] and torch.equal(again.oof_logits, fitted.oof_logits)
    # calibration reads the scored images' own labels
    record = calibrate_fitted(fitted, y[::2]).record
    assert "60 of the 150 training images" in record["fitted_on"]
    # at or below the limit nothing changes
    assert fit_logistic_cv(xs, ys, 3, groups=groups, cv_images=150).subsample is None
