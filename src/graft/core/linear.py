"""A softmax (multinomial logistic) regression on fixed features, solved to convergence by L-BFGS,
its L2 strength chosen by cross-validation: extract's default head, and the audit's fold heads.

A linear head on frozen features is a convex problem: it has one answer, and no epochs, learning
rate or schedule to choose. The standard protocol for a linear probe (CLIP, Radford et al. 2021,
appendix A.3) fits L-BFGS logistic regression and sweeps the L2 strength on held-out data; here
the sweep is a k-fold cross-validation on the training images (augmented views, when there are
any, are extra samples in their image's fold: no view scores another view of itself), scored by
the out-of-fold log-loss, walked from strong to weak regularisation with the fold heads warm-
started from the previous strength, until PAST_BEST strengths past the best loss (the weak end of
the grid is the slow end). The k fold heads are solved as one problem (`_lbfgs`: one pass over
the features a step serves all of them), and the head on all samples starts from their mean at
the strength chosen. The loss and gradient are written out rather than differentiated by
autograd: L-BFGS evaluates them thousands of times. The features are divided by their mean norm
first, so one grid serves every backbone; the scale is folded back into the weights, so the head
is a plain `nn.Linear` on the backbone's features, as an epoch-trained one.

Above `CV_IMAGES` images the strength is chosen on a stratified subsample of that many (each with
its views), scaled by subsample / all (the penalty is on the mean loss: the same prior weighs
1/N as much against N images), and the head is then fitted once on all of them: the path costs
the same at 5,000 images as at 1,000 (on 5,000 Fashion-MNIST images' lite0 features, 27-36 s
became 8-10 s for the same unseen accuracy; with the fold heads solved as one problem, 2.4 s,
and 1.6 s on the centred features of `_lbfgs` on an idle machine: docs/QUALITY.md,
`bench/head_fit.py --fashion`).

>>> import torch
>>> x = torch.cat([torch.randn(40, 8) + 3, torch.randn(40, 8) - 3])
>>> y = torch.tensor([0] * 40 + [1] * 40)
>>> fitted = fit_logistic_cv(x, y, 2)
>>> bool((fitted.linear()(x).argmax(1) == y).all())
True
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# strong to weak, half a decade apart: the strengths chosen on bench/quality.py's seven sets
# (lite0 features scaled to unit mean norm) fell between 1e-5 and 3e-4
L2_GRID = tuple(10.0 ** (-e / 2) for e in range(0, 15))  # 1 .. 1e-7
FOLDS = 5
ITERATIONS = 50  # L-BFGS iterations per strength: warm-started, more changed no accuracy
NO_CV_L2 = 1e-4  # when a class has a single image there is nothing to cross-validate
CV_IMAGES = 1000  # above this many images, the strength is chosen on a subsample of this many
FINAL_ITERATIONS = 200  # the one fit on all images at the strength chosen: from the fold heads
PAST_BEST = 2  # the path stops this many strengths past its best out-of-fold loss
FOLD_ITERATIONS = 1000  # fold_logits: k heads from zeros at one strength, to convergence


@dataclass(frozen=True)
class FittedHead:
    """The head (weights on the backbone's features as they are), the L2 strength chosen and
    how: the cross-validation path and the out-of-fold logits of the training images at it."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    l2: float
    folds: int  # 0: too few images per class to cross-validate; l2 is NO_CV_L2
    path: list[dict[str, float]]  # per strength tried: {"l2", "cv_loss", "cv_acc"}
    oof_logits: torch.Tensor | None  # (images, C): each image scored by the fold head without it
    seconds: float
    # above CV_IMAGES: the images scored (positions among all images, in order), and how many
    # of how many chose the strength, and the strength they chose before scaling
    oof_images: torch.Tensor | None = None
    subsample: dict[str, float] | None = None
    # refit_logistic: fitted again on more images (val's too) after its strength was chosen
    refit: dict[str, float] | None = None

    def linear(self) -> torch.nn.Linear:
        head = torch.nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(self.weight)
            head.bias.copy_(self.bias)
        return head

    def record(self) -> dict:
        """What model.json keeps of it."""
        if not self.folds:
            how = f"no cross-validation (a class has one image): the default {NO_CV_L2:g}"
        elif self.subsample:
            m, n = f"{self.subsample['images']:.0f}", f"{self.subsample['of']:.0f}"
            how = (
                f"{self.folds}-fold cross-validation on a stratified subsample of {m} of the "
                f"{n} training images (out-of-fold log-loss), its choice "
                f"({self.subsample['l2']:g}) scaled by {m}/{n}"
            )
        else:
            how = (
                f"{self.folds}-fold cross-validation on the training images (out-of-fold log-loss)"
            )
        out = {
            "method": "lbfgs",
            "l2": self.l2,
            "chosen_by": how,
            "path": self.path,
            "seconds": round(self.seconds, 2),
        }
        if self.subsample:
            out["subsample"] = self.subsample
        return out


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    l2: float,
    *,
    class_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    head: torch.nn.Linear | None = None,
    max_iter: int = 200,
) -> torch.nn.Linear:
    """Minimise mean cross-entropy (class-weighted and label-smoothed as `F.cross_entropy`
    defines them) plus `l2` x the squared weights (not the bias) by L-BFGS from `head` (warm
    start) or zeros."""
    if head is None:
        head = torch.nn.Linear(x.shape[1], classes)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    q = _targets(y.long(), classes, class_weight, label_smoothing)
    with torch.no_grad():
        w, b = _lbfgs(x.float(), q[:, None], head.weight[None], head.bias[None], l2, max_iter)
        head.weight.copy_(w[0])
        head.bias.copy_(b[0])
    return head


def _lbfgs(
    x: torch.Tensor,
    q: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    l2: float,
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k softmax regressions on the same samples `x` (N, D) solved as one problem by L-BFGS, from
    `weight` (k, C, D) and `bias` (k, C): head f minimises sum_i,c q[i, f, c] (-log p_ifc) + l2
    |W_f|^2, q (N, k, C) being its targets (`_targets`; a sample it does not train on has a row of
    zeros). The k are independent, so their sum's minimum is each one's; one pass over x per
    step serves all k (the folds of a cross-validation), instead of k passes and k times the
    optimiser's own work. The loss and gradient are written out rather than differentiated by
    autograd: with r_if = sum_c q_ifc, the loss is sum r logsumexp(z) - sum q z, and its
    gradient in z is r softmax(z) - q. It is solved on the features centred (x - m, the bias
    b + W m: the same logits and penalty, so the same minimum): pooled features are all positive,
    and their mean direction, shared with the bias, is what slows L-BFGS down."""
    n, k, c = q.shape
    r = q.sum(-1, keepdim=True)
    m = x.mean(0)
    x = x - m
    w = torch.nn.Parameter(weight.reshape(k * c, -1).clone())
    b = torch.nn.Parameter(bias.reshape(k * c) + w.detach() @ m)
    opt = torch.optim.LBFGS(
        [w, b],
        max_iter=iters,
        history_size=10,
        tolerance_grad=1e-5,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        with torch.no_grad():
            z = torch.addmm(b, x, w.t()).view(n, k, c)
            lse = z.logsumexp(-1, keepdim=True)
            loss = (r * lse).sum() - (q * z).sum() + l2 * w.square().sum()
            g = z.sub_(lse).exp_().mul_(r).sub_(q).view(n, k * c)  # in place: z is spent
            w.grad = torch.addmm(w, g.t(), x, beta=2 * l2)
            b.grad = g.sum(0)
        return loss

    opt.step(closure)
    w = w.detach()
    return w.view(k, c, -1), (b.detach() - w @ m).view(k, c)


def _targets(
    y: torch.Tensor, classes: int, class_weight: torch.Tensor | None, label_smoothing: float
) -> torch.Tensor:
    """(N, C) weights q of -log p in `F.cross_entropy(z, y, weight, label_smoothing=s)`, mean
    reduction: ((1 - s) w_y [c = y] + s w_c / C) / sum_i w_yi (no weights: every w is 1)."""
    w = torch.ones(classes) if class_weight is None else class_weight.float()
    q = (label_smoothing / classes) * w.expand(len(y), classes).clone()
    q[torch.arange(len(y)), y] += (1 - label_smoothing) * w[y]
    return q / w[y].sum()


def fit_logistic_cv(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    *,
    groups: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    seed: int = 0,
    grid: tuple[float, ...] = L2_GRID,
    cv_images: int | None = CV_IMAGES,
) -> FittedHead:
    """The head on samples `x` (N, D) labelled `y`, its L2 strength chosen by k-fold
    cross-validation over images: `groups[i]` is the image sample i is a view of (default: each
    sample its own image), and a group's first sample is its plain (eval) view, the one scored.
    More than `cv_images` images (None: no limit): the strength is chosen on a stratified
    subsample of that many, then scaled (module docstring).
    """
    start = time.perf_counter()
    x, y = x.float(), y.long()
    groups = torch.arange(len(y)) if groups is None else groups.long()
    first = _first_of_each(groups)
    image_labels = y[first]
    counts = torch.bincount(image_labels, minlength=classes)
    k = min(FOLDS, int(counts[counts > 0].min())) if len(first) else 0
    kw = dict(class_weight=class_weight, label_smoothing=label_smoothing)
    scale = _scale(x)  # one grid for every backbone
    if k < 2:
        head = fit_logistic(x / scale, y, classes, NO_CV_L2, max_iter=FINAL_ITERATIONS, **kw)
        return _unscaled(head, scale, NO_CV_L2, 0, [], None, start)
    extra: dict = {}
    if cv_images is not None and len(first) > cv_images:
        keep = stratified_subsample(image_labels, cv_images, k, seed)
        mine = torch.isin(groups, groups[first[keep]])
        chosen, path, oof, warm = _cross_validate(
            x[mine], y[mine], groups[mine], classes, k, seed, grid, kw
        )
        l2 = chosen * len(keep) / len(first)
        sub = {"images": len(keep), "of": len(first), "l2": chosen}
        extra = dict(oof_images=keep, subsample=sub)
    else:
        l2, path, oof, warm = _cross_validate(x, y, groups, classes, k, seed, grid, kw)
    with torch.no_grad():  # the fold heads' mean, on the features as they are: a warm start
        warm.weight.mul_(scale)
    head = fit_logistic(x / scale, y, classes, l2, head=warm, max_iter=FINAL_ITERATIONS, **kw)
    return _unscaled(head, scale, l2, k, path, oof, start, **extra)


def refit_logistic(
    fitted: FittedHead,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    *,
    chosen_on: int,
    images: int,
    class_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> FittedHead:
    """`fitted`, whose strength was chosen on `chosen_on` images, fitted again on samples `x` of
    `images` images (those and more), warm-started from it: its strength scaled by chosen_on /
    images, as a subsample's choice is (the penalty is on the mean loss). Nothing is
    cross-validated again: the record (strength's path, out-of-fold scores) stays the first
    fit's, and `seconds` is the two fits' sum."""
    start = time.perf_counter()
    x = x.float()
    scale = _scale(x)
    l2 = fitted.l2 * chosen_on / images
    warm = fitted.linear()
    with torch.no_grad():  # the head reads x / scale: the scale goes into its weights
        warm.weight.mul_(scale)
    kw = dict(class_weight=class_weight, label_smoothing=label_smoothing)
    head = fit_logistic(x / scale, y, classes, l2, head=warm, max_iter=FINAL_ITERATIONS, **kw)
    with torch.no_grad():
        weight, bias = head.weight / scale, head.bias.clone()
    return dataclasses.replace(
        fitted,
        weight=weight.detach(),
        bias=bias.detach(),
        l2=l2,
        seconds=fitted.seconds + time.perf_counter() - start,
        refit={"images": images, "chosen_on": chosen_on, "l2_chosen": fitted.l2},
    )


def _cross_validate(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    classes: int,
    k: int,
    seed: int,
    grid: tuple[float, ...],
    kw: dict,
) -> tuple[float, list[dict[str, float]], torch.Tensor, torch.nn.Linear]:
    """Walk `grid` (strong to weak) with k fold heads, solved together (`_lbfgs`) and warm-
    started from the previous strength, until PAST_BEST strengths past the best out-of-fold
    log-loss. The strength chosen, the path, the out-of-fold logits there, and the fold heads'
    mean there (a warm start for the fit on all samples), on the features as they are (scaled
    here by their mean norm)."""
    scale = _scale(x)
    xs = x / scale
    first = _first_of_each(groups)
    image_labels = y[first]
    fold_of_image = fold_of(image_labels, k, seed)
    image_index = torch.empty(int(groups.max()) + 1, dtype=torch.long)
    image_index[groups[first]] = torch.arange(len(first))
    fold = fold_of_image[image_index[groups]]
    q = _fold_targets(y, fold, k, classes, **kw)
    weight, bias = torch.zeros(k, classes, x.shape[1]), torch.zeros(k, classes)
    scored = xs[first]
    path: list[dict[str, float]] = []
    best, chosen, oof, warm = math.inf, grid[0], None, None
    for i, strength in enumerate(grid):  # strong to weak, the k heads warm-started
        weight, bias = _lbfgs(xs, q, weight, bias, strength, ITERATIONS)
        logits = _held_out_logits(scored, weight, bias, fold_of_image)
        loss = float(F.cross_entropy(logits, image_labels))
        acc = float((logits.argmax(1) == image_labels).float().mean())
        path.append({"l2": strength, "cv_loss": round(loss, 6), "cv_acc": round(acc, 6)})
        if loss < best:
            best, chosen, oof = loss, strength, logits
            warm = torch.nn.Linear(x.shape[1], classes)
            with torch.no_grad():
                warm.weight.copy_(weight.mean(0) / scale)
                warm.bias.copy_(bias.mean(0))
        elif i - grid.index(chosen) >= PAST_BEST:
            break
    return chosen, path, oof, warm


def fold_logits(
    x: torch.Tensor, y: torch.Tensor, classes: int, k: int, seed: int, l2: float
) -> torch.Tensor:
    """(N, C) logits of each sample from the head, of k fitted at `l2` on stratified seeded folds
    (`fold_of`), that did not train on it: the k solved as one problem (`_lbfgs`) from zeros, to
    convergence, on the features divided by their mean norm as `fit_logistic_cv` divides them,
    so that a strength it chose means the same here (the audit's judges)."""
    xs = x.float() / _scale(x.float())
    fold = fold_of(y, k, seed)
    q = _fold_targets(y.long(), fold, k, classes)
    weight, bias = torch.zeros(k, classes, x.shape[1]), torch.zeros(k, classes)
    weight, bias = _lbfgs(xs, q, weight, bias, l2, FOLD_ITERATIONS)
    return _held_out_logits(xs, weight, bias, fold)


def _held_out_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, fold: torch.Tensor
) -> torch.Tensor:
    """(N, C) logits of sample i by head fold[i] of the k (`weight` (k, C, D), `bias` (k, C)):
    the head of its fold, which did not train on it. One matmul serves all k."""
    k, c = bias.shape
    with torch.no_grad():
        z = torch.addmm(bias.flatten(), x, weight.flatten(0, 1).t())
    return z.view(len(x), k, c)[torch.arange(len(x)), fold]


def _fold_targets(
    y: torch.Tensor,
    fold: torch.Tensor,
    k: int,
    classes: int,
    class_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """(N, k, C): fold f's head's targets (`_targets`), a row of zeros where sample i is in fold
    f (held out of that head)."""
    q = torch.zeros(len(y), k, classes)
    for f in range(k):
        q[fold != f, f] = _targets(y[fold != f], classes, class_weight, label_smoothing)
    return q


def _scale(x: torch.Tensor) -> float:
    """The samples' mean norm: features divided by it share one grid of strengths."""
    return float(x.norm(dim=1).mean().clamp_min(1e-12))


def _unscaled(
    head: torch.nn.Linear, scale: float, l2: float, folds: int, path, oof, start: float, **extra
) -> FittedHead:
    """The FittedHead of `head` fitted on features divided by `scale`: the scale folded into
    its weights, so it reads the features as they are; `start`: when the fit began."""
    with torch.no_grad():
        weight, bias = head.weight / scale, head.bias.clone()
    return FittedHead(
        weight.detach(), bias.detach(), l2, folds, path, oof, time.perf_counter() - start, **extra
    )


def _first_of_each(groups: torch.Tensor) -> torch.Tensor:
    """Index of each group's first sample, in order of first appearance."""
    seen: set[int] = set()
    out = []
    for i, g in enumerate(groups.tolist()):
        if g not in seen:
            seen.add(g)
            out.append(i)
    return torch.tensor(out, dtype=torch.long)


def stratified_subsample(labels: torch.Tensor, m: int, k: int, seed: int) -> torch.Tensor:
    """About `m` of the items, each class in its share (at least `k` of it, or all it has, so
    that k folds still each hold one), drawn in a seeded order; their indices, ascending."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique().tolist():
        mine = (labels == c).nonzero().flatten()
        take = min(len(mine), max(k, round(m * len(mine) / len(labels))))
        keep.append(mine[torch.randperm(len(mine), generator=g)[:take]])
    return torch.cat(keep).sort().values


def fold_of(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Stratified k folds: each item's fold, every class dealt round them in a seeded order."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique().tolist():
        mine = (labels == c).nonzero().flatten()
        fold[mine[torch.randperm(len(mine), generator=g)]] = torch.arange(len(mine)) % k
    return fold
