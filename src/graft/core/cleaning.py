"""The math of a folder audit, on L2-normalised image features: out-of-fold probabilities from
linear heads, label issues by confident learning, near-duplicate pairs, outlier scores; and of
choosing which images to label next (typical and diverse: `typical_and_diverse`).

Confident learning (Northcutt, Jiang and Chuang, JAIR 2021; cleanlab's `filter.py`, read, not
used: it is AGPL): each class j gets a threshold t_j, the mean out-of-fold probability of class j
over the images labelled j (how sure the model is, on average, of its own class). An image
labelled i counts towards the confident joint at (i, k) where k is the class, among those whose
probability reaches their threshold, with the highest probability; an image counted off the
diagonal (k != i) says class i holds a wrong label; the images of class i with the largest margin
of another class over i, as many as were counted, are the label issues, worst first.

Near-duplicates are judged on the pictures themselves, not only on features: a network's features
put two different 8x8 digits as close as a resized copy (bench/audit.py's digits: 434 pairs of
distinct images at feature cosine >= 0.97), and a lightly cropped 28-pixel image further than
that (0.84-0.96). Each image becomes small grey thumbnails (24x24, its mean
removed: brightness and contrast do not count) of itself cropped by 0-8% a side and mirrored; two
images are the same picture when one's plain thumbnail matches a crop or the mirror of the other
at cosine >= 0.98, and they are far closer to each other than to the crowd around them (the
pair's distance at most half of each one's distance to its tenth nearest image: in a folder of
1,000 plain trousers distinct ones clear 0.98 too). On bench/audit.py's three noisy folders that
found all 30 planted copies (resized 1.5x, JPEG at 85, cropped 4% a side; lowest 0.981) and one
other pair on fm10; features alone found 18 of 30. On 10,000 Fashion-MNIST images it lists 389
pairs (2,539 without the ratio test), many of them the same product photographed twice.

>>> import torch
>>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.85, 0.15]])
>>> label_issues(probs, torch.tensor([0, 0, 1, 1]))
[(3, 0, 0.15)]
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageOps

from .linear import fit_logistic_cv, fold_logits

NEAR_DUPLICATE = 0.97  # cosine similarity of features: a resize, recompression or light crop
THUMB_SIDE = 24  # 16 merged distinct fm10 items (0.99), 32 split cropped shapes (0.968)
# share cut from each side, then resized back; in 1% steps, as 2% ones left a 3% crop of a fine
# texture (grass, a star field: bench/audit.py --sets photos) at 0.94-0.95 against its original
THUMB_CROPS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08)
SAME_PICTURE = 0.98  # thumbnail cosine, best alignment: planted copies >= 0.981, distinct <= 0.985
SAME_CONTENT = 0.95  # thumbnail agreement that confirms a feature match (NEAR_DUPLICATE)
NEIGHBOURS = 10  # candidate pairs: each image's nearest in features and in thumbnails
RATIO = 0.5  # a pair's thumbnail distance at most this share of each one's to its NEIGHBOURS-th
FOLDS = 5
FOLD_SEEDS = 3  # out-of-fold probabilities averaged over this many fold assignments
JUDGED_UP_TO = 5_000  # images; above, one assignment at L2. Once 2,000: the cross-validated choice
# and three assignments took 7 s instead of 1 s at 2,000 Fashion-MNIST images, 104 s instead of 6 s
# at 10,000; with the fold heads solved together (stop 43) 4.5-6.3 s instead of 0.6 s at 5,000,
# where they found 5% planted label errors at precision 0.53-0.56 instead of 0.48-0.51, recall
# 0.82-0.85 instead of 0.79-0.82 (three draws; docs/QUALITY.md)
L2 = 1e-4  # the heads' L2 when none is given (the audit's own choose theirs: judged_probabilities)


def out_of_fold(
    features: torch.Tensor, labels: torch.Tensor, classes: int, seed: int = 0, l2: float = L2
) -> torch.Tensor:
    """(N, C) probabilities of each image from a head that never saw it (k-fold, stratified;
    k = FOLDS, or fewer when a class has fewer images; the k heads solved together, at `l2` on
    the features scaled as `graft train` scales its head's: core/linear.fold_logits)."""
    counts = torch.bincount(labels, minlength=classes)
    k = min(FOLDS, int(counts[counts > 0].min()))
    if k < 2:
        return torch.full((len(labels), classes), 1.0 / classes)
    return fold_logits(features, labels, classes, k, seed, l2).softmax(1)


def judged_probabilities(
    features: torch.Tensor, labels: torch.Tensor, classes: int, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """The out-of-fold probabilities labels are judged by, and the L2 strength of their heads:
    chosen by cross-validation as `graft train` chooses its head's (core/linear.py), then the
    probabilities averaged over FOLD_SEEDS fold assignments (one assignment's luck in which
    images share a fold moves a few images in or out of the list). On bench/audit_heads.py's
    noisy folders (three noise draws each) this raised label-issue precision on all three sets
    (fm10 0.517 -> 0.552, digits 0.397 -> 0.488, shapes 0.868 -> 0.894) for recall 0.792 ->
    0.808, 0.856 -> 0.778 and 0.736 -> 0.708, against one assignment at a fixed 1e-4. Above
    JUDGED_UP_TO images one assignment at L2 (what that saves: the constant's note)."""
    if len(labels) > JUDGED_UP_TO:
        return out_of_fold(features, labels, classes, seed), L2
    l2 = fit_logistic_cv(features, labels, classes, seed=seed).l2
    runs = [out_of_fold(features, labels, classes, seed + s, l2) for s in range(FOLD_SEEDS)]
    return torch.stack(runs).mean(0), l2


def label_issues(probs: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, int, float]]:
    """(index, suggested class, self-confidence) of the likely label errors, worst first.

    How many per class: the images of the class that confident learning counts off the
    diagonal. Which ones: those with the largest margin of another class over the given one
    (cleanlab's default, "prune by noise rate"). On bench/audit.py's noisy folders it found more
    of the moved images, more precisely, than the off-diagonal images themselves (fm10: 0.58
    precision at 0.83 recall, against 0.46 at 0.65)."""
    probs, labels = probs.float(), labels.long()
    n, classes = probs.shape
    rows = torch.arange(n)
    thresholds = torch.tensor(
        [
            float(probs[labels == j, j].mean()) if (labels == j).any() else math.inf
            for j in range(classes)
        ]
    )
    above = probs >= thresholds - 1e-6
    masked = torch.where(above, probs, torch.full_like(probs, -1.0))
    off_diagonal = above.any(1) & (masked.argmax(1) != labels)
    others = probs.clone()
    others[rows, labels] = -1.0
    best_other, suggested = others.max(1)
    margin = best_other - probs[rows, labels]
    out = []
    for c in range(classes):
        mine = (labels == c).nonzero().flatten()
        count = int(off_diagonal[mine].sum())
        for i in mine[margin[mine].argsort(descending=True)[:count]].tolist():
            out.append(
                (i, int(suggested[i]), round(float(probs[i, labels[i]]), 6), float(margin[i]))
            )
    return [t[:3] for t in sorted(out, key=lambda t: -t[3])]


def thumbnails(image: Image.Image) -> torch.Tensor:
    """An image's views for near-duplicate checks: grey, THUMB_SIDE square, cropped by each of
    THUMB_CROPS, then the uncropped one mirrored; (views, side^2) uint8 (5.8 KB an image)."""
    grey = image.convert("L")
    w, h = grey.size
    views = []
    for share in THUMB_CROPS:
        dx, dy = round(w * share), round(h * share)
        box = (dx, dy, max(dx + 1, w - dx), max(dy + 1, h - dy))
        views.append(grey.crop(box).resize((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR))
    views.append(ImageOps.mirror(views[0]))
    return torch.from_numpy(np.stack([np.asarray(v, dtype=np.uint8).reshape(-1) for v in views]))


def _unit(thumbs: torch.Tensor) -> torch.Tensor:
    """Thumbnails as vectors with their mean removed and unit length (a flat one stays 0)."""
    x = thumbs.float()
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def same_picture(a: torch.Tensor, b: torch.Tensor) -> float:
    """How much two images' thumbnails (`thumbnails`) agree at their best alignment: one plain
    against the other cropped (either way round) or mirrored. 1.0: the same picture."""
    return float(_aligned(_unit(a)[None], _unit(b)[None])[0])


def _aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`same_picture` of pairs at once: a, b (P, views, side^2) unit thumbnails -> (P,)."""
    crops = len(THUMB_CROPS)
    plain_a, plain_b = a[:, 0], b[:, 0]
    return torch.cat(
        [
            torch.einsum("pvd,pd->pv", b[:, :crops], plain_a),
            torch.einsum("pvd,pd->pv", a[:, 1:crops], plain_b),
            (plain_a * b[:, crops]).sum(1, keepdim=True),
        ],
        1,
    ).amax(1)


def near_duplicates(
    features: torch.Tensor, thumbs: torch.Tensor | None = None, threshold: float = NEAR_DUPLICATE
) -> list[tuple[int, int, float]]:
    """(i, j, similarity) of the near-duplicate pairs (i < j), most similar first.

    With `thumbs` (N, views, side^2 from `thumbnails`): the candidates are each image's
    NEIGHBOURS nearest in features, in plain thumbnails and in mirrored ones; a pair is a
    duplicate when its thumbnails agree at SAME_PICTURE, or its features at `threshold` and its
    thumbnails at SAME_CONTENT, and its thumbnail distance is at most RATIO of each image's
    distance to its NEIGHBOURS-th nearest; the similarity is the thumbnails'. Without: every
    pair whose features reach `threshold`, the similarity theirs. Blocked matrix products:
    memory grows with N x 1024, time with N squared (10,000 images: 10^8 similarities, seconds)."""
    if thumbs is None:
        return _feature_pairs(features, threshold)
    if len(features) < 2:
        return []
    x = features.float()
    unit = torch.cat([_unit(thumbs[s : s + 4096]).half() for s in range(0, len(thumbs), 4096)])
    plain, mirrored = unit[:, 0].float(), unit[:, -1].float()  # 7 KB an image, all of them
    candidates: set[tuple[int, int]] = set()
    k = min(NEIGHBOURS, len(x) - 1)
    crowd = torch.zeros(len(x))  # thumbnail distance to the k-th nearest other image
    for space, other in ((x, x), (plain, plain), (plain, mirrored)):
        for start in range(0, len(space), 1024):
            sims = space[start : start + 1024] @ other.T
            rows = torch.arange(len(sims))
            sims[rows, rows + start] = -2  # not itself
            if k <= 0:
                continue
            top = sims.topk(k, dim=1)
            if other is plain:
                crowd[start : start + len(sims)] = 1 - top.values[:, -1]
            for r, cols in enumerate(top.indices.tolist()):
                candidates.update((min(start + r, c), max(start + r, c)) for c in cols)
    pairs = []
    ordered = torch.tensor(sorted(candidates), dtype=torch.long).reshape(-1, 2)
    for start in range(0, len(ordered), 4096):
        i, j = ordered[start : start + 4096].T
        pixels = _aligned(unit[i].float(), unit[j].float())
        alike = (x[i] * x[j]).sum(1)
        keep = (pixels >= SAME_PICTURE) | ((pixels >= SAME_CONTENT) & (alike >= threshold))
        # and far closer to each other than to the crowd around them (Lowe's ratio test): in a
        # folder of 1,000 plain trousers, two distinct ones are as alike as the ten nearest
        keep &= (1 - pixels) <= RATIO * torch.minimum(crowd[i], crowd[j])
        for a, b, sim in zip(i[keep].tolist(), j[keep].tolist(), pixels[keep].tolist()):
            pairs.append((a, b, round(sim, 4)))
    return sorted(pairs, key=lambda t: -t[2])


def _feature_pairs(features: torch.Tensor, threshold: float) -> list[tuple[int, int, float]]:
    pairs = []
    x = features.float()
    for start in range(0, len(x), 1024):
        sims = x[start : start + 1024] @ x.T
        rows, cols = (sims >= threshold).nonzero(as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist()):
            if start + r < c:
                pairs.append((start + r, c, round(float(sims[r, c]), 4)))
    return sorted(pairs, key=lambda t: -t[2])


def outlier_scores(features: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Each image's distance (1 - cosine) to its nearest other image, and the level above which
    it is an outlier: Tukey's far fence, Q3 + 3 IQR, of those distances."""
    from .decisions import knn_distance

    if len(features) < 3:
        return torch.zeros(len(features)), math.inf
    d = knn_distance(features, features, 1, leave_one_out=True)
    q1, q3 = torch.quantile(d, torch.tensor([0.25, 0.75])).tolist()
    return d, q3 + 3 * (q3 - q1)


def kmeans(features: torch.Tensor, k: int, seed: int = 0, iters: int = 30) -> torch.Tensor:
    """Cluster of each row: k-means on L2-normalised features (cosine), k-means++ start."""
    x = features.float()
    g = torch.Generator().manual_seed(seed)
    k = min(k, len(x))
    centres = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):  # k-means++: far points more likely
        d = (1 - x @ centres.T).clamp_min(0).min(1).values
        p = d / d.sum() if d.sum() > 0 else torch.full_like(d, 1 / len(d))
        centres = torch.cat([centres, x[torch.multinomial(p, 1, generator=g)]])
    for _ in range(iters):
        assign = (x @ centres.T).argmax(1)
        moved = torch.stack(
            [x[assign == c].mean(0) if (assign == c).any() else centres[c] for c in range(k)]
        )
        moved = torch.nn.functional.normalize(moved, dim=1)
        if torch.allclose(moved, centres):
            break
        centres = moved
    return (x @ centres.T).argmax(1)


def typicality(features: torch.Tensor, k: int = 20) -> torch.Tensor:
    """How typical each row is of its neighbourhood: the inverse of the mean distance (1 -
    cosine) to its k nearest others (Hacohen et al. 2022)."""
    x = features.float()
    k = max(1, min(k, len(x) - 1))
    out = []
    for start in range(0, len(x), 1024):  # 1024 rows at a time: memory grows with N, not N^2
        sims = x[start : start + 1024] @ x.T
        rows = torch.arange(len(sims))
        sims[rows, rows + start] = -math.inf
        out.append((1 - sims.topk(k, dim=1).values).mean(1))
    mean_d = torch.cat(out) if out else torch.zeros(0)
    return 1.0 / mean_d.clamp_min(1e-6)


def typical_and_diverse(
    pool: torch.Tensor, labelled: torch.Tensor, n: int, seed: int = 0
) -> list[int]:
    """TypiClust (Hacohen, Dekel and Weinshall 2022, "Active learning on a budget"): cluster the
    labelled and pool images into (labelled + n) clusters; take, from the largest clusters no
    label covers yet, each one's most typical pool image. At small budgets this beats picking
    the most uncertain images, which are often outliers."""
    n = min(n, len(pool))
    if n == 0:
        return []
    both = torch.cat([labelled.float(), pool.float()])
    clusters = kmeans(both, len(labelled) + n, seed)
    covered = set(clusters[: len(labelled)].tolist())
    of_pool = clusters[len(labelled) :]
    sizes = torch.bincount(of_pool, minlength=int(clusters.max()) + 1)
    order = sorted(range(len(sizes)), key=lambda c: (c in covered, -int(sizes[c])))
    typical = typicality(pool)
    picks: list[int] = []
    taken = torch.zeros(len(pool), dtype=torch.bool)
    while len(picks) < n:
        for c in order:
            members = ((of_pool == c) & ~taken).nonzero().flatten()
            if len(members) == 0:
                continue
            best = int(members[typical[members].argmax()])
            picks.append(best)
            taken[best] = True
            if len(picks) == n:
                break
    return picks


def farthest_first(pool: torch.Tensor, labelled: torch.Tensor, n: int) -> list[int]:
    """Core-set (Sener and Savarese 2018), k-center greedy: each pick the pool image farthest
    from every labelled or already picked image."""
    x = pool.float()
    n = min(n, len(x))
    if len(labelled):
        nearest = (1 - (x @ labelled.float().T)).min(1).values
    else:
        nearest = torch.full((len(x),), math.inf)
    picks: list[int] = []
    for _ in range(n):
        i = int(nearest.argmax())
        picks.append(i)
        nearest = torch.minimum(nearest, 1 - x @ x[i])
        nearest[picks] = -math.inf
    return picks
