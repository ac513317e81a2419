"""Does labelling what `graft suggest` picks beat labelling at random? Unseen accuracy per budget.

For each set: a pool of unlabelled images (their classes known to this script only), a fixed val
folder (5 per class) and an unseen test folder. A first model is trained on 2 labelled images per
class; then, for each budget, the images `graft suggest RUN POOL -n BUDGET --method M` picks
(typical: TypiClust; farthest: core-set; uncertain: the smallest top-2 margin), or as many random
ones (`--randoms` seeds, 2 by default), are labelled, a model is trained on them plus the first
ones (defaults, extract) and scored on the unseen folder.

    python bench/suggest.py [--work /tmp/graft-suggest] [--sets fm10,digits,fm6,photos,clutter]
                            [--budgets 50,100] [--methods typical,farthest,uncertain] [--randoms 2]

The sets are bench/quality.py's makers with larger pools: Fashion-MNIST (10 and 6 classes), the
digits, scikit-image photo patches (8 classes) and small shapes under heavy clutter (4 classes).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quality import make_digits, make_fashion, make_photos, make_shapes  # noqa: E402

import graft  # noqa: E402

SETS = {
    "fm10": lambda r: make_fashion(r, list(range(10)), 100, 100, 1000),
    "digits": lambda r: make_digits(r, 60, 80),
    "fm6": lambda r: make_fashion(r, [0, 1, 3, 7, 8, 9], 100, 100, 2000),
    "photos": lambda r: make_photos(r, 80, 50),
    "clutter": lambda r: make_shapes(r, 150, 100, seed=11, clutter=3),
}
SEED_PER_CLASS, VAL_PER_CLASS = 2, 5


def layout(src: Path, root: Path) -> tuple[list[Path], dict[Path, str]]:
    """Split src/train into the first labels, a val folder, and a flat pool (name -> class)."""
    first, pool = [], {}
    shutil.rmtree(root, ignore_errors=True)
    for folder in sorted((src / "train").iterdir()):
        files = sorted(folder.glob("*.png"))
        for f in files[:VAL_PER_CLASS]:
            (root / "val" / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / "val" / folder.name / f.name)
        first += files[VAL_PER_CLASS : VAL_PER_CLASS + SEED_PER_CLASS]
        for f in files[VAL_PER_CLASS + SEED_PER_CLASS :]:
            target = root / "pool" / f"{folder.name}__{f.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
            pool[target] = folder.name
    return first, pool


def train_on(root: Path, labelled: list[tuple[Path, str]], name: str, cache: Path) -> Path:
    data = root / f"data-{name}"
    shutil.rmtree(data, ignore_errors=True)
    for f, c in labelled:
        (data / "train" / c).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / "train" / c / f.name)
    shutil.copytree(root / "val", data / "val")
    run = root / f"run-{name}"
    graft.train(data, out=str(run), overwrite=True, cache_dir=str(cache), report=False)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-suggest"))
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--budgets", default="50,100")
    ap.add_argument("--methods", default="typical,farthest,uncertain")
    ap.add_argument("--randoms", type=int, default=2, help="random draws per budget")
    args = ap.parse_args()
    rows = []
    for name in args.sets.split(","):
        src = args.work / f"src-{name}"
        if not (src / "test").is_dir():
            shutil.rmtree(src, ignore_errors=True)
            SETS[name](src)
        root, cache = args.work / name, args.work / "cache"
        first, pool = layout(src, root)
        seed = [(f, f.parent.name) for f in first]
        run0 = train_on(root, seed, "first", cache)
        acc0 = graft.load(run0).evaluate(src / "test")["accuracy"]
        for budget in map(int, args.budgets.split(",")):
            acc_s = {}
            for method in args.methods.split(","):
                picks = graft.suggest(
                    run0, root / "pool", n=budget, out=root / f"suggest-{budget}", method=method
                )
                chosen = [(Path(r["path"]), pool[Path(r["path"])]) for r in picks]
                run = train_on(root, seed + chosen, f"{method}-{budget}", cache)
                acc_s[method] = graft.load(run).evaluate(src / "test")["accuracy"]
            randoms = []
            for s in range(args.randoms):
                rng = random.Random(s)
                picked = rng.sample(sorted(pool), budget)
                run = train_on(
                    root, seed + [(p, pool[p]) for p in picked], f"random{s}-{budget}", cache
                )
                randoms.append(graft.load(run).evaluate(src / "test")["accuracy"])
            methods = " | ".join(f"{a:.4f}" for a in acc_s.values())
            drawn = " / ".join(f"{a:.4f}" for a in randoms)
            rows.append(
                f"| {name} | {len(pool)} | {acc0:.4f} | {budget} | {methods} | "
                f"{statistics.mean(randoms):.4f} ({drawn}) |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    methods = args.methods.split(",")
    print(
        "| set | pool | first model (2 per class) | labels added | "
        + " | ".join(methods)
        + f" | random: mean ({args.randoms} draws) |"
    )
    print("|---|---:|---:|---:|" + "---:|" * len(methods) + "---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
