"""Can graft's probabilities be taken at their word? Calibration on unseen images, as a table.

For each set (made as bench/quality.py makes them, with many more unseen images: an expected
calibration error needs thousands to mean anything), `graft train` gets only the training folder
with its defaults, then `graft evaluate` scores the saved model on the unseen folder and reports
the expected calibration error (15 bins), the negative log-likelihood, the mean confidence and the
accuracy, of the raw softmax and of the calibrated probabilities graft gives.

    python bench/calibration.py [--work /tmp/graft-calibration] [--sets fm10,fm6,digits,shapes]
                                [--strategy extract] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quality import make_digits, make_fashion, make_shapes  # noqa: E402

SETS = {  # name -> (maker, what it is)
    "fm10": (
        lambda r: make_fashion(r, list(range(10)), 25, 300, 1000),
        "Fashion-MNIST, 10 classes, 25 train / 300 unseen each",
    ),
    "fm6": (
        lambda r: make_fashion(r, [0, 1, 3, 7, 8, 9], 20, 500, 2000),
        "Fashion-MNIST, 6 classes, 20 train / 500 unseen each",
    ),
    "digits": (
        lambda r: make_digits(r, 20, 150),
        "sklearn digits, 10 classes, 20 train / ~150 unseen each (all the rest)",
    ),
    "shapes": (
        lambda r: make_shapes(r, 40, 150),
        "shapes on clutter, 4 classes, 40 train / 150 unseen each",
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-calibration"))
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--strategy", default="extract")
    ap.add_argument("--epochs", type=int)
    args = ap.parse_args()
    graft = [sys.executable, "-m", "graft"]
    print(f"strategy {args.strategy}; unseen images scored by `graft evaluate RUN TEST`\n")
    print(
        "| set | unseen | T | accuracy | ECE raw | ECE | NLL raw | NLL | confidence raw | "
        "confidence |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.sets.split(","):
        maker, _ = SETS[name]
        data = args.work / name
        if not (data / "test").is_dir():
            shutil.rmtree(data, ignore_errors=True)
            maker(data)
        run = args.work / f"run-{name}-{args.strategy}"
        cmd = [
            *graft,
            "train",
            str(data / "train"),
            "--out",
            str(run),
            "--overwrite",
            "--strategy",
            args.strategy,
            "--cache-dir",
            str(args.work / "cache"),
        ]
        if args.strategy == "partial":
            cmd += ["--unfreeze-last", "3"]
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        ev = subprocess.run(
            [*graft, "evaluate", str(run), str(data / "test"), "--json"],
            check=True,
            capture_output=True,
            text=True,
        )
        c = json.loads(ev.stdout)["calibration"]
        raw, cal = c["raw"], c["calibrated"]
        print(
            f"| {name} | {cal['n']} | {c['temperature']:.3f} | {cal['accuracy']:.4f} | "
            f"{raw['ece']:.4f} | {cal['ece']:.4f} | {raw['nll']:.4f} | {cal['nll']:.4f} | "
            f"{raw['confidence']:.4f} | {cal['confidence']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
