"""A softmax (multinomial logistic) regression on fixed features, solved to convergence by L-BFGS,
its L2 strength chosen by cross-validation: extract's default head, and the audit's fold heads.

A linear head on frozen features is a convex problem: it has one answer, and no epochs, learning
rate or schedule to choose. The standard protocol for a linear probe (CLIP, Radford et al. 2021,
appendix A.3) fits L-BFGS logistic regression and sweeps the L2 strength on held-out data; here
the sweep is a k-fold cross-validation on the training images (augmented views, when there are
any, are extra samples in their image's fold: no view scores another view of itself), scored by
the out-of-fold log-loss, walked from strong to weak regularisation with each fold's head warm-
started from the previous strength (seconds, not minutes). The features are divided by their mean
norm first, so one grid serves every backbone; the scale is folded back into the weights, so the
head is a plain `nn.Linear` on the backbone's features, as an epoch-trained one.

Above `CV_IMAGES` images the strength is chosen on a stratified subsample of that many (each with
its views), scaled by subsample / all (the penalty is on the mean loss: the same prior weighs
1/N as much against N images), and the head is then fitted once on all of them: the path costs
the same at 5,000 images as at 1,000 (on 5,000 Fashion-MNIST images' lite0 features, 27-36 s
became 8-10 s for the same unseen accuracy: docs/QUALITY.md, `bench/head_fit.py --fashion`).

>>> import torch
>>> x = torch.cat([torch.randn(40, 8) + 3, torch.randn(40, 8) - 3])
>>> y = torch.tensor([0] * 40 + [1] * 40)
>>> fitted = fit_logistic_cv(x, y, 2)
>>> bool((fitted.linear()(x).argmax(1) == y).all())
True
"""

from __future__ import annotations

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
FINAL_ITERATIONS = 200  # the one fit on all images after a subsample's choice: from zeros


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
    """Minimise mean cross-entropy (class-weighted as nn.CrossEntropyLoss weighs it) plus
    `l2` x the squared weights (not the bias) by L-BFGS from `head` (warm start) or zeros."""
    if head is None:
        head = torch.nn.Linear(x.shape[1], classes)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(
        head.parameters(),
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=1e-5,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )
    x, y = x.float(), y.long()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y, weight=class_weight, label_smoothing=label_smoothing)
        loss = loss + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head


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
    scale = float(x.norm(dim=1).mean().clamp_min(1e-12))  # one grid for every backbone
    xs = x / scale
    first = _first_of_each(groups)
    image_labels = y[first]
    counts = torch.bincount(image_labels, minlength=classes)
    k = min(FOLDS, int(counts[counts > 0].min())) if len(first) else 0
    kw = dict(class_weight=class_weight, label_smoothing=label_smoothing, max_iter=ITERATIONS)
    if k >= 2 and cv_images is not None and len(first) > cv_images:
        keep = stratified_subsample(image_labels, cv_images, k, seed)
        mine = torch.isin(groups, groups[first[keep]])
        sub = fit_logistic_cv(
            x[mine],
            y[mine],
            classes,
            groups=groups[mine],
            class_weight=class_weight,
            label_smoothing=label_smoothing,
            seed=seed,
            grid=grid,
            cv_images=None,
        )
        l2 = sub.l2 * len(keep) / len(first)
        kw["max_iter"] = FINAL_ITERATIONS
        return _unscaled(
            fit_logistic(xs, y, classes, l2, **kw),
            scale,
            l2,
            sub.folds,
            sub.path,
            sub.oof_logits,
            start,
            oof_images=keep,
            subsample={"images": len(keep), "of": len(first), "l2": sub.l2},
        )
    path, oof, l2 = [], None, NO_CV_L2
    if k >= 2:
        fold_of_image = fold_of(image_labels, k, seed)
        image_index = torch.empty(int(groups.max()) + 1, dtype=torch.long)
        image_index[groups[first]] = torch.arange(len(first))
        fold = fold_of_image[image_index[groups]]
        heads: list[torch.nn.Linear | None] = [None] * k
        best = math.inf
        for strength in grid:  # strong to weak, each fold's head warm-started
            logits = torch.zeros(len(first), classes)
            for f in range(k):
                train, held = fold != f, fold_of_image == f  # samples; images (eval views)
                heads[f] = fit_logistic(xs[train], y[train], classes, strength, head=heads[f], **kw)
                with torch.no_grad():
                    logits[held] = heads[f](xs[first[held]])
            loss = float(F.cross_entropy(logits, image_labels))
            acc = float((logits.argmax(1) == image_labels).float().mean())
            path.append({"l2": strength, "cv_loss": round(loss, 6), "cv_acc": round(acc, 6)})
            if loss < best:
                best, l2, oof = loss, strength, logits
    head = None
    for strength in grid if k >= 2 else (l2,):  # the same path down to the strength chosen
        head = fit_logistic(xs, y, classes, strength, head=head, **kw)
        if strength == l2:
            break
    return _unscaled(head, scale, l2, k if k >= 2 else 0, path, oof, start)


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
