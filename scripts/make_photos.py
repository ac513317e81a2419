"""Write a photo-like ImageFolder: JPEGs at phone-camera size (4000x3000, quality 90).

Three classes of real texture photographs from scikit-image (grass, gravel, brick), each picture a
random 4:3 crop at a random scale, rotation and tint of its class's photograph, enlarged to
4000x3000 with film-grain noise at every scale so that a JPEG holds as much detail, and costs as
much to decode, as a camera's (3-6 MB a file). The demo's 28x28 PNGs hide what decoding costs;
these do not.

    python scripts/make_photos.py --out /tmp/photos --train 30 --val 15   # 135 files, ~600 MB
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (4000, 3000)
CLASSES = ("grass", "gravel", "brick")


def _source(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)().astype(np.float32)


def photo(src: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One 4000x3000 picture of `src` (a grayscale texture photograph)."""
    h, w = src.shape
    side = int(rng.uniform(0.35, 0.9) * min(h, w))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(src[y : y + side, x : x + side].astype(np.uint8))
    crop = crop.rotate(float(rng.uniform(-10, 10)), Image.Resampling.BILINEAR, expand=False)
    m = side * 0.07  # the corners a rotation of 10 degrees leaves empty, cut off; 4:3 kept
    top = m + side * 0.1
    crop = crop.crop((round(m), round(top), round(side - m), round(side - top)))
    big = np.asarray(crop.resize(SIZE, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    tint = rng.uniform(0.6, 1.2, size=3).astype(np.float32)  # a colour cast per picture
    rgb = big[..., None] * tint * 255.0
    fine = rng.normal(0.0, 7.0, size=(SIZE[1], SIZE[0], 1)).astype(np.float32)  # sensor grain
    coarse = rng.normal(0.0, 10.0, size=(SIZE[1] // 16, SIZE[0] // 16, 3)).astype(np.float32)
    coarse = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8))
    coarse = np.asarray(coarse.resize(SIZE, Image.Resampling.BICUBIC), dtype=np.float32) - 128
    return Image.fromarray(np.clip(rgb + fine + coarse, 0, 255).astype(np.uint8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=30, help="pictures per class in train/")
    ap.add_argument("--val", type=int, default=15, help="pictures per class in val/")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    for name in CLASSES:
        src = _source(name)
        for split, n in (("train", args.train), ("val", args.val)):
            folder = Path(args.out) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo(src, rng).save(folder / f"{i:04d}.jpg", quality=90)
    files = list(Path(args.out).rglob("*.jpg"))
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(
        f"{len(files)} JPEGs of {SIZE[0]}x{SIZE[1]} in {args.out}: {mb:.0f} MB, "
        f"{mb / len(files):.1f} MB each"
    )


if __name__ == "__main__":
    main()
