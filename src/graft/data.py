"""Data: find images and classes in a folder, split them, record the split, verify a folder.

Layouts: `DATA/train/<class>/`, `DATA/val/<class>/` (optional `DATA/test/<class>/`), or a flat
`DATA/<class>/` split here, stratified and seeded. Images in subfolders of a class belong to it.
Decoding the images themselves is `images.py`'s job.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DatasetError
from .images import BadFile, file_digest, verify_files
from .runtime import atomic_write_text

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")


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


def report_duplicates(split: DatasetSplit, dedupe: bool = False) -> DatasetSplit:
    """Warn about val/test images identical to train images (scores would flatter), or drop
    them from val/test with `dedupe`."""
    dups = find_duplicates(split)
    if not dups:
        return split
    listing = "\n".join(f"  {a}  ==  {b}" for a, b in dups[:20])
    more = f"\n  ... and {len(dups) - 20} more" if len(dups) > 20 else ""
    if dedupe:
        drop = {b for _, b in dups}
        split.val = [s for s in split.val if s[0] not in drop]
        split.test = [s for s in split.test if s[0] not in drop]
        log.warning("--dedupe: dropped %d val/test image(s) that are also in train:\n%s%s",
                    len(drop), listing, more)  # fmt: skip
    else:
        log.warning(
            "%d val/test image(s) are identical to train images (validation scores "
            "will flatter); --dedupe drops them:\n%s%s",
            len(dups),
            listing,
            more,
        )
    return split


def write_split(split: DatasetSplit, folder: str | Path) -> None:
    """`folder/{train,val,test}.txt`: one `class<TAB>path relative to the data folder` per line,
    and `folder/source.json` (data folder, layout, classes): enough to rebuild the split."""
    for name, samples in split.splits().items():
        lines = [f"{split.classes[y]}\t{os.path.relpath(p, split.root)}\n" for p, y in samples]
        atomic_write_text(Path(folder) / f"{name}.txt", "".join(lines))
    source = {"root": split.root, "layout": split.layout, "classes": split.classes}
    atomic_write_text(Path(folder) / "source.json", json.dumps(source, indent=2) + "\n")


def load_split(folder: str | Path, root: str | Path | None = None) -> DatasetSplit:
    """The split a run recorded (`write_split`), with the images under `root` (default: where
    they were), so a resume or a report sees the same files even if the folder gained some."""
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


def verify(data_dir: str | Path, workers: int = 4) -> tuple[DatasetSplit | None, list[BadFile]]:
    """Check a data folder: its layout (raises `DatasetError`) and every image (returned)."""
    split = discover(data_dir)
    paths = [p for samples in split.splits().values() for p, _ in samples]
    return split, verify_files(paths, workers)
