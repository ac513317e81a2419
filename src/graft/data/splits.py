"""Splits: a DatasetSplit (classes, samples of train/val/test), the stratified seeded split of a
flat folder, leakage between splits (identical files), and the split a run records and reloads."""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import DatasetError
from ..core.runtime import atomic_write_text
from .images import file_digest

log = logging.getLogger(__name__)

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
    layout: str = "split"  # "split" (train/val folders, or a table's split column) or "flat"
    labels: dict | None = None  # the labels table the classes came from (Table.record())

    def splits(self) -> dict[str, list[Sample]]:
        out = {"train": self.train, "val": self.val}
        if self.test:
            out["test"] = self.test
        return out

    def samples(self) -> list[Sample]:
        """Every sample of every split."""
        return [s for samples in self.splits().values() for s in samples]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: images}}"""
        return {
            name: {c: Counter(y for _, y in samples)[i] for i, c in enumerate(self.classes)}
            for name, samples in self.splits().items()
        }


def _shuffled_classes(samples: Sequence[Sample], seed: int) -> list[list[int]]:
    """Each class's sample indices (classes in label order), sorted by path then shuffled by one
    seeded RNG: the same files and seed give the same order whatever the input order."""
    by_class: dict[int, list[int]] = {}
    for i, (_, y) in enumerate(samples):
        by_class.setdefault(y, []).append(i)
    rng = random.Random(seed)
    out = []
    for label in sorted(by_class):
        idx = sorted(by_class[label], key=lambda i: samples[i])
        rng.shuffle(idx)
        out.append(idx)
    return out


def stratified_split(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Hold out `val_fraction` of every class (at least one image where a class has two)."""
    train: list[Sample] = []
    val: list[Sample] = []
    for idx in _shuffled_classes(samples, seed):
        items = [samples[i] for i in idx]
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    return sorted(train, key=_order), sorted(val, key=_order)


def stratified_folds(samples: Sequence[Sample], k: int, seed: int) -> list[list[int]]:
    """`k` disjoint folds of sample indices, every class dealt round-robin after a seeded shuffle,
    so each fold holds about 1/k of every class. Each class needs at least `k` samples."""
    folds: list[list[int]] = [[] for _ in range(k)]
    start = 0
    for idx in _shuffled_classes(samples, seed):
        for j, i in enumerate(idx):
            folds[(start + j) % k].append(i)
        start += len(idx)  # the next class starts where this one stopped: folds stay even
    return [sorted(f) for f in folds]


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
        log.warning(
            "--dedupe: dropped %d val/test image(s) that are also in train:\n%s%s",
            len(drop),
            listing,
            more,
        )
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
    and `folder/source.json` (data folder, layout, classes, the labels table and its sha256 if
    the classes came from one): enough to rebuild the split."""
    for name, samples in split.splits().items():
        lines = [f"{split.classes[y]}\t{os.path.relpath(p, split.root)}\n" for p, y in samples]
        atomic_write_text(Path(folder) / f"{name}.txt", "".join(lines))
    source = {"root": split.root, "layout": split.layout, "classes": split.classes}
    if split.labels is not None:
        source["labels"] = split.labels
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
    labels = source.get("labels") if isinstance(source.get("labels"), dict) else None
    out = DatasetSplit(str(base), classes, [], [], [], source.get("layout", "split"), labels)
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
    if root is not None and not base.is_dir():
        raise DatasetError(f"{base} is not a folder: say where this run's images are now")
    if out.train and not Path(out.train[0][0]).exists():
        missing = sum(not Path(p).exists() for p, _ in out.train)
        if missing < len(out.train):  # some images went, the folder did not move
            raise DatasetError(
                f"{missing} of this run's {len(out.train)} training images are missing under "
                f"{base} (e.g. {out.train[0][0]}): put them back; the run's split is fixed"
            )
        raise DatasetError(
            f"the images of this run are not under {base} any more; say where "
            "they are now: graft train --resume RUN NEW_DIR, or graft report RUN "
            "--data NEW_DIR"
        )
    return out
