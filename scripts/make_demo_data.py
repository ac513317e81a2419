"""Build data/demo: a few hundred Fashion-MNIST images as PNG class folders (train/ and val/).

Source: Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), the IDX files of
https://github.com/zalandoresearch/fashion-mnist (MIT licence). Deterministic: the first images of
each chosen class, train/ from the training file and val/ from the test file.

    python scripts/make_demo_data.py [--source DIR] [--out data/demo] [--train 50] [--val 20]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = {0: "tshirt_top", 1: "trouser", 3: "dress", 7: "sneaker", 8: "bag", 9: "ankle_boot"}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_split(images: np.ndarray, labels: np.ndarray, per_class: int, out: Path) -> int:
    written = 0
    for label, name in CLASSES.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for n, idx in enumerate(np.flatnonzero(labels == label)[:per_class]):
            # Fashion-MNIST is white-on-black; invert to the dark-on-light of a product photo.
            Image.fromarray(255 - images[idx]).save(folder / f"{n:04d}.png", optimize=True)
            written += 1
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, default=Path("data/demo"))
    ap.add_argument("--train", type=int, default=50, help="images per class in train/")
    ap.add_argument("--val", type=int, default=20, help="images per class in val/")
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    n = write_split(
        read_idx(args.source / "train-images-idx3-ubyte.gz"),
        read_idx(args.source / "train-labels-idx1-ubyte.gz"),
        args.train,
        args.out / "train",
    )
    n += write_split(
        read_idx(args.source / "t10k-images-idx3-ubyte.gz"),
        read_idx(args.source / "t10k-labels-idx1-ubyte.gz"),
        args.val,
        args.out / "val",
    )
    print(f"wrote {n} images to {args.out}")


if __name__ == "__main__":
    main()
