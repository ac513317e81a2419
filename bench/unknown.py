"""How far can a "none of these" score on frozen features go on near images? As one table.

On bench/decisions.py's folders (one class held out of training: "near"; another data set: "far"),
graft's unknown score (distance to the nearest training image, Sun et al. 2022) beside Mahalanobis
and relative Mahalanobis (Ren et al. 2021) with covariance shrinkage, all on the same cached,
L2-normalised lite0 features of the training images. Per score: AUROC of unseen images of the
trained classes against near and far; the share flagged at the threshold graft would set (95th
percentile of held-out training scores: leave-one-out for kNN, 5-fold for the Mahalanobis fits);
and, to see what no threshold rule can beat, the near share flagged by an oracle threshold that
flags exactly 5% and 10% of the unseen in-distribution images.

    python bench/unknown.py [--work /tmp/graft-decisions] [--sets fm9,digits,shapes]
                            [--backbone efficientnet_lite0]

--backbone a+b+...: each network's features L2-normalised and set side by side (as graft audit
joins them), to see whether more networks lift the ceiling.

Run bench/decisions.py first or let this script make the folders (the same makers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decisions import SETS, auroc, images, make_far, make_set  # noqa: E402

from graft.core.decisions import knn_distance, normalise  # noqa: E402
from graft.core.linear import fold_of  # noqa: E402
from graft.core.runtime import resolve_runtime  # noqa: E402
from graft.data.discovery import discover  # noqa: E402
from graft.frozen.features import extract_features  # noqa: E402
from graft.models.backbones import create_backbone  # noqa: E402
from graft.models.concat import parts  # noqa: E402

SHRINK = (0.1, 0.5, 0.8)


def mahalanobis_fit(x: torch.Tensor, y: torch.Tensor, classes: int, shrink: float):
    """Class means, one shared precision matrix and the background (all images) Gaussian, each
    covariance shrunk towards its mean variance."""
    d = x.shape[1]

    def shrunk(c: torch.Tensor) -> torch.Tensor:
        return torch.linalg.inv((1 - shrink) * c + shrink * c.trace() / d * torch.eye(d))

    means = torch.stack([x[y == c].mean(0) for c in range(classes)])
    centred = x - means[y]
    g = x.mean(0)
    return (means, shrunk(centred.T @ centred / len(x)), g, shrunk((x - g).T @ (x - g) / len(x)))


def mahalanobis(model, z: torch.Tensor, relative: bool) -> torch.Tensor:
    means, prec, g, gprec = model
    diff = z[:, None, :] - means[None]
    md = torch.einsum("ncd,de,nce->nc", diff, prec, diff)
    if relative:
        dg = z - g
        md = md - torch.einsum("nd,de,ne->n", dg, gprec, dg)[:, None]
    return md.min(1).values


def held_out(x, y, classes, shrink, relative, k=5) -> torch.Tensor:
    fold, out = fold_of(y, k, 0), torch.empty(len(x))
    for f in range(k):
        model = mahalanobis_fit(x[fold != f], y[fold != f], classes, shrink)
        out[fold == f] = mahalanobis(model, x[fold == f], relative)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-decisions"))
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()
    print(
        "| set | score | AUROC near | AUROC far | flagged unseen | flagged near | flagged far | "
        "near at an oracle 5% | at 10% |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    runtime = resolve_runtime("cpu", "auto")  # as graft train extracts (the cache is shared)
    for name in args.sets.split(","):
        data = make_set(args.work, name)
        split = discover(data / "train")
        train = [s for part in split.splits().values() for s in part]
        cache = args.work / "cache"
        folders = {
            "unseen": data / "test",
            "near": data / "near",
            "far": make_far(args.work, SETS[name][2]),
        }
        xs, zs = [], {part: [] for part in folders}
        for member in parts(args.backbone):
            bb = create_backbone(member, len(split.classes))
            fs = extract_features(bb, train, runtime, cache)
            xs.append(normalise(fs.features))
            for part, f in folders.items():
                found = extract_features(bb, [(str(p), 0) for p in images(f)], runtime, cache)
                zs[part].append(normalise(found.features))
        x, y = torch.cat(xs, 1), fs.labels
        z = {part: torch.cat(v, 1) for part, v in zs.items()}
        scores = {
            "kNN k=1 (graft)": (
                knn_distance(x, x, 1, leave_one_out=True),
                {part: knn_distance(v, x, 1) for part, v in z.items()},
            )
        }
        for shrink in SHRINK:
            for relative in (False, True):
                model = mahalanobis_fit(x, y, len(split.classes), shrink)
                label = f"{'relative ' if relative else ''}Mahalanobis, shrink {shrink}"
                scores[label] = (
                    held_out(x, y, len(split.classes), shrink, relative),
                    {part: mahalanobis(model, v, relative) for part, v in z.items()},
                )
        for label, (held, s) in scores.items():
            threshold = torch.quantile(held, 0.95)
            flag = {part: float((v > threshold).float().mean()) for part, v in s.items()}
            o5, o10 = (torch.quantile(s["unseen"], q) for q in (0.95, 0.90))
            print(
                f"| {name} | {label} | {auroc(s['unseen'], s['near']):.3f} | "
                f"{auroc(s['unseen'], s['far']):.3f} | {flag['unseen']:.3f} | "
                f"{flag['near']:.3f} | {flag['far']:.3f} | "
                f"{float((s['near'] > o5).float().mean()):.3f} | "
                f"{float((s['near'] > o10).float().mean()):.3f} |"
            )


if __name__ == "__main__":
    main()
