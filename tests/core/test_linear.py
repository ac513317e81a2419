"""The fitted head: L-BFGS softmax regression with its L2 chosen by cross-validation over images."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from graft.core.linear import L2_GRID, PAST_BEST, fit_logistic, fit_logistic_cv, refit_logistic


def _blobs(n_per: int, classes: int, dim: int, spread: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=g)
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(
        n_per * classes, dim, generator=g
    )
    return x, torch.arange(classes).repeat_interleave(n_per)


def _assert_walked_to_past_its_best(path: list[dict[str, float]]) -> None:
    """The path runs down the grid in order and stops PAST_BEST strengths past its best
    out-of-fold loss, or at the grid's end."""
    assert [r["l2"] for r in path] == list(L2_GRID[: len(path)])
    best = min(range(len(path)), key=lambda i: path[i]["cv_loss"])
    assert len(path) == min(len(L2_GRID), best + 1 + PAST_BEST)


def test_fitted_head_generalises_and_reports_its_path():
    x, y = _blobs(60, 3, 16, spread=4.0)
    fitted = fit_logistic_cv(x[::2], y[::2], 3)
    held_out = (fitted.linear()(x[1::2]).argmax(1) == y[1::2]).float().mean()
    assert held_out >= 0.85
    assert fitted.folds == 5
    _assert_walked_to_past_its_best(fitted.path)
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
    assert fitted.oof_logits.shape == (60, 3)
    _assert_walked_to_past_its_best(fitted.path)
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


def test_the_path_stops_two_strengths_past_its_best():
    """Overlapping classes: the out-of-fold loss has its minimum inside the grid, and the
    weaker strengths past it are not fitted."""
    x, y = _blobs(30, 3, 40, spread=9.0, seed=7)
    fitted = fit_logistic_cv(x, y, 3)
    _assert_walked_to_past_its_best(fitted.path)
    assert len(fitted.path) < len(L2_GRID)
    assert fitted.l2 == fitted.path[-1 - PAST_BEST]["l2"]
    best = min(r["cv_loss"] for r in fitted.path)
    assert all(r["cv_loss"] > best for r in fitted.path[-PAST_BEST:])


@pytest.mark.parametrize(
    "weighted, smoothing", [(False, 0.0), (True, 0.0), (False, 0.1), (True, 0.2)]
)
def test_the_written_out_gradient_minimises_cross_entropy_as_torch_defines_it(weighted, smoothing):
    """fit_logistic's own loss and gradient against F.cross_entropy's, differentiated by autograd
    in float64: the same minimum, class weights and label smoothing included. The features
    share a large mean (as pooled ones do), which the fit centres away and folds into the
    bias, and a warm start at the minimum stays there."""
    x, y = _blobs(25, 3, 6, spread=3.0, seed=8)
    x = x + 5.0
    x = x / x.norm(dim=1).mean()
    weight = torch.tensor([0.5, 1.0, 2.5]) if weighted else None
    l2 = 1e-2

    def objective(w, b, dtype=torch.float64):
        z = x.to(dtype) @ w.to(dtype).t() + b.to(dtype)
        cw = None if weight is None else weight.to(dtype)
        return (
            F.cross_entropy(z, y, weight=cw, label_smoothing=smoothing)
            + l2 * w.to(dtype).square().sum()
        )

    mine = fit_logistic(x, y, 3, l2, class_weight=weight, label_smoothing=smoothing, max_iter=500)
    w = torch.zeros(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        max_iter=1000,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = objective(w, b)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        reference = float(objective(w, b))
        reached = float(objective(mine.weight.detach(), mine.bias.detach()))
    assert reached - reference < 1e-6
    torch.testing.assert_close(mine.weight.detach().double(), w.detach(), atol=5e-3, rtol=0)
    torch.testing.assert_close(mine.bias.detach().double(), b.detach(), atol=5e-3, rtol=0)
    start = copy.deepcopy(mine)
    again = fit_logistic(x, y, 3, l2, class_weight=weight, label_smoothing=smoothing, head=start)
    torch.testing.assert_close(again.bias, mine.bias, atol=1e-4, rtol=0)
    torch.testing.assert_close(again.weight, mine.weight, atol=1e-4, rtol=0)


def test_heads_solved_together_reach_each_ones_own_minimum():
    """The k fold heads of the cross-validation are one L-BFGS problem (one pass over the
    features a step); each reaches the head fitted on its own training samples alone."""
    from graft.core.linear import _lbfgs, _targets, fold_of

    x, y = _blobs(20, 3, 8, spread=3.0, seed=9)
    x = x / x.norm(dim=1).mean()
    weight = torch.tensor([1.0, 2.0, 0.5])
    k, l2 = 4, 1e-2
    fold = fold_of(y, k, seed=0)
    q = torch.zeros(len(y), k, 3)
    for f in range(k):
        q[fold != f, f] = _targets(y[fold != f], 3, weight, 0.1)
    w, b = _lbfgs(x, q, torch.zeros(k, 3, 8), torch.zeros(k, 3), l2, iters=1000)
    for f in range(k):
        alone = fit_logistic(
            x[fold != f],
            y[fold != f],
            3,
            l2,
            class_weight=weight,
            label_smoothing=0.1,
            max_iter=1000,
        )
        torch.testing.assert_close(w[f], alone.weight.detach(), atol=5e-3, rtol=0)
        torch.testing.assert_close(b[f], alone.bias.detach(), atol=5e-3, rtol=0)


def test_fold_logits_score_each_sample_by_the_head_fitted_without_it():
    """The audit's judges: sample i's logits come from the head fitted on the other folds only,
    at the strength given, on the features divided by their mean norm as the cross-validated
    fit divides them (so a strength it chose means the same)."""
    from graft.core.linear import fold_logits, fold_of

    x, y = _blobs(15, 3, 8, spread=3.0, seed=10)
    x = x + 4.0  # a mean norm far from 1
    k, l2, scale = 3, 1e-2, x.norm(dim=1).mean()
    z = fold_logits(x, y, 3, k, seed=4, l2=l2)
    fold = fold_of(y, k, seed=4)
    for f in range(k):
        alone = fit_logistic(x[fold != f] / scale, y[fold != f], 3, l2, max_iter=1000)
        with torch.no_grad():
            torch.testing.assert_close(z[fold == f], alone(x[fold == f] / scale), atol=2e-3, rtol=0)


def test_refit_solves_the_larger_problem_at_the_scaled_strength():
    """The head fitted again on more images: its strength the first one's x chosen_on / images,
    and at it the penalised mean loss is at its minimum (no gradient left); the first fit's
    record (path, out-of-fold scores) is kept, the refit recorded beside it."""
    x, y = _blobs(40, 3, 12, spread=3.0, seed=2)
    first = fit_logistic_cv(x[:90], y[:90], 3)
    refit = refit_logistic(first, x, y, 3, chosen_on=90, images=120)
    assert refit.l2 == pytest.approx(first.l2 * 90 / 120)
    assert refit.refit == {"images": 120, "chosen_on": 90, "l2_chosen": first.l2}
    assert refit.path == first.path and refit.oof_logits is first.oof_logits
    assert not torch.equal(refit.weight, first.weight)
    scale = float(x.norm(dim=1).mean())  # the penalty is on the weights of x / scale

    def gradient(head) -> float:  # of the larger problem, in the weights of x / scale
        w = head.weight.clone().requires_grad_(True)
        b = head.bias.clone().requires_grad_(True)
        loss = F.cross_entropy(x @ w.t() + b, y) + refit.l2 * ((w * scale) ** 2).sum()
        gw, gb = torch.autograd.grad(loss, (w, b))
        return max(float(gw.abs().max()) / scale, float(gb.abs().max()))

    assert gradient(refit) < 1e-4 and gradient(first) > 10 * gradient(refit)
