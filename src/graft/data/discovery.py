"""Data: find the images and classes of a data folder in either layout, and verify a folder.

Layouts: `DATA/train/<class>/`, `DATA/val/<class>/` (optional `DATA/test/<class>/`), or a flat
`DATA/<class>/` split here, stratified and seeded. Images in subfolders of a class belong to it.
Folders holding graft runs are never classes. Or any folder of images with a labels table
(`labels=FILE.csv`, read by `table.py`), split as a flat folder unless the table has a split
column. Decoding the images is `images.py`'s job; splits (and recording them) are `splits.py`'s.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..core.constants import MAX_PIXELS
from ..core.errors import DatasetError
from .images import BadFile, verify_files
from .splits import DatasetSplit, Sample, stratified_split
from .table import Table, read_table

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


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
        keep = (d for d in dirnames if not is_hidden(d))
        dirnames[:] = sorted(d for d in keep if not is_run_folder(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            if not is_hidden(name) and is_image_file(name):
                found.append(os.path.join(dirpath, name))
    return found


def is_run_folder(path: str | Path) -> bool:
    """A folder graft wrote a run into (model.json, or the resume point of an unfinished run)."""
    return any((Path(path) / name).is_file() for name in ("model.json", "last.json"))


def _holds_runs(folder: Path) -> bool:
    """A run folder, or a folder of run folders (runs/) with no images of its own."""
    if is_run_folder(folder):
        return True
    subdirs = [p for p in folder.iterdir() if p.is_dir()]
    loose = any(p.is_file() and is_image_file(p) for p in folder.iterdir())
    return bool(subdirs) and not loose and all(is_run_folder(p) for p in subdirs)


def _class_folders(folder: Path) -> list[str]:
    names = []
    for p in sorted(folder.iterdir()):
        if not p.is_dir() or is_hidden(p.name):
            continue
        if _holds_runs(p):
            log.warning("skipping %s: it holds graft runs, not images of a class", p)
            continue
        names.append(p.name)
    return names


def _scan_split(folder: Path, root: Path) -> dict[str, list[str]]:
    """{class name: image paths} for one split folder; empty classes included (as [])."""
    return {c: find_images(folder / c, root) for c in _class_folders(folder)}


def discover(
    data_dir: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    labels: str | Path | None = None,
    path_column: str | None = None,
    label_column: str | None = None,
) -> DatasetSplit:
    """Find the classes and the train/val(/test) samples of a data folder, from its class
    folders or, given `labels`, from that table (`table.py` says how it is read).

    >>> split = discover("data/demo")  # doctest: +SKIP
    >>> split.classes
    ['bag', 'sneaker', ...]
    >>> discover("data/kaggle/train", labels="data/kaggle/train.csv").layout  # doctest: +SKIP
    'flat'
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder")
    if labels is not None:
        table = read_table(labels, root, image_index(root), path_column, label_column)
        return _table_split(root, table, val_fraction, seed)
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
    too_few = [c for c, files in flat.items() if len(files) < 2]
    if too_few:
        raise DatasetError(
            f"{root}: class(es) with a single image: {', '.join(too_few)}; a flat folder is split "
            "into train and val, which needs at least 2 images per class: add images, or give "
            "train/ and val/ folders"
        )
    classes = sorted(flat)
    train, val = stratified_split(_samples(flat, classes), val_fraction, seed)
    return DatasetSplit(str(root.resolve()), classes, train, val, [], layout="flat")


def image_index(root: Path) -> dict[str, str]:
    """{path relative to `root`, `/`-separated: absolute path} of every image under it."""
    return {Path(p).relative_to(root).as_posix(): os.path.abspath(p) for p in find_images(root)}


def _table_split(root: Path, table: Table, val_fraction: float, seed: int) -> DatasetSplit:
    """The split a table gives: its split column's, or a flat folder's (stratified, seeded).
    The checks a folder of class folders gets, worded for the table."""
    problem = next(filter(None, (_class_name_problem(r.label) for r in table.rows)), None)
    if problem:
        line = next(r.line for r in table.rows if _class_name_problem(r.label))
        raise DatasetError(f"{table.file} line {line}: {problem} in the table")
    classes = sorted({r.label for r in table.rows})
    if len(classes) < 2:
        raise DatasetError(
            f"{table.file}: only one class ({classes[0]}); a classifier needs at least two"
        )
    index = {c: i for i, c in enumerate(classes)}
    by_split: dict[str, list[Sample]] = {}
    for r in table.rows:
        by_split.setdefault(r.split or "", []).append((r.path, index[r.label]))
    out = DatasetSplit(str(root.resolve()), classes, [], [], [], labels=table.record())
    if table.split_column is None:
        counts = Counter(r.label for r in table.rows)
        too_few = sorted(c for c in classes if counts[c] < 2)
        if too_few:
            raise DatasetError(
                f"{table.file}: class(es) with a single image: {', '.join(too_few)}; without a "
                "split column the images are split into train and val, which needs at least 2 "
                "per class: add images, or a split column"
            )
        out.train, out.val = stratified_split(by_split[""], val_fraction, seed)
        out.layout = "flat"
        return out
    for name in ("train", "val", "test"):
        samples = sorted(by_split.get(name, []), key=lambda s: (s[1], s[0]))
        present = {y for _, y in samples}
        lacking = [c for i, c in enumerate(classes) if i not in present]
        if lacking and (samples or name == "train"):
            raise DatasetError(
                f"{table.file}: the {name} rows have no image of class(es) "
                f"{', '.join(lacking)}: give each class {name} rows, or drop the split column"
            )
        setattr(out, name, samples)
    if not out.val:
        log.info("%s has no val rows: holding out %.0f%% of train", table.file, val_fraction * 100)
        out.train, out.val = stratified_split(out.train, val_fraction, seed)
    return out


def _samples(by_class: dict[str, list[str]], classes: list[str]) -> list[Sample]:
    index = {c: i for i, c in enumerate(classes)}
    return [(os.path.abspath(p), index[c]) for c in classes if c in by_class for p in by_class[c]]


def class_names_problem(classes: object) -> str | None:
    """What is wrong with a list of class names (from folders or from a model file), or None:
    at least two, each a non-empty string that can be a folder name and a line of text, no two
    alike. The run's split files, the report, the card and predict's plain output all rely on it.
    """
    if not (isinstance(classes, list) and len(classes) >= 2):
        return "classes must be a list of at least two names"
    problem = next(filter(None, map(_class_name_problem, classes)), None)
    if problem:
        return problem
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        return f"class name(s) {', '.join(map(repr, repeated))} appear more than once"
    return None


def _class_name_problem(c: object) -> str | None:
    """What is wrong with one class name, or None."""
    if not (isinstance(c, str) and c):
        return f"class name {c!r} is not a non-empty string"
    if c in (".", "..") or any(ch in "/\\" or unicodedata.category(ch)[0] == "C" for ch in c):
        return (
            f"class name {c!r} cannot be used: it holds a path separator or a control "
            "character (newline, tab...); rename it"
        )
    return None


def _check_classes(by_class: dict[str, list[str]], folder: Path) -> None:
    problem = next(filter(None, map(_class_name_problem, by_class)), None)
    if problem:
        raise DatasetError(f"{folder}: {problem}")
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


def verify(
    data_dir: str | Path, workers: int = 4, max_pixels: int = MAX_PIXELS
) -> tuple[DatasetSplit, list[BadFile], list[BadFile]]:
    """Check a data folder: its layout (raises `DatasetError`) and every image: (split,
    unusable files, large files that load downscaled)."""
    split = discover(data_dir)
    paths = [p for p, _ in split.samples()]
    return split, *verify_files(paths, workers, max_pixels)


# ---------------------------------------------------------------- inputs of a trained model


def labelled_samples(
    data_dir: str | Path,
    classes: list[str],
    labels: str | Path | None = None,
    path_column: str | None = None,
    label_column: str | None = None,
) -> list[Sample]:
    """(path, label) for every image of a labelled folder, using the model's class indices: the
    class folders of DATA/test, else DATA/val, else DATA; with a labels table, its test rows,
    else its val rows, else every row."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"{root} does not exist or is not a folder")
    if labels is not None:
        return _table_samples(root, classes, labels, path_column, label_column)
    for sub in ("test", "val"):
        if (root / sub).is_dir():
            root = root / sub
            break
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p.name))
    unknown = [f for f in folders if f not in classes]
    if unknown:
        raise DatasetError(
            f"{root}: class folder(s) the model does not know: {', '.join(unknown)}; "
            f"the model's classes are {', '.join(classes)}"
        )
    if not folders:
        raise DatasetError(f"{root} has no class folders; expected {root}/<class>/<image>")
    samples = [(p, classes.index(c)) for c in folders for p in find_images(root / c, root)]
    if not samples:
        raise DatasetError(f"{root}: no images found in its class folders")
    return samples


def _table_samples(root: Path, classes: list[str], labels, path_column, label_column):
    table = read_table(labels, root, image_index(root), path_column, label_column)
    rows = table.rows
    for name in ("test", "val"):
        if any(r.split == name for r in rows):
            rows = [r for r in rows if r.split == name]
            break
    unknown = sorted({r.label for r in rows} - set(classes))
    if unknown:
        line = next(r.line for r in rows if r.label == unknown[0])
        raise DatasetError(
            f"{table.file}: class(es) the model does not know: {', '.join(unknown)} (first at "
            f"line {line}); the model's classes are {', '.join(classes)}"
        )
    return [(r.path, classes.index(r.label)) for r in rows]


def expand_inputs(inputs: Sequence[str | Path]) -> list[str]:
    """Files as given, folders expanded to the images inside them (sorted, hidden skipped)."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        # a missing file stays in the list and is reported as "file not found" on its own row
        out.extend(find_images(p) if p.is_dir() else [str(p)])
    return out
