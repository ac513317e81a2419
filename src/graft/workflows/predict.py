"""`graft predict --out FILE`: predictions written as they come, a long job resumable.

Rows go to FILE batch by batch (one write and a flush per batch), so memory stays flat whatever
the number of files and a crash or Ctrl-C keeps every batch written. `--resume` reads the files
FILE already holds, drops the last one (its rows may be cut short by the crash) and appends the
rest. FILE's format follows its suffix: `.csv` (graft predict --csv's columns: one row per class
shown) or `.jsonl` (one JSON object per file, --json's fields). A file that cannot be read is a
row with its error, never a stop. A full disk stops with one line; the rows written so far stay
whole (a cut batch is truncated back), ready for `--resume`.

Under torchrun (`predict_sharded`) each process predicts one run of consecutive files into its
own part file beside FILE (`queue.part1of4.csv`), resumable as FILE is; when every part is done,
rank 0 appends them to FILE in rank order (so in input order) and deletes them. FILE's folder
must be one every process sees (the same machine, or a shared file system).
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

from ..core.dist import Dist, all_gather, block, broadcast
from ..core.errors import ConfigError, GraftError
from ..core.runtime import Progress, no_progress
from ..inference.classifier import Prediction, check_top_k

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
    fmt = _check_out(out, top_k)  # before FILE is made
    done = _open_out(out, fmt, resume)
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


def predict_sharded(
    clf: Any,
    paths: Sequence[str],
    out: str | Path,
    d: Dist,
    resume: bool = False,
    top_k: int | None = None,
    batch_size: int = 32,
    progress: Progress = no_progress,
) -> Written:
    """`predict_to_file` by the `d.world` processes of a torchrun job, each with its share of
    `paths` (consecutive files) in a part file; rank 0 merges the parts into `out`. Every rank
    returns the job's totals. A rerun with `resume` goes on from what FILE and the parts hold."""
    out = Path(out)
    fmt = _check_out(out, top_k)
    # rank 0 alone looks at FILE (refuses, resumes or creates it): no rank sees it half made
    done = broadcast(d, _open_out(out, fmt, resume) if d.is_main else None, "reading --out")
    part = _part(out, d.rank, d.world)
    mine = [p for p in block(list(paths), d) if str(p) not in done]
    mine_done = predict_to_file(
        clf, mine, part, resume=resume, top_k=top_k, batch_size=batch_size, progress=progress
    )
    counts = all_gather(d, (mine_done.predicted, mine_done.skipped, mine_done.errors), "predicting")
    if d.is_main:
        with open(out, "a", encoding="utf-8", newline="") as fh:
            for rank in range(d.world):
                _merge(_part(out, rank, d.world), fmt, done, fh, out)
        for rank in range(d.world):
            _part(out, rank, d.world).unlink(missing_ok=True)
    all_gather(d, None, "merging the parts")  # every rank returns once FILE is whole
    predicted, skipped, errors = (sum(c[i] for c in counts) for i in range(3))
    return Written(out, predicted, skipped + len(done), errors)


def predict_gathered(
    clf: Any, paths: Sequence[str], d: Dist, top_k: int | None = None, batch_size: int = 32
) -> list[Prediction]:
    """`Classifier.predict_files` by the processes of a torchrun job, each with its share of
    `paths`: every rank returns all the predictions, in input order (for stdout: small jobs)."""
    mine = clf.predict_files(block(list(paths), d), top_k=top_k, batch_size=batch_size)
    return [p for share in all_gather(d, mine, "predicting") for p in share]


def _check_out(out: Path, top_k: int | None) -> str:
    """FILE's format, from its suffix; a bad top_k or suffix refused before anything is made."""
    check_top_k(top_k)
    fmt = out.suffix.lower()
    if fmt not in FORMATS:
        raise ConfigError(f"--out {out}: name a .csv or a .jsonl file (its suffix is the format)")
    return fmt


def _open_out(out: Path, fmt: str, resume: bool) -> set[str]:
    """The files FILE holds already (`resume`), or FILE made anew; an existing FILE without
    `resume` is refused."""
    if out.exists() and not resume:
        raise ConfigError(f"--out {out} exists: add --resume to go on with it, or name a new file")
    if resume and out.exists():
        return _resume_point(out, fmt)
    _write_new(out, CSV_HEADER + "\n" if fmt == ".csv" else "")
    return set()


def _part(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.stem}.part{rank}of{world}{out.suffix}")


def _merge(part: Path, fmt: str, done: set[str], fh, out: Path) -> None:
    """Append `part`'s rows to FILE (open as `fh`), less those of files FILE already holds (a
    merge cut short before: its rerun with --resume appends the rest once)."""
    if not part.exists():
        return
    with open(part, encoding="utf-8", newline="") as src:
        if fmt == ".csv":
            rows = csv.reader(src)
            next(rows, None)  # the header
            lines = (",".join(map(_csv, r)) + "\n" for r in rows if r and r[0] not in done)
        else:
            lines = (line for line in src if line.strip() and json.loads(line)["path"] not in done)
        batch: list[str] = []
        try:
            for line in lines:
                batch.append(line)
                if len(batch) >= 4096:
                    _append(fh, out, "".join(batch), Written(out))
                    batch = []
            _append(fh, out, "".join(batch), Written(out))
        except GraftError as exc:
            raise GraftError(
                f"merging {part.name} into {out}: {exc}; the parts are kept: run the same "
                "command with --resume to finish"
            ) from None


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
