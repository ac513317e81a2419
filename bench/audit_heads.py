"""Which heads, on which features, should judge the labels? Label-issue precision and recall of
out-of-fold heads at a fixed L2 of 1e-4 (the audit at first) against heads with the L2 chosen by
cross-validation as training chooses it, each with one fold assignment or averaged over three
(core/cleaning.judged_probabilities), on lite0's features; then those heads on the features of
lite0, lite1 and lite2 joined (the audit now: constants.AUDIT_BACKBONE). On bench/audit.py's
noisy folders (the same sets and noise draws; a last row per set and heads gives the mean over
the draws).

    python bench/audit_heads.py [--work /tmp/graft-audit-heads] [--sets fm10,digits,shapes]
                                [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

import graft.core.cleaning as cleaning
from graft.core.constants import AUDIT_BACKBONE
from graft.core.decisions import normalise
from graft.core.runtime import resolve_runtime
from graft.data.discovery import discover
from graft.frozen.features import extract_features
from graft.models.backbones import create_backbone
from graft.models.concat import parts

sys.path.insert(0, str(Path(__file__).parent))
from audit import SETS, make_noisy  # noqa: E402

FIXED_L2 = 1e-4  # the audit's heads before


def oof(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, seeds: int) -> torch.Tensor:
    """Out-of-fold probabilities at `l2`, averaged over `seeds` fold assignments."""
    return sum(cleaning.out_of_fold(x, y, classes, seed=s, l2=l2) for s in range(seeds)) / seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-audit-heads"))
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--seeds", type=int, default=3, help="noise draws per set")
    args = ap.parse_args()
    print("| set | heads | flagged | precision | recall |")
    print("|---|---|---:|---:|---:|")
    for name in args.sets.split(","):
        data = args.work / name
        if not (data / "test").is_dir():
            SETS[name](data)
        means = defaultdict(list)
        for seed in range(args.seeds):
            for label, row in draw(args.work, name, data, seed).items():
                print(f"| {name}, seed {seed} | {label} | {row[0]} | {row[1]:.3f} | {row[2]:.3f} |")
                means[label].append(row)
        for label, rows in means.items():
            f, p, r = (statistics.mean(c) for c in zip(*rows))
            print(f"| **{name}, mean** | {label} | {f:.1f} | {p:.3f} | {r:.3f} |", flush=True)


def draw(work: Path, name: str, data: Path, seed: int) -> dict[str, tuple[int, float, float]]:
    """(flagged, precision, recall) of each kind of heads on one noisy copy of the set."""
    noisy = work / f"{name}-noisy"
    make_noisy(data / "train", noisy, seed)
    split = discover(noisy, seed=0)  # as graft audit reads it
    samples = [s for part in split.splits().values() for s in part]
    rt = resolve_runtime("cpu", "auto")
    each = [
        extract_features(create_backbone(b, 1), samples, rt, cache_dir=work / f"cache-{name}")
        for b in parts(AUDIT_BACKBONE)
    ]
    fs = each[0]
    x, y, classes = normalise(fs.features), fs.labels, len(split.classes)
    joined = torch.cat([normalise(f.features) for f in each], 1)  # every file reads here
    moved = {i for i, (p, _) in enumerate(fs.samples) if Path(p).name.startswith("moved-")}
    judged, cv_l2 = cleaning.judged_probabilities(x, y, classes)
    both, _ = cleaning.judged_probabilities(joined, y, classes)
    out = {}
    for label, probs in (
        (
            "lite0, L2 1e-4, one fold assignment (the audit at first)",
            oof(x, y, classes, FIXED_L2, 1),
        ),
        ("lite0, L2 by cross-validation, one assignment", oof(x, y, classes, cv_l2, 1)),
        ("lite0, L2 1e-4, three assignments averaged", oof(x, y, classes, FIXED_L2, 3)),
        ("lite0, L2 by cross-validation, three averaged", judged),
        ("lite0+lite1+lite2, the same heads (the audit now)", both),
    ):
        found = {i for i, _, _ in cleaning.label_issues(probs, y)}
        hit = len(found & moved)
        out[label] = (len(found), hit / max(1, len(found)), hit / len(moved))
    return out


if __name__ == "__main__":
    main()
