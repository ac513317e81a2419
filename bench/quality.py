"""How good is graft on folders it has never seen? Accuracy on unseen images, per mode, as a table.

Each set is a small folder of class folders (100-300 training images, 4-10 classes) made here from
data this machine has: Fashion-MNIST (Debian's dataset-fashion-mnist) at three sizes,
scikit-learn's digits, scikit-image's photos cut into patches, and generated shapes on clutter
(two levels); four more (fm4, photos2, shapes2, fm8), made to check a lever on folders that
chose nothing, run when named. graft gets only the training folder (flat: it holds out its own
validation share) and the saved model is then scored by `graft evaluate` on a separate folder of
images that took no part in anything. Every run is a whole `graft` process (cold feature cache),
so the wall time is what a user waits. `--seeds 0,1,2` runs each mode once per seed (`graft train
--seed`: another val split, other folds, another initialisation; the unseen folder is the same),
the later seeds on the feature cache the first one filled (their wall time is not a cold one), and
ends with each set's mean over the seeds: one split of 100-300 images moves a set's unseen
accuracy by a point or two (docs/QUALITY.md).

    python bench/quality.py [--work /tmp/graft-quality] [--sets fm10,fm6,digits,shapes,...]
                            [--modes default,refit,power,notta,epochs,last,partial,partial-lpft,
                                     finetune,finetune-lpft,auto]
                            [--budget 5m] [--label after] [--seeds 0,1,2]
                            [--src PATH]  # another checkout's src/, e.g. a git worktree of main

Columns: printed = the accuracy graft prints for its model, with its 95% interval; unseen = the
same model on the unseen folder; inside = whether unseen lies in the printed interval; nll and
ece = the calibrated probabilities' log-loss and expected calibration error on the unseen folder.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from graft.core.metrics import wilson_interval

FASHION = Path("/usr/share/datasets/fashion-mnist")
FM_NAMES = [
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
]


def _idx(path: Path) -> np.ndarray:
    data = gzip.open(path, "rb").read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _write(folder: Path, arrays) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i:04d}.png")


def make_fashion(root: Path, classes: list[int], n_train: int, n_test: int, offset: int) -> None:
    """Training images from Fashion-MNIST's train file (from `offset` on: not the demo's first
    images), unseen ones from its test file (from `offset // 10`: not the demo's val images)."""
    for part, stem, n, start in (
        ("train", "train", n_train, offset),
        ("test", "t10k", n_test, offset // 10),
    ):
        x = _idx(FASHION / f"{stem}-images-idx3-ubyte.gz")
        y = _idx(FASHION / f"{stem}-labels-idx1-ubyte.gz")
        for c in classes:
            idx = np.flatnonzero(y == c)[start : start + n]
            _write(root / part / FM_NAMES[c], (255 - x[i] for i in idx))


def make_digits(root: Path, n_train: int, n_test: int) -> None:
    """scikit-learn's 8x8 digits (1,797 images), upscaled to 64x64, disjoint train and test.
    Shuffled (seeded) first: the file is ordered by writer, and an interval only speaks for new
    images drawn like the training ones, not for other writers."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        imgs = [
            (255 - d.images[i] * 255 / 16).astype(np.uint8).repeat(8, 0).repeat(8, 1) for i in idx
        ]
        _write(root / "train" / f"digit{c}", imgs[:n_train])
        _write(root / "test" / f"digit{c}", imgs[n_train : n_train + n_test])


def _shape(kind: str, rng: random.Random, clutter: int = 1) -> Image.Image:
    """A shape of random size, place, colour and rotation on a noisy, cluttered background;
    `clutter` multiplies the stray lines and shrinks the shape."""
    size = 96
    bg = np.array([rng.randrange(256) for _ in range(3)], np.uint8)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 30, (size, size, 3))
    im = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randrange(3, 7) * clutter):  # clutter: lines of other colours
        pts = [(rng.randrange(size), rng.randrange(size)) for _ in range(2)]
        d.line(pts, fill=tuple(rng.randrange(256) for _ in range(3)), width=rng.randrange(1, 4))
    r = rng.uniform(14, 30) / clutter**0.5
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = tuple(rng.randrange(256) for _ in range(3))
    a0 = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        n = {"triangle": 3, "square": 4, "star": 10}[kind]
        radii = [r if (kind != "star" or i % 2 == 0) else r * 0.45 for i in range(n)]
        d.polygon(
            [
                (
                    cx + q * math.cos(a0 + 2 * math.pi * i / n),
                    cy + q * math.sin(a0 + 2 * math.pi * i / n),
                )
                for i, q in enumerate(radii)
            ],
            fill=fill,
        )
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


def make_shapes(root: Path, n_train: int, n_test: int, seed: int = 7, clutter: int = 1) -> None:
    rng = random.Random(seed)
    for part, n in (("train", n_train), ("test", n_test)):
        for kind in ("circle", "square", "triangle", "star"):
            folder = root / part / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _shape(kind, rng, clutter).save(folder / f"{i:04d}.png")


PHOTOS = ("brick", "grass", "gravel", "moon", "coins", "camera", "hubble_deep_field", "retina")


def make_photos(root: Path, n_train: int, n_test: int, seed: int = 3) -> None:
    """scikit-image's sample photos cut into grey patches, one class per photo: training patches
    from the top 55% of each photo, unseen ones from the rest (no pixel in both). Patches of 40-96
    pixels at a random place, shown at 64x64 with a random brightness and contrast."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        grey = Image.fromarray(a).convert("L")
        w, h = grey.size
        cut = int(h * 0.55)
        for part, n, (top, bottom) in (("train", n_train, (0, cut)), ("test", n_test, (cut, h))):
            out = []
            for _ in range(n):
                side = int(rng.integers(40, min(97, bottom - top, w)))
                x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(top, bottom - side + 1))
                patch = np.asarray(grey.crop((x, y, x + side, y + side)).resize((64, 64)), float)
                patch = (patch - patch.mean()) * rng.uniform(0.6, 1.4) + patch.mean()
                out.append(np.clip(patch + rng.uniform(-30, 30), 0, 255).astype(np.uint8))
            _write(root / part / name, out)


SETS = {  # name -> (maker, what it is)
    "fm10": (
        lambda r: make_fashion(r, list(range(10)), 25, 50, 1000),
        "Fashion-MNIST, 10 classes, 25 train / 50 unseen each",
    ),
    "fm6": (
        lambda r: make_fashion(r, [0, 1, 3, 7, 8, 9], 20, 50, 2000),
        "Fashion-MNIST, 6 classes, 20 train / 50 unseen each",
    ),
    "digits": (
        lambda r: make_digits(r, 20, 50),
        "sklearn digits, 10 classes, 20 train / 50 unseen",
    ),
    "shapes": (
        lambda r: make_shapes(r, 40, 50),
        "shapes on clutter, 4 classes, 40 train / 50 unseen",
    ),
    "fm30": (
        lambda r: make_fashion(r, list(range(10)), 30, 50, 5000),
        "Fashion-MNIST, 10 classes, 30 train / 50 unseen each (other images than fm10's)",
    ),
    "photos": (
        lambda r: make_photos(r, 15, 50),
        "scikit-image photos cut into grey patches, 8 classes, 15 train / 50 unseen",
    ),
    "clutter": (
        lambda r: make_shapes(r, 30, 50, seed=11, clutter=3),
        "smaller shapes under 3x the clutter, 4 classes, 30 train / 50 unseen",
    ),
    # made in stop 36 to check a lever found on the seven above on folders that took no part
    "fm4": (
        lambda r: make_fashion(r, [0, 2, 4, 6], 20, 50, 3000),
        "Fashion-MNIST's four tops (t-shirt, pullover, coat, shirt), 20 train / 50 unseen each",
    ),
    "photos2": (
        lambda r: make_photos(r, 20, 50, seed=17),
        "photos' patches drawn again (seed 17), 8 classes, 20 train / 50 unseen",
    ),
    "shapes2": (
        lambda r: make_shapes(r, 25, 50, seed=29, clutter=2),
        "shapes under 2x the clutter (seed 29), 4 classes, 25 train / 50 unseen",
    ),
    "fm8": (
        lambda r: make_fashion(r, [1, 2, 3, 5, 6, 7, 8, 9], 15, 50, 4000),
        "Fashion-MNIST, 8 classes, 15 train / 50 unseen each (other images than fm10's, fm30's)",
    ),
}
# the sets every default was measured on (the default --sets); the rest check a lever on folders
# that chose nothing
MEASURED = ("fm10", "fm6", "digits", "shapes", "fm30", "photos", "clutter")


def run_mode(
    graft: list[str],
    env: dict,
    data: Path,
    work: Path,
    mode: str,
    budget: str,
    seed: int = 0,
    cold: bool = True,
) -> dict:
    """One `graft train` of `mode` on data/train, scored on data/test; `cold`: the feature cache
    emptied first (the other seeds of a mode reuse what the first one filled)."""
    run, cache = work / f"run-{mode}", work / f"cache-{mode}"
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    cmd = [
        *graft,
        "train",
        str(data / "train"),
        "--out",
        str(run),
        "--overwrite",
        "--cache-dir",
        str(cache),
        "--seed",
        str(seed),
    ]
    if mode == "auto":
        cmd += ["--auto", "--budget", budget]
    elif mode == "last":  # the epoch-trained head, the last epoch kept instead of the best
        cmd += ["--head", "epochs", "--keep", "last"]
    elif mode == "power":  # the default of stops 32-36: square roots instead of fourth roots
        cmd += ["--feature-norm", "power"]
    elif mode == "refit":  # the fitted head fitted again with the val images (stop 46)
        cmd += ["--refit"]
    elif mode == "notta":  # the default without flip test-time augmentation
        cmd += ["--tta", "none"]
    elif mode == "epochs":  # the head trained for epochs, the best on val: the old default
        cmd += ["--head", "epochs"]
    elif mode == "partial":  # the last 4 blocks and a random head, trained together
        cmd += ["--strategy", "partial", "--unfreeze-last", "4", "--head", "epochs"]
    elif mode == "partial-lpft":  # the same from the head fitted on frozen features: the default
        cmd += ["--strategy", "partial", "--unfreeze-last", "4", "--head", "fit"]
    elif mode == "finetune":  # every block and a random head, trained together
        cmd += ["--strategy", "finetune", "--head", "epochs"]
    elif mode == "finetune-lpft":  # the same from the head fitted on frozen features: the default
        cmd += ["--strategy", "finetune", "--head", "fit"]
    start = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    meta = json.loads((run / "model.json").read_text())
    est = meta.get("estimate") or meta["val"]
    ev = subprocess.run(
        [*graft, "evaluate", str(run), str(data / "test"), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    scored = json.loads(ev.stdout)
    unseen = scored["accuracy"]
    calibrated = (scored.get("calibration") or {}).get("calibrated") or {}
    low, high = est["accuracy_ci95"]
    expected = _expected_inside(est["n"], scored["n"], unseen)
    pooled = _pooled(meta, est)
    if pooled:
        pooled["inside"] = pooled["ci95"][0] <= unseen <= pooled["ci95"][1]
    return {
        "mode": mode,
        "seed": seed,
        "cold": cold,
        "printed": est["accuracy"],
        "ci95": [low, high],
        "unseen": unseen,
        "inside": low <= unseen <= high,
        "expected_inside": expected,
        "nll": calibrated.get("nll"),
        "ece": calibrated.get("ece"),
        "wall_s": round(wall, 1),
        "chosen": (meta.get("selection") or {}).get("chosen"),
        "pooled": pooled,
    }


def _expected_inside(n_val: int, n_unseen: int, p: float) -> float:
    """How often the unseen accuracy would lie inside the val accuracy's Wilson interval if the
    val and unseen images were drawn from one source on which the model is right with chance p
    (here the unseen accuracy): both counts binomial, summed exactly. Below 0.95, because the
    unseen accuracy is a sample too."""
    from scipy.stats import binom

    total = 0.0
    for k in range(n_val + 1):
        low, high = wilson_interval(k, n_val)
        top, bottom = math.floor(high * n_unseen + 1e-9), math.ceil(low * n_unseen - 1e-9)
        inside = binom.cdf(top, n_unseen, p) - binom.cdf(bottom - 1, n_unseen, p)
        total += binom.pmf(k, n_val, p) * inside
    return float(total)


def _at_least(misses: int, chances: list[float]) -> float:
    """P(at least `misses` of independent events, each with its own chance, happen)."""
    dist = np.array([1.0])
    for c in chances:
        dist = np.convolve(dist, [1 - c, c])
    return float(dist[misses:].sum())


def _pooled(meta: dict, est: dict) -> dict | None:
    """The fitted head's out-of-fold accuracy on the training images (its cross-validation, at
    the strength chosen) pooled with the val accuracy: four to five times the images of val
    alone, with its Wilson interval. Not what graft prints (stop 47 in docs/QUALITY.md says why);
    None for a head that was not cross-validated."""
    best = meta["best"]
    if best.get("head") != "fit" or not best.get("folds"):
        return None
    sub = best.get("subsample")
    # the path's strengths are the grid's: a subsample's choice is kept before its scaling, and
    # a refit keeps the first fit's strength
    l2 = sub["l2"] if sub else (best.get("refit") or {}).get("l2_chosen", best["l2"])
    cv = next(r["cv_acc"] for r in best["path"] if r["l2"] == l2)
    n_cv = int(sub["images"]) if sub else sum(meta["class_counts"]["train"].values())
    n = n_cv + est["n"]
    correct = round(cv * n_cv) + round(est["accuracy"] * est["n"])
    return {"accuracy": correct / n, "n": n, "ci95": list(wilson_interval(correct, n))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-quality"))
    ap.add_argument("--sets", default=",".join(MEASURED))
    ap.add_argument("--modes", default="default,auto")
    ap.add_argument("--budget", default="5m")
    ap.add_argument("--label", default="now", help="names the results file: results-LABEL.json")
    ap.add_argument("--src", type=Path, help="run graft from this src/ folder (PYTHONPATH)")
    ap.add_argument("--seeds", default="0", help="graft train --seed of each run, e.g. 0,1,2")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = str(args.src.resolve())
    graft = [sys.executable, "-m", "graft"]
    rows = []
    print(
        f"{'set':8} {'mode':8} {'seed':>4} {'printed':>7} {'95% interval':>15} {'unseen':>7} "
        f"{'inside':>6} {'wall s':>7} {'nll':>6} {'ece':>6}  chosen"
    )
    for name in args.sets.split(","):
        maker, _ = SETS[name]
        data = args.work / "data" / name
        if not data.exists():
            maker(data)
        for mode, seed in [(m, s) for m in args.modes.split(",") for s in seeds]:
            work = args.work / args.label / name
            cold = seed == seeds[0]
            r = {"set": name, **run_mode(graft, env, data, work, mode, args.budget, seed, cold)}
            rows.append(r)
            print(
                f"{name:8} {mode:8} {seed:4d} {r['printed']:7.4f} "
                f"{r['ci95'][0]:7.4f}-{r['ci95'][1]:.4f} {r['unseen']:7.4f} "
                f"{'yes' if r['inside'] else 'NO':>6} {r['wall_s']:7.1f} "
                f"{_num(r['nll'])} {_num(r['ece'])}  {r['chosen'] or ''}",
                flush=True,
            )
    (args.work / f"results-{args.label}.json").write_text(json.dumps(rows, indent=1))
    if len(seeds) > 1:
        print(f"mean unseen over seeds {args.seeds}, per set:")
        for name in args.sets.split(","):
            means = [
                statistics.mean(r["unseen"] for r in rows if r["set"] == name and r["mode"] == m)
                for m in args.modes.split(",")
            ]
            print(
                f"{name:8} "
                + " ".join(f"{m} {v:.4f}" for m, v in zip(args.modes.split(","), means))
            )
    for mode in args.modes.split(","):
        mine = [r for r in rows if r["mode"] == mode]
        cold = [r for r in mine if r["cold"]]
        print(
            f"mean {mode}: unseen {sum(r['unseen'] for r in mine) / len(mine):.4f}, "
            f"wall (cold runs) {sum(r['wall_s'] for r in cold) / len(cold):.1f} s, inside "
            f"{sum(r['inside'] for r in mine)}/{len(mine)}, nll {_mean(mine, 'nll')}, "
            f"ece {_mean(mine, 'ece')}"
        )
        misses = sum(not r["inside"] for r in mine)
        chances = [1 - r["expected_inside"] for r in mine]
        print(
            f"     {mode}: inside {len(mine) - misses}/{len(mine)}; "
            f"{len(mine) - sum(chances):.1f} expected if val and unseen images were one source, "
            f"and {misses} or more misses then has chance {_at_least(misses, chances):.2f}"
        )
        pooled = [r for r in mine if r.get("pooled")]
        if len(pooled) > 1:
            printed = [r["unseen"] - r["printed"] for r in pooled]
            other = [r["unseen"] - r["pooled"]["accuracy"] for r in pooled]
            print(
                f"     {mode}, the {len(pooled)} cross-validated heads: unseen - printed "
                f"{100 * statistics.mean(printed):+.2f} sd {100 * statistics.pstdev(printed):.2f} "
                f"points, inside {sum(r['inside'] for r in pooled)}/{len(pooled)}; pooled with "
                f"out-of-fold {100 * statistics.mean(other):+.2f} sd "
                f"{100 * statistics.pstdev(other):.2f}, inside "
                f"{sum(r['pooled']['inside'] for r in pooled)}/{len(pooled)}"
            )


def _num(x: float | None) -> str:
    return f"{x:6.3f}" if x is not None else f"{'-':>6}"


def _mean(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{sum(values) / len(values):.4f}" if values else "-"


if __name__ == "__main__":
    main()
