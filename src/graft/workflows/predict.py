"""`graft predict --out FILE`: predictions written as they come, a long job resumable.

Rows go to FILE batch by batch (one write and a flush per batch), so memory stays flat whatever
the number of files and a crash or Ctrl-C keeps every batch written. `--resume` reads the files
FILE already holds, drops the last one (its rows may be cut short by the crash) and appends the
rest. FILE's format follows its suffix: `.csv` (graft predict --csv's columns: one row per class
shown) or `.jsonl` (one JSON object per file, --json's fields). A file that cannot be read is a
row with its error, never a stop. A full disk stops with one line; the rows written so far stay
whole (a cut batch is truncated back), ready for `--resume`.
"""

from __future__ import annotations

import csv
import errno
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, GraftError
from ..core.runtime import Progress, no_progress
from ..inference.classifier import check_top_k

CSV_HEADER = "path,rank,class,probability,error,decision,unknown_score"
FORMATS = (".csv", ".jsonl")


@dataclass
class Written:
    """What `predict_to_file` did: files predicted now, skipped as already in FILE, unreadable."""

    out: Path
    predicted: int = 0
    skipped: int = 0
    errors: int = 0


def csv_lines(p: Any) -> list[str]:
    """One prediction as rows of `CSV_HEADER` (one per class shown, or one with the error)."""
    if p.error:
        return [f"{_csv(p.path)},,,,{_csv(p.error)},,"]
    unknown = "" if p.unknown is None else f"{p.unknown:.6f}"
    return [
        f"{_csv(p.path)},{rank},{_csv(c)},{prob:.6f},,{_csv(p.decision or '')},{unknown}"
        for rank, (c, prob) in enumerate((p.probs or {}).items(), 1)
    ]


def as_record(p: Any) -> dict[str, Any]:
    """One prediction as --json and .jsonl write it."""
    return {
        "path": p.path,
        "decision": p.decision,
        "probabilities": p.probs,
        "unknown_score": p.unknown,
        "error": p.error,
    }


def _csv(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(ch in value for ch in ',"\n\r') else value


def predict_to_file(
    clf: Any,
    paths: Sequence[str],
    out: str | Path,
    resume: bool = False,
    top_k: int | None = None,
    batch_size: int = 32,
    progress: Progress = no_progress,
    on_batch: Callable[[list], None] | None = None,
) -> Written:
    """Predict `paths` with `clf` into `out` (.csv or .jsonl) as the batches come.

    >>> graft.predict_to_file(graft.load("runs/demo"), files, "queue.csv").errors  # doctest: +SKIP
    0
    """
    out = Path(out)
    check_top_k(top_k)  # before FILE is made
    fmt = out.suffix.lower()
    if fmt not in FORMATS:
        raise ConfigError(f"--out {out}: name a .csv or a .jsonl file (its suffix is the format)")
    if out.exists() and not resume:
        raise ConfigError(f"--out {out} exists: add --resume to go on with it, or name a new file")
    if resume and out.exists():
        done = _resume_point(out, fmt)
    else:
        done = set()
        _write_new(out, CSV_HEADER + "\n" if fmt == ".csv" else "")
    todo = [p for p in paths if str(p) not in done]
    result = Written(out, skipped=len(paths) - len(todo))
    batches = -(-len(todo) // batch_size)
    with open(out, "a", encoding="utf-8", newline="") as fh:
        stream = clf.iter_predictions(todo, top_k=top_k, batch_size=batch_size)
        for batch in progress(stream, "predict", batches):
            text = "".join(_lines(batch, fmt))
            _append(fh, out, text, result)
            result.predicted += len(batch)
            result.errors += sum(bool(p.error) for p in batch)
            if on_batch is not None:
                on_batch(batch)
    return result


def _lines(batch: list, fmt: str) -> list[str]:
    if fmt == ".csv":
        return [line + "\n" for p in batch for line in csv_lines(p)]
    return [json.dumps(as_record(p), ensure_ascii=False) + "\n" for p in batch]


def _write_new(out: Path, text: str) -> None:
    try:
        with open(out, "x", encoding="utf-8", newline="") as fh:
            fh.write(text)
    except FileNotFoundError:
        raise ConfigError(f"--out {out}: its folder does not exist") from None


def _append(fh, out: Path, text: str, result: Written) -> None:
    """One batch's rows in one write; on a full disk, FILE cut back to the batches before."""
    start = fh.tell()
    try:
        fh.write(text)
        fh.flush()
    except OSError as exc:
        try:
            fh.truncate(start)
        except OSError:
            pass  # --resume drops a cut last row anyway
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise GraftError(
                f"disk full while writing {out}: the {result.predicted} file(s) before are in it; "
                "free some space and run the same command with --resume"
            ) from None
        raise GraftError(f"cannot write {out}: {exc.strerror or exc}") from None


def _resume_point(out: Path, fmt: str) -> set[str]:
    """The files `out` holds whole. A cut last line goes, and so do the last file's rows (perhaps
    cut short with it): that file is predicted again."""
    try:
        text = out.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--resume: cannot read {out} as graft's output: {exc}") from None
    if fmt == ".csv" and not text.startswith(CSV_HEADER + "\n"):
        raise ConfigError(f"--resume: {out} is not graft predict's CSV (its header differs)")
    text = text[: text.rfind("\n") + 1]
    rows = _rows(text, fmt)
    cut = len(text)
    if rows:  # the last file's rows are together at the end: cut at its first
        last = rows[-1][0]
        cut = next(start for path, start in rows if path == last)
        rows = [r for r in rows if r[0] != last]
    with open(out, "r+b") as fh:
        fh.truncate(len(text[:cut].encode("utf-8")))
    return {path for path, _ in rows}


def _rows(text: str, fmt: str) -> list[tuple[str, int]]:
    """(path, character offset where its row starts) for each row of `text` (whole lines)."""
    if fmt == ".jsonl":
        out, offset = [], 0
        for line in text.splitlines(keepends=True):
            try:
                out.append((str(json.loads(line)["path"]), offset))
            except (ValueError, KeyError, TypeError):
                raise ConfigError(
                    f"--resume: a line of the .jsonl file is not a graft prediction: {line[:80]!r}"
                ) from None
            offset += len(line)
        return out
    # CSV: a path holding a newline is quoted over two lines, so read records, not lines
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    reader = csv.reader(io.StringIO(text, newline=""))
    out, line = [], 0
    try:
        for record in reader:
            if line > 0 and record:  # the header is line 0
                out.append((record[0], starts[line]))
            line = reader.line_num
    except csv.Error:
        pass  # a quoted field cut by the crash: the rows before it stand
    return out
