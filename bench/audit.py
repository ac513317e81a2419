"""Does `graft audit` find what is wrong with a folder, and does fixing it pay? As tables.

For each set (made as bench/quality.py makes them), a noisy copy of the training folder: 10% of
its images moved to a wrong class folder (seeded), and near-duplicates of 10 images planted (in
turn resized by 1.5x, recompressed as JPEG at quality 85, cropped by 4% a side and resized back;
two of the crops under another class, the rest under their own). Then:
- label issues: precision and recall of the audit's list against the moved images;
- near-duplicates: how many planted pairs the audit lists (any kind), and how many other pairs
  (the folders' own look-alikes: distinct images, unless the source set repeats one);
- accuracy on unseen images of `graft train` (defaults) on the clean folder, the noisy folder,
  the noisy folder corrected by the audit's own suggestions (fixes.csv as written, --apply), and
  the noisy folder after a person went through the audit's label issues ("reviewed": each listed
  image that was moved goes back to its class, each listed image whose label was right stays);
- the audit's wall time, cold (empty feature cache) and warm, as `graft audit` processes;
"share of the loss recovered" is "-" where the noise cost under half a point.

With `--seeds N` the noise is drawn N times per set (seeds 0..N-1; the clean folder trained on
once) and a last row per set gives the means: one training's accuracy moves by a point or two with
a handful of files, about what 10% of wrong labels costs a head on these features. With
`--train-seeds M` each folder is trained on M times (`graft train --seed 0..M-1`: other val
splits and folds) and its unseen accuracy is the mean, so the differences are less of that luck.

    python bench/audit.py [--work /tmp/graft-audit] [--sets fm10,digits,shapes] [--seeds 1]
                          [--train-seeds 1] [--no-train] [--big N]

--sets also takes photos and clutter (bench/quality.py's makers, more training images each): folders
the thresholds were not set on.

--big N also times a cold and a warm audit of an N-image Fashion-MNIST folder (e.g. 10000).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from quality import make_digits, make_fashion, make_photos, make_shapes  # noqa: E402

SETS = {
    "fm10": lambda r: make_fashion(r, list(range(10)), 40, 100, 1000),
    "digits": lambda r: make_digits(r, 30, 100),
    "shapes": lambda r: make_shapes(r, 60, 100),
}
MORE = {  # not in the default run: an outside check of thresholds set on the three above
    "photos": lambda r: make_photos(r, 30, 50),
    "clutter": lambda r: make_shapes(r, 40, 50, seed=11, clutter=3),
}
NOISE = 0.10
PLANTED = 10


def _variants(im: Image.Image) -> list[Image.Image]:
    w, h = im.size
    big = im.resize((int(w * 1.5), int(h * 1.5)), Image.BICUBIC)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=85)
    jpeg = Image.open(io.BytesIO(buf.getvalue()))
    dx, dy = max(1, w // 25), max(1, h // 25)
    crop = im.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.BICUBIC)
    return [big, jpeg, crop]


def make_noisy(clean: Path, noisy: Path, seed: int = 0) -> tuple[set[str], list[tuple[str, str]]]:
    """Copy `clean` to `noisy` with NOISE of the images in a wrong class folder and PLANTED
    near-duplicates; returns the moved files (relative paths in `noisy`) and the planted pairs."""
    rng = random.Random(seed)
    shutil.rmtree(noisy, ignore_errors=True)
    shutil.copytree(clean, noisy)
    classes = sorted(p.name for p in noisy.iterdir())
    files = sorted(noisy.rglob("*.png"))
    moved = set()
    for f in rng.sample(files, round(NOISE * len(files))):
        wrong = rng.choice([c for c in classes if c != f.parent.name])
        target = noisy / wrong / f"moved-{f.parent.name}-{f.name}"
        shutil.move(f, target)
        moved.add(str(target.relative_to(noisy)))
    pairs = []
    originals = [f for f in sorted(noisy.rglob("*.png")) if not f.name.startswith("moved-")]
    for n, f in enumerate(rng.sample(originals, PLANTED)):
        variant = _variants(Image.open(f))[n % 3]
        other = rng.choice([c for c in classes if c != f.parent.name])
        folder = noisy / (other if n % 3 == 2 and n < 6 else f.parent.name)
        target = folder / f"dup{n}-{f.name}"
        variant.convert("RGB").save(target)
        pairs.append((str(f.relative_to(noisy)), str(target.relative_to(noisy))))
    return moved, pairs


def graft_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "graft", *map(str, args)], check=True, capture_output=True, text=True
    )


def unseen_accuracy(
    train_dir: Path, test_dir: Path, run: Path, cache: Path, trainings: int
) -> float:
    """The mean unseen accuracy of `trainings` trainings on `train_dir` (graft's defaults,
    --seed 0, 1, ...); nan for none."""
    accs = [float("nan")] if trainings == 0 else []
    for seed in range(trainings):
        graft_cmd(
            "train", train_dir, "--out", run, "--overwrite", "--cache-dir", cache,
            "--no-report", "--seed", str(seed),
        )  # fmt: skip
        ev = graft_cmd("evaluate", run, test_dir, "--json")
        accs.append(json.loads(ev.stdout)["accuracy"])
    return statistics.mean(accs)


def timed_audit(data: Path, out: Path, cache: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    graft_cmd("audit", data, "--out", out, "--cache-dir", cache)
    return time.perf_counter() - start, json.loads((out / "audit.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-audit"))
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--big", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="noise draws per set")
    ap.add_argument("--train-seeds", type=int, default=1, help="trainings per folder, averaged")
    ap.add_argument("--no-train", action="store_true", help="the audits only (no accuracies)")
    args = ap.parse_args()
    trainings = 0 if args.no_train else args.train_seeds
    rows = []
    for name in args.sets.split(","):
        data = args.work / name
        if not (data / "test").is_dir():
            shutil.rmtree(data, ignore_errors=True)
            {**SETS, **MORE}[name](data)
        cache = args.work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        clean = None
        per_seed = []
        for seed in range(args.seeds):
            row, clean = one_draw(args.work, name, data, cache, seed, clean, trainings)
            per_seed.append(row)
            label = name if args.seeds == 1 else f"{name} (seed {seed})"
            rows.append(_format(label, row))
            print(f"{name} seed {seed}: done", file=sys.stderr, flush=True)
        if args.seeds > 1:
            mean = {  # the cold time is seed 0's (nan for the others)
                k: statistics.mean([r[k] for r in per_seed if r[k] == r[k]] or [float("nan")])
                for k in per_seed[0]
            }
            rows.append(_format(f"{name}: mean of {args.seeds}", mean))
    print(
        "| set | images | moved | flagged | precision | recall | planted pairs found | "
        "other pairs listed | unseen acc clean | noisy | fixed | reviewed | "
        "share of the loss recovered: fixed | reviewed | audit s cold | warm |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.big:
        big = args.work / f"fm-{args.big}"
        if not big.is_dir():
            make_fashion(big, list(range(10)), args.big // 10, 0, 0)
        cache = args.work / "cache-big"
        shutil.rmtree(cache, ignore_errors=True)
        cold, doc = timed_audit(big / "train", args.work / "audit-big", cache)
        warm, _ = timed_audit(big / "train", args.work / "audit-big", cache)
        print(f"\n{doc['images']} images: audit {cold:.1f} s cold, {warm:.1f} s warm")


def _format(label: str, r: dict[str, float]) -> str:
    cost = r["clean"] - r["noisy"]

    def share(kind: str) -> str:
        return f"{(r[kind] - r['noisy']) / cost:.2f}" if cost > 0.005 else "-"

    return (
        f"| {label} | {r['images']:.0f} | {r['moved']:.0f} | {r['flagged']:.1f} | "
        f"{r['precision']:.3f} | {r['recall']:.3f} | {r['pairs found']:.1f}/{PLANTED} | "
        f"{r['other pairs']:.1f} | {r['clean']:.4f} | {r['noisy']:.4f} | {r['fixed']:.4f} | "
        f"{r['reviewed']:.4f} | {share('fixed')} | {share('reviewed')} | {r['cold']:.1f} | "
        f"{r['warm']:.1f} |"
    )


def reviewed_copy(noisy: Path, out: Path, flagged: set[str], moved: set[str]) -> None:
    """`noisy` as a person leaves it after the audit's label issues: each listed image that was
    moved (named moved-CLASS-NAME by make_noisy) back in CLASS, every other file as it was."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(noisy, out)
    for rel in sorted(flagged & moved):
        f = out / rel
        true_class = f.name.removeprefix("moved-").rsplit("-", 1)[0]
        f.rename(out / true_class / f.name)


def one_draw(
    work: Path, name: str, data: Path, cache: Path, seed: int, clean: float | None, trainings: int
) -> tuple[dict[str, float], float]:
    """One noisy copy of the set, audited (cold, then warm), corrected two ways, and trained on
    `trainings` times each; the clean folder is trained on once (`clean` given: its accuracy
    already)."""
    noisy = work / f"{name}-noisy"
    moved, pairs = make_noisy(data / "train", noisy, seed)
    audit = work / f"audit-{name}"
    if seed == 0:
        cold, doc = timed_audit(noisy, audit, cache)
    else:  # the features of the images that were not planted are cached by now
        cold = float("nan")
    warm, doc = timed_audit(noisy, audit, cache)
    root = doc["data_dir"]
    flagged = {
        str(Path(i["paths"][0]).relative_to(root)) for i in doc["issues"] if i["kind"] == "label"
    }
    hit = len(flagged & moved)
    dups = [
        {str(Path(p).relative_to(root)) for p in i["paths"]}
        for i in doc["issues"]
        if i["kind"] == "duplicate"
    ]
    found_pairs = sum(any(set(p) <= d for d in dups) for p in pairs)
    others = sum(not any(set(p) <= d for p in pairs) for d in dups)  # not planted
    fixed, reviewed = work / f"{name}-fixed", work / f"{name}-reviewed"
    shutil.rmtree(fixed, ignore_errors=True)
    graft_cmd("audit", noisy, "--apply", audit / "fixes.csv", "--out", fixed)
    reviewed_copy(noisy, reviewed, flagged, moved)
    folders = {"noisy": noisy, "fixed": fixed, "reviewed": reviewed}
    if clean is None:
        folders = {"clean": data / "train", **folders}
    acc = {
        kind: unseen_accuracy(folder, data / "test", work / f"run-{name}-{kind}", cache, trainings)
        for kind, folder in folders.items()
    }
    clean = acc.get("clean", clean)
    row = {
        "images": doc["images"],
        "moved": len(moved),
        "flagged": len(flagged),
        "precision": hit / max(1, len(flagged)),
        "recall": hit / len(moved),
        "pairs found": found_pairs,
        "other pairs": others,
        **acc,
        "clean": clean,
        "cold": cold,
        "warm": warm,
    }
    return row, clean


if __name__ == "__main__":
    main()
