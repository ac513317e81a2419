"""Can graft's predictions be acted on? Calibration, "none of these" and a recall target on unseen
images, as tables.

For each set (made as bench/quality.py makes them, with one class held out of training), graft gets
only the training folder with its defaults (`graft.train`), then the saved model is scored on:
- unseen images of the trained classes (thousands for fm9: an ECE needs them);
- near: unseen images of the class held out (a kind of image the folder lacks, from the same data);
- far: images of another data set (digits for clothes and shapes, clothes for digits).

Table 1, calibration on the unseen images: accuracy, ECE (15 bins) and NLL of the raw softmax and of
graft's calibrated probabilities, mean confidence. Table 2, the unknown score: AUROC of the score
(unseen of the trained classes against near, against far) for graft's score (kNN, k as graft
chooses) beside the alternatives measured to choose it (kNN at k=5 and 10, the max softmax
probability); the share flagged "unknown" at graft's threshold. Table 3, `graft thresholds RUN
--target HARD:recall=0.9` on the class with the lowest val recall: recall asked, recall obtained
(decided as the class) and caught (not decided as another class) on unseen images, and the share
of all unseen images sent to review.

    python bench/decisions.py [--work /tmp/graft-decisions] [--sets fm9,digits,shapes]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from quality import FASHION, _idx, _write, make_digits, make_fashion, make_shapes  # noqa: E402

import graft  # noqa: E402
from graft.core.calibration import raw_probabilities, scores  # noqa: E402
from graft.core.decisions import knn_distance  # noqa: E402

SETS = {  # name -> (maker, held-out class, far set, what it is)
    "fm9": (
        lambda r: make_fashion(r, list(range(10)), 25, 556, 1000),
        "boot",
        "digits",
        "Fashion-MNIST, 9 classes (boot held out), 25 train / 556 unseen each",
    ),
    "digits": (
        lambda r: make_digits(r, 20, 150),
        "digit9",
        "fashion",
        "sklearn digits, 9 classes (9 held out), 20 train / ~150 unseen each",
    ),
    "shapes": (
        lambda r: make_shapes(r, 40, 300),
        "star",
        "digits",
        "shapes on clutter, 3 classes (star held out), 40 train / 300 unseen each",
    ),
}
FAR = 500


def make_far(root: Path, kind: str) -> Path:
    folder = root / f"far-{kind}"
    if folder.is_dir():
        return folder
    if kind == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        digits = (255 - d.images[:FAR] * 255 / 16).astype(np.uint8)
        _write(folder / "x", (im.repeat(8, 0).repeat(8, 1) for im in digits))
    else:
        x = _idx(FASHION / "t10k-images-idx3-ubyte.gz")
        _write(folder / "x", (255 - x[i] for i in range(5000, 5000 + FAR)))
    return folder


def make_set(root: Path, name: str) -> Path:
    maker, held, _, _ = SETS[name]
    data = root / name
    if (data / "near").is_dir():
        return data
    shutil.rmtree(data, ignore_errors=True)
    maker(data)
    shutil.move(str(data / "test" / held), str(data / "near"))
    shutil.rmtree(data / "train" / held)
    return data


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png"))


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """Area under the ROC curve of a score where higher means 'not like the training images'."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(y, np.r_[inside.numpy(), outside.numpy()]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-decisions"))
    ap.add_argument("--sets", default=",".join(SETS))
    args = ap.parse_args()
    rows: dict[str, list[str]] = {"cal": [], "unknown": [], "target": []}
    for name in args.sets.split(","):
        data = make_set(args.work, name)
        far_dir = make_far(args.work, SETS[name][2])
        run_dir = args.work / f"run-{name}"
        graft.train(
            data / "train", out=str(run_dir), overwrite=True, cache_dir=str(args.work / "cache")
        )
        clf = graft.load(run_dir)
        test = [(p, clf.classes.index(p.parent.name)) for p in images(data / "test")]
        labels = torch.tensor([y for _, y in test])
        paths = {
            "test": [p for p, _ in test],
            "near": images(data / "near"),
            "far": images(far_dir),
        }
        probs, unknown, feats = {}, {}, {}
        for part, ps in paths.items():
            probs[part], unknown[part] = clf.scores(ps)
            feats[part] = clf.features(ps)
        p = probs["test"]
        cal, raw = scores(p, labels), scores(raw_probabilities(p, clf.temperature), labels)
        rows["cal"].append(
            f"| {name} | {len(labels)} | {cal['accuracy']:.4f} | {raw['ece']:.4f} | "
            f"{cal['ece']:.4f} | {raw['nll']:.4f} | {cal['nll']:.4f} | {raw['confidence']:.4f} | "
            f"{cal['confidence']:.4f} |"
        )
        u = clf.meta.unknown
        t = u["threshold"]
        alt = {
            f"kNN k={k}": {part: knn_distance(feats[part], clf.references, k) for part in paths}
            for k in (5, 10)
        }
        alt["max softmax"] = {part: 1 - probs[part].max(1).values for part in paths}
        flag = {part: float((unknown[part] > t).float().mean()) for part in paths}
        others = "; ".join(
            f"{m} {auroc(s['test'], s['near']):.3f}/{auroc(s['test'], s['far']):.3f}"
            for m, s in alt.items()
        )
        rows["unknown"].append(
            f"| {name} | kNN k={u['k']} | {auroc(unknown['test'], unknown['near']):.3f} | "
            f"{auroc(unknown['test'], unknown['far']):.3f} | {flag['test']:.3f} | "
            f"{flag['near']:.3f} | {flag['far']:.3f} | {others} |"
        )
        per_class = clf.meta.val["per_class"]
        hard = min(per_class, key=lambda c: per_class[c]["recall"])
        graft.set_targets(run_dir, [f"{hard}:recall=0.9"])
        clf = graft.load(run_dir)
        decided = clf.policy.decide(probs["test"], unknown["test"])
        h = clf.classes.index(hard)
        mine = [d for d, y in zip(decided, labels.tolist()) if y == h]
        recall = sum(d == hard for d in mine) / len(mine)
        caught = sum(d in (hard, "review", "unknown") for d in mine) / len(mine)
        review = sum(d == "review" for d in decided) / len(decided)
        threshold = clf.policy.thresholds[hard].threshold
        rows["target"].append(
            f"| {name} | {hard} | 0.9 | {threshold:.4f} | {recall:.3f} | {caught:.3f} | "
            f"{review:.3f} | {len(mine)} |"
        )
        print(f"{name}: done", file=sys.stderr, flush=True)

    print("calibration on unseen images (defaults: extract)\n")
    print(
        "| set | unseen | accuracy | ECE raw | ECE | NLL raw | NLL | confidence raw | confidence |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows["cal"]))
    print("\nthe unknown score: AUROC unseen vs near / far, and flagged at graft's threshold\n")
    print(
        "| set | score | AUROC near | AUROC far | flagged unseen | flagged near | flagged far | "
        "alternatives, AUROC near/far |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows["unknown"]))
    print("\n--target HARD:recall=0.9 (graft thresholds), on unseen images\n")
    print("| set | class | recall asked | threshold | recall | caught | review (all) | images |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows["target"]))


if __name__ == "__main__":
    main()
