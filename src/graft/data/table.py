"""Labels from a table: a folder of images and a CSV naming each file's class (and split).

Read as Hugging Face's `imagefolder` (`metadata.csv`: `file_name`, `label`) and Kaggle (`train.csv`:
`id`, `label`, the id without its extension) write them, or with the columns named. The rules,
stated once (README "Labels from a table"):
- UTF-8 text (a byte-order mark is fine); the separator is the one of `,` `;` tab that the header
  line holds most of (`,` on a tie), so a spreadsheet's semicolon export reads as it is;
- the file column: `--path-column`, else the first of PATH_COLUMNS present; the class column:
  `--label-column`, else the first of LABEL_COLUMNS; an optional `split` column (train, val or
  validation, test); names are matched ignoring case and surrounding spaces;
- a path is relative to the data folder (`/` or `\\` separated); one without an image extension
  names the single image of that name with any extension (`abc` finds `abc.jpg`, `img.001`
  finds `img.001.png`);
- a row repeated with the same class counts once; the same file with two classes is refused;
  images in the folder that no row names are not used (logged).
Every refusal is one line naming the table, the line and the fix. Matching the rows to the images
on disk is done against `images` (relative path -> absolute path, from `discovery.find_images`),
so hidden files and run folders are treated as they are in a folder of class folders.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..core.errors import ConfigError, DatasetError, did_you_mean

log = logging.getLogger(__name__)

# Hugging Face's imagefolder first, then the names Kaggle competitions and labelling tools use
PATH_COLUMNS = ("file_name", "filename", "file", "path", "image", "image_id", "id")
LABEL_COLUMNS = ("label", "class", "category", "target")
SPLIT_COLUMN = "split"
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
DELIMITERS = (",", ";", "\t")


@dataclass(frozen=True)
class Row:
    path: str  # absolute
    label: str
    split: str | None  # train, val, test; None without a split column
    line: int  # in the table, for messages


@dataclass(frozen=True)
class Table:
    file: str  # absolute
    sha256: str
    path_column: str
    label_column: str
    split_column: str | None
    rows: list[Row]

    def record(self) -> dict[str, str | None]:
        """What a run folder keeps of the table (source.json): enough to know which one it was."""
        return {
            "file": self.file,
            "sha256": self.sha256,
            "path_column": self.path_column,
            "label_column": self.label_column,
            "split_column": self.split_column,
        }


def read_table(
    file: str | Path,
    root: str | Path,
    images: Mapping[str, str],
    path_column: str | None = None,
    label_column: str | None = None,
) -> Table:
    """The rows of a labels table whose files are images of `root`, or a one-line
    `DatasetError`/`ConfigError` naming the line and the fix.

    >>> read_table("data/train.csv", "data/train", images).rows[0]  # doctest: +SKIP
    Row(path='/abs/data/train/0a1b.jpg', label='cat', split=None, line=2)
    """
    file = Path(file)
    text, digest = _read_text(file)
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DatasetError(f"{file} is empty: its first line must name the columns")
    delimiter = max(DELIMITERS, key=lines[0].count)  # max keeps the first (",") on a tie
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip() for h in next(reader)]
    if len(header) < 2:
        raise DatasetError(
            f"{file}: the first line names one column ({header[0]!r}); a labels table needs a "
            "column for the file and one for the class, separated by , or ; or a tab"
        )
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise DatasetError(f"{file}: column(s) {', '.join(repeated)} named twice: rename one")
    p = _column(file, header, path_column, PATH_COLUMNS, "file", "--path-column")
    lab = _column(file, header, label_column, LABEL_COLUMNS, "class", "--label-column")
    if p == lab:
        raise ConfigError(f"{file}: the file and the class are both column {header[p]!r}")
    s = next((i for i, h in enumerate(header) if h.lower() == SPLIT_COLUMN), None)
    rows = _rows(file, reader, len(header), Path(root), images, p, lab, s)
    if not rows:
        raise DatasetError(f"{file} has a header and no rows: add a row per image")
    unused = len(images) - len({r.path for r in rows})
    if unused:
        log.info("%d image(s) under %s are in no row of %s: not used", unused, root, file)
    split_name = header[s] if s is not None else None
    return Table(str(file.resolve()), digest, header[p], header[lab], split_name, rows)


def _read_text(file: Path) -> tuple[str, str]:
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"labels table {file} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read labels table {file}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig"), hashlib.sha256(data).hexdigest()
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(
            f"{file} line {line} is not UTF-8 text (byte {exc.start}): save the table as UTF-8 "
            "(in a spreadsheet: Save As, CSV UTF-8)"
        ) from None


def _column(
    file: Path,
    header: list[str],
    given: str | None,
    defaults: tuple[str, ...],
    what: str,
    option: str,
) -> int:
    lower = [h.lower() for h in header]
    if given is not None:
        if given.strip().lower() in lower:
            return lower.index(given.strip().lower())
        raise ConfigError(
            f"{file} has no column {given!r}{did_you_mean(given, header)}; its columns are "
            f"{', '.join(header)}"
        )
    found = next((lower.index(name) for name in defaults if name in lower), None)
    if found is None:
        raise DatasetError(
            f"{file}: no {what} column (looked for {', '.join(defaults)}); its columns are "
            f"{', '.join(header)}: name the one to use with {option}"
        )
    return found


def _rows(file, reader, width, root: Path, images, p: int, lab: int, s: int | None) -> list[Row]:
    stems: dict[str, list[str]] = {}
    extensions = {PurePosixPath(rel).suffix.lower() for rel in images}
    for rel in images:
        stems.setdefault(str(PurePosixPath(rel).with_suffix("")), []).append(rel)
    seen: dict[str, Row] = {}
    missing: list[tuple[int, str]] = []
    repeats = 0
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue  # a blank line
        if len(fields) != width:
            raise DatasetError(
                f"{file} line {line} has {len(fields)} field(s) and the header {width}: quote "
                "values that hold the separator, or fix the row"
            )
        value, label = fields[p].strip(), fields[lab].strip()
        if not value:
            raise DatasetError(f"{file} line {line}: no file named: fill it in or remove the row")
        if not label:
            raise DatasetError(
                f"{file} line {line}: no class for {value!r}: fill it in or remove the row"
            )
        rel = _relative(file, line, value, root)
        if rel not in images:
            # an id without its extension (Kaggle), or a dotted id ("img.001" for img.001.jpg)
            has_ext = PurePosixPath(rel).suffix.lower() in extensions
            match = stems.get(rel, []) if not has_ext else []
            if len(match) > 1:
                raise DatasetError(
                    f"{file} line {line}: {value!r} matches {len(match)} images "
                    f"({', '.join(sorted(match)[:3])}): give the file's extension"
                )
            if not match:
                missing.append((line, value))
                continue
            rel = match[0]
        split = _split(file, line, fields[s]) if s is not None else None
        row = Row(images[rel], label, split, line)
        if row.path in seen:
            first = seen[row.path]
            if (first.label, first.split) != (label, split):
                what, a, b = ("classes", first.label, label)
                if first.label == label:
                    what, a, b = ("splits", first.split, split)
                raise DatasetError(
                    f"{file} lines {first.line} and {line} give {value!r} two different "
                    f"{what} ({a} and {b}): keep one row"
                )
            repeats += 1
            continue
        seen[row.path] = row
    if missing:
        line, value = missing[0]
        why = "no such file" if not (root / value).exists() else "not an image graft reads"
        raise DatasetError(
            f"{file}: {len(missing)} row(s) name no image under {root}, the first at line {line}: "
            f"{value!r} ({why}); paths are relative to the data folder: fix them or remove the "
            "rows"
        )
    if repeats:
        log.warning("%s: %d repeated row(s) counted once", file, repeats)
    return list(seen.values())


def _relative(file: Path, line: int, value: str, root: Path) -> str:
    """`value` as a path relative to the data folder, or a refusal if it leaves it."""
    rel = value.replace("\\", "/")
    norm = os.path.normpath(rel).replace(os.sep, "/")
    if rel.startswith("/") or PurePosixPath(rel).is_absolute() or Path(value).is_absolute():
        raise DatasetError(
            f"{file} line {line}: {value!r} is an absolute path; name the file relative to the "
            f"data folder {root}"
        )
    if norm == ".." or norm.startswith("../"):
        raise DatasetError(
            f"{file} line {line}: {value!r} leads out of the data folder {root}; graft reads "
            "only images inside it"
        )
    return norm


def _split(file: Path, line: int, value: str) -> str:
    name = SPLIT_NAMES.get(value.strip().lower())
    if name is None:
        raise DatasetError(
            f"{file} line {line}: split {value.strip()!r} is not train, val (validation) or test: "
            "fix it, or drop the split column to let graft split"
        )
    return name
