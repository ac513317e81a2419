"""Data: find images and classes, split them, load every image safely, verify a folder.

Layouts: `DATA/train/<class>/`, `DATA/val/<class>/` (optional `DATA/test/<class>/`), or a flat
`DATA/<class>/` split here, stratified and seeded. Images in subfolders of a class belong to it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatasetError, ImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (about 9459 x 9459)
MAX_ASPECT = 10.0  # longer/shorter side beyond this is padded, so resizing cannot explode
MAX_SIDE = 4096  # longer side kept before padding an extreme-aspect image


Sample = tuple[str, int]  # (path, class index)


@dataclass
class DatasetSplit:
    """Classes and the samples of each split, as found on disk (paths are absolute)."""

    root: str
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    layout: str = "split"  # "split" (train/val folders) or "flat" (split here)

    def splits(self) -> dict[str, list[Sample]]:
        out = {"train": self.train, "val": self.val}
        if self.test:
            out["test"] = self.test
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: images}}"""
        return {
            name: {c: Counter(y for _, y in samples)[i] for i, c in enumerate(self.classes)}
            for name, samples in self.splits().items()
        }


# ---------------------------------------------------------------- discovery


def is_hidden(name: str) -> bool:
    """Dotfiles (.DS_Store, ._x.jpg, .ipynb_checkpoints) and macOS zip debris are never data."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def find_images(folder: str | Path, root: str | Path | None = None) -> list[str]:
    """All image files under `folder`, sorted, hidden entries skipped.

    Symlinked folders are followed only when they stay inside `root` (default: `folder`) and
    were not visited already, so a link can neither loop nor pull in files from elsewhere.
    A folder named like an image is a folder, not an image.
    """
    folder = Path(folder)
    real_root = os.path.realpath(root if root is not None else folder)
    seen_dirs: set[str] = set()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        inside = real == real_root or real.startswith(real_root + os.sep)
        if real in seen_dirs or not inside:
            if not inside:
                log.warning("skipping %s: it links outside the dataset (%s)", dirpath, real)
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in sorted(filenames):
            if not is_hidden(name) and is_image_file(name):
                found.append(os.path.join(dirpath, name))
    return found


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name))


def _scan_split(folder: Path, root: Path) -> dict[str, list[str]]:
    """{class name: image paths} for one split folder; empty classes included (as [])."""
    return {c: find_images(folder / c, root) for c in _class_folders(folder)}


def discover(data_dir: str | Path, val_fraction: float = 0.2, seed: int = 0) -> DatasetSplit:
    """Find the classes and the train/val(/test) samples of a data folder.

    >>> split = discover("data/demo")  # doctest: +SKIP
    >>> split.classes
    ['bag', 'sneaker', ...]
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder")
    if (root / "train").is_dir():
        train = _scan_split(root / "train", root)
        _check_classes(train, root / "train")
        classes = sorted(train)
        out = DatasetSplit(str(root.resolve()), classes, _samples(train, classes), [])
        if (root / "val").is_dir():
            val = _scan_split(root / "val", root)
            _check_same_classes(classes, val, root / "val")
            out.val = _samples(val, classes)
        else:
            log.info("no %s/val folder: holding out %.0f%% of train", root, val_fraction * 100)
            out.train, out.val = stratified_split(out.train, val_fraction, seed)
        if (root / "test").is_dir():
            test = _scan_split(root / "test", root)
            _check_same_classes(classes, test, root / "test")
            out.test = _samples(test, classes)
        if not out.val:
            raise DatasetError(f"{root}: the validation split has no images")
        return out
    flat = _scan_split(root, root)
    _check_classes(flat, root)
    classes = sorted(flat)
    train, val = stratified_split(_samples(flat, classes), val_fraction, seed)
    return DatasetSplit(str(root.resolve()), classes, train, val, [], layout="flat")


def _samples(by_class: dict[str, list[str]], classes: list[str]) -> list[Sample]:
    index = {c: i for i, c in enumerate(classes)}
    return [(os.path.abspath(p), index[c]) for c in classes if c in by_class for p in by_class[c]]


def _check_classes(by_class: dict[str, list[str]], folder: Path) -> None:
    if not by_class:
        loose = [p for p in folder.iterdir() if p.is_file() and is_image_file(p)]
        hint = (
            f" ({len(loose)} images lie loose in it: put each class in its own folder)"
            if loose
            else ""
        )
        raise DatasetError(
            f"{folder} has no class folders{hint}; expected {folder}/<class>/<image> "
            "or train/ and val/ folders each holding class folders"
        )
    empty = [c for c, files in by_class.items() if not files]
    if empty:
        raise DatasetError(
            f"{folder}: class folder(s) with no images: {', '.join(empty)}; add images "
            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder(s)"
        )
    if len(by_class) < 2:
        raise DatasetError(
            f"{folder}: only one class ({next(iter(by_class))}); a classifier needs at least two "
            "class folders"
        )


def _check_same_classes(classes: list[str], other: dict[str, list[str]], folder: Path) -> None:
    missing = sorted(set(classes) - set(other))
    extra = sorted(set(other) - set(classes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing in {folder.name}: {', '.join(missing)}")
        if extra:
            parts.append(f"in {folder.name} but not in train: {', '.join(extra)}")
        raise DatasetError(
            f"{folder.parent}: train and {folder.name} have different classes ({'; '.join(parts)});"
            " make the class folders match"
        )


def stratified_split(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Hold out `val_fraction` of every class (at least one image where a class has two)."""
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    return sorted(train, key=_order), sorted(val, key=_order)


def _order(s: Sample) -> tuple[int, str]:
    return s[1], s[0]


def file_digest(path: str) -> str:
    """sha256 of a file's bytes: the identity of an image for caching and duplicate checks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_duplicates(split: DatasetSplit) -> list[tuple[str, str]]:
    """(train file, val/test file) pairs with identical content: leakage that inflates scores."""
    train: dict[str, str] = {}
    for path, _ in split.train:
        try:
            train.setdefault(file_digest(path), path)
        except OSError:
            continue  # unreadable files are reported by verification, not here
    pairs = []
    for path, _ in split.val + split.test:
        try:
            digest = file_digest(path)
        except OSError:
            continue
        if digest in train:
            pairs.append((train[digest], path))
    return pairs


def write_split(split: DatasetSplit, folder: str | Path) -> None:
    """`folder/{train,val,test}.txt`: one `class<TAB>path relative to the data folder` per line,
    and `folder/source.json` (data folder, layout, classes): enough to rebuild the split."""
    import json

    from .runtime import atomic_write_text

    for name, samples in split.splits().items():
        lines = [f"{split.classes[y]}\t{os.path.relpath(p, split.root)}\n" for p, y in samples]
        atomic_write_text(Path(folder) / f"{name}.txt", "".join(lines))
    source = {"root": split.root, "layout": split.layout, "classes": split.classes}
    atomic_write_text(Path(folder) / "source.json", json.dumps(source, indent=2) + "\n")


def load_split(folder: str | Path, root: str | Path | None = None) -> DatasetSplit:
    """The split a run recorded (`write_split`), with the images under `root` (default: where
    they were), so a resume or a report sees the same files even if the folder gained some."""
    import json

    folder = Path(folder)
    try:
        source = json.loads((folder / "source.json").read_text(encoding="utf-8"))
        classes = list(source["classes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{folder}/source.json is missing or damaged: {exc}") from exc
    base = Path(root) if root is not None else Path(source["root"])
    out = DatasetSplit(str(base), classes, [], [], [], source.get("layout", "split"))
    for name in SPLITS:
        path = folder / f"{name}.txt"
        if not path.is_file():
            continue
        samples = []
        for line in path.read_text(encoding="utf-8").splitlines():
            cls, _, rel = line.partition("\t")
            if cls not in classes:
                raise DatasetError(f"{path}: class {cls!r} is not in {folder}/source.json")
            samples.append((str(base / rel), classes.index(cls)))
        setattr(out, name, samples)
    if out.train and not Path(out.train[0][0]).exists():
        raise DatasetError(f"the images of this run are not under {base} any more; pass the "
                           "data folder the run was trained on (--data DIR)")  # fmt: skip
    return out


# ---------------------------------------------------------------- loading


def load_image(path: str | Path | bytes, min_side: int | None = None,
               name: str | None = None) -> Image.Image:  # fmt: skip
    """Open any image as an 8-bit RGB picture a network can trust, or raise `ImageError`.

    EXIF orientation applied; transparency composited on white; grayscale, CMYK, 1-bit, 16-bit
    and float images converted by value range; first frame of animations; the pixel count checked
    before decoding (decompression bombs); extreme aspect ratios padded to MAX_ASPECT.
    `min_side` lets JPEGs decode at a reduced scale that still leaves the shorter side >= it.
    `path` may also be the file's bytes (an upload), reported under `name`.
    """
    data = path if isinstance(path, (bytes, bytearray)) else None
    path = name or ("<upload>" if data is not None else str(path))
    try:
        with warnings.catch_warnings():  # our own pixel check below says it better
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data) if data is not None else path)
        with im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageError(
                    path,
                    f"{w}x{h} = {w * h:,} pixels is over the limit of "
                    f"{MAX_PIXELS:,} (decompression-bomb guard); downscale it",
                )
            if w < 1 or h < 1:
                raise ImageError(path, f"image has no pixels ({w}x{h})")
            if min_side and im.format == "JPEG":
                im.draft("RGB", _draft_size(w, h, min_side))
            im.load()
            rgb = prepare_image(im)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(path, "file not found (a broken link, or deleted)") from exc
    except PermissionError as exc:
        raise ImageError(path, "permission denied; make the file readable") from exc
    except IsADirectoryError as exc:
        raise ImageError(path, "is a folder, not an image") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(path, _unidentified_reason(path, data)) from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(
            path,
            f"over the limit of {MAX_PIXELS:,} pixels (decompression-bomb "
            f"guard: {exc}); downscale it",
        ) from exc
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        IndexError,
        TypeError,
        KeyError,
        ZeroDivisionError,
        MemoryError,
        RuntimeError,
    ) as exc:
        # Pillow reports broken data through all of these, depending on the codec.
        raise ImageError(path, f"cannot decode: {exc}") from exc
    return rgb


def prepare_image(im: Image.Image) -> Image.Image:
    """An opened PIL image -> upright 8-bit RGB with transparency on white, aspect limited."""
    return _limit_aspect(_to_rgb(ImageOps.exif_transpose(im)))


def _draft_size(w: int, h: int, min_side: int) -> tuple[int, int]:
    scale = min_side / min(w, h)
    return max(1, int(w * scale)), max(1, int(h * scale))


def _unidentified_reason(path: str, data: bytes | None = None) -> str:
    try:
        size = len(data) if data is not None else os.path.getsize(path)
        if data is not None:
            head = bytes(data[:8])
        else:
            with open(path, "rb") as fh:  # a tiny read, for the message only
                head = fh.read(8)
    except OSError:
        return "not an image file"
    if size == 0:
        return "empty file (0 bytes)"
    if head.startswith(b"%PDF"):
        return "a PDF document, not an image"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file, not an image"
    return "not a recognised image format (wrong extension or corrupt data)"


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im)), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map 16-bit, 32-bit and float pixel values to 0..255 by their type's range, not by clipping
    (clipping is what turns a 16-bit PNG solid white)."""
    a = arr.astype(np.float64)
    if arr.dtype.kind == "f":
        peak = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
    elif arr.dtype.itemsize >= 2 and a.size and a.max() > 255:
        peak = 65535.0
    elif arr.dtype.itemsize >= 2:
        # 16-bit container holding small values: still a 16-bit image (dark, not white).
        peak = 65535.0 if arr.dtype.itemsize == 2 else 255.0
    else:
        peak = 255.0
    return np.clip(np.nan_to_num(a) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)


def _limit_aspect(im: Image.Image) -> Image.Image:
    """Pad an image thinner than 1:MAX_ASPECT with white so that resizing its shorter side to 256
    cannot produce a 2,560,000-pixel-long tensor; shrink its longer side to MAX_SIDE first."""
    w, h = im.size
    if max(w, h) / min(w, h) <= MAX_ASPECT:
        return im
    if max(w, h) > MAX_SIDE:
        s = MAX_SIDE / max(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
        w, h = im.size
    tw = max(w, int(np.ceil(h / MAX_ASPECT)))
    th = max(h, int(np.ceil(w / MAX_ASPECT)))
    canvas = Image.new("RGB", (tw, th), (255, 255, 255))
    canvas.paste(im, ((tw - w) // 2, (th - h) // 2))
    return canvas


# ---------------------------------------------------------------- datasets and verification


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) samples -> (transformed image, label)."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, min_side: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.samples]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(load_image(path, self.min_side)), label


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str


def decode_files(paths: Sequence[str], fn: Callable[[str], Any], workers: int = 4
                 ) -> tuple[list[Any], list[BadFile]]:  # fmt: skip
    """`fn(path)` for every path in threads (Pillow decodes without the GIL): the results (None
    where `fn` raised ImageError) and the failures with their reasons, both in input order."""

    def one(p: str) -> tuple[Any, str | None]:
        try:
            return fn(p), None
        except ImageError as exc:
            return None, exc.reason

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, paths))
    bad = [BadFile(p, why) for p, (_, why) in zip(paths, results) if why is not None]
    return [r for r, _ in results], bad


def verify_files(paths: Sequence[str], workers: int = 4) -> list[BadFile]:
    """Decode every file fully; return the ones that fail, in input order, each with its reason."""

    def check(p: str) -> None:  # decode and drop: verifying must not hold every image in memory
        load_image(p)

    return decode_files(paths, check, workers)[1]


def verify(data_dir: str | Path, workers: int = 4) -> tuple[DatasetSplit | None, list[BadFile]]:
    """Check a data folder: its layout (raises `DatasetError`) and every image (returned)."""
    split = discover(data_dir)
    paths = [p for samples in split.splits().values() for p, _ in samples]
    return split, verify_files(paths, workers)


def format_bad_files(bad: Sequence[BadFile], limit: int = 20) -> str:
    lines = [f"  {b.path}: {b.reason}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)
