"""The run folder: the names of the files in it, making it, and its per-epoch `metrics.csv`.

Every module that reads or writes a run folder takes the names from here, so a name is typed once.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, GraftError
from .runtime import clean_temp_files

log = logging.getLogger(__name__)

CONFIG = "config.yaml"  # the resolved config: `graft train --config` reproduces the run
METRICS = "metrics.csv"  # one row per epoch
SPLIT = "split"  # folder: the files of each split and source.json
SPLIT_FILES = ("train.txt", "val.txt", "test.txt", "source.json")
LOCK = ".graft-lock"  # one live writer; holds the writer's PID
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
REFERENCE = "reference.safetensors"  # training features the unknown score measures against
FEEDBACK = "feedback.csv"  # graft serve's "this is wrong, it is X": corrections to label
SCORES = "scores.safetensors"  # held-out scores that thresholds are chosen on (graft thresholds)
LAST_WEIGHTS = "last.safetensors"  # resume point, written after every epoch
LAST_META = "last.json"
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
CARD = "README.md"  # the model card (card.py)
COMPARE_JSON = "compare.json"  # graft compare / train --auto: every candidate's row
COMPARE_HTML = "compare.html"
CURVES = "curves.png"  # the report's figures, also embedded in report.html
CONFUSION = "confusion_matrix.png"
SAMPLES = "samples.png"
PREDICTIONS = "predictions.png"
TOP_LOSSES = "top_losses.png"
EXPLANATIONS = "explanations.png"
RELIABILITY = "reliability.png"  # confidence against accuracy, raw and calibrated
FIGURES = (CURVES, CONFUSION, SAMPLES, PREDICTIONS, TOP_LOSSES, EXPLANATIONS, RELIABILITY)
# graft audit's folder (not a run folder: its default --out, and what a run's report links to)
AUDIT_DIR = "audit"
AUDIT_JSON, AUDIT_HTML, FIXES_CSV = "audit.json", "audit.html", "fixes.csv"


def default_run_dir(backbone: str, parent: str | Path = "runs") -> Path:
    """`runs/<timestamp>-<backbone>`, numbered when that folder exists already."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(parent) / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', backbone)}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


@contextlib.contextmanager
def claim(run_dir: str | Path, resuming: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Hold `run_dir` for one training: one live writer (a lock the OS releases if the holder
    dies), a finished or interrupted run never replaced unless `overwrite`, temp files of an
    interrupted write removed. A folder this call created is removed again if the run fails
    before writing anything into it."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a folder: name a folder for the run")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(run_dir)
    try:
        if not resuming:
            _refuse_foreign(run_dir)  # --overwrite replaces a run, never someone's files
        if not resuming and not overwrite:
            _refuse_replacing(run_dir)
        removed = clean_temp_files(run_dir)
        if removed:
            log.info("removed %d temp file(s) an interrupted write left in %s", removed, run_dir)
        yield run_dir
    except BaseException:
        if created and not any(p.name != LOCK for p in run_dir.iterdir()):
            (run_dir / LOCK).unlink(missing_ok=True)
            os.close(lock)
            lock = None
            run_dir.rmdir()
        raise
    finally:
        if lock is not None:
            (run_dir / LOCK).unlink(missing_ok=True)
            os.close(lock)  # closing releases the flock


def _lock(run_dir: Path) -> int:
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise GraftError(
            f"{run_dir} is in use by another graft process (PID {holder}); wait "
            "for it to finish, or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _refuse_replacing(run_dir: Path) -> None:
    if (run_dir / MODEL_META).is_file():
        raise ConfigError(
            f"{run_dir} holds a finished run ({MODEL_META}); pass --overwrite to "
            "replace it, or choose another --out"
        )
    if (run_dir / LAST_META).is_file():
        raise ConfigError(
            f"{run_dir} holds an interrupted run: continue it with graft train "
            f"--resume {run_dir}, or pass --overwrite to start again"
        )


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds (the start of) a graft run: its model, its resume point, its
    metrics or its recorded split."""
    marks = (MODEL_META, LAST_META, METRICS, f"{SPLIT}/source.json")
    return any((run_dir / m).is_file() for m in marks)


def _refuse_foreign(run_dir: Path) -> None:
    """A folder of someone else's files is never written into: graft would replace a README.md or
    a config.yaml of theirs with its own (hidden entries and graft's lock do not count)."""
    if holds_run(run_dir):
        return
    theirs = sorted(
        p.name for p in run_dir.iterdir() if p.name != LOCK and not p.name.startswith(".")
    )
    if theirs:
        shown = ", ".join(theirs[:3]) + (", ..." if len(theirs) > 3 else "")
        raise ConfigError(
            f"--out {run_dir} holds files that are not a graft run ({shown}); graft "
            "writes a run only into a new or empty folder, or over a run it made: "
            "choose another --out"
        )


def check_out_of_data(run_dir: str | Path, data_dir: str | Path) -> None:
    """The run folder may not be the data folder or lie inside it: the run would land among the
    class folders, and the next training would read it as data."""
    out, data = Path(run_dir).resolve(), Path(data_dir).resolve()
    if out == data or data in out.parents:
        raise ConfigError(
            f"--out {run_dir} is inside the data folder {data_dir}: put the run "
            "elsewhere (e.g. runs/NAME)"
        )


def start_new_run(run_dir: str | Path) -> None:
    """Remove what an earlier run left (graft's own file names only), so nothing of it mixes
    with the new one. Called once the new run's data has loaded: a run that fails earlier leaves
    the old one whole."""
    run_dir = Path(run_dir)
    for name in (
        MODEL_WEIGHTS,
        MODEL_META,
        REFERENCE,
        SCORES,
        LAST_WEIGHTS,
        LAST_META,
        METRICS,
        CONFIG,
        REPORT_HTML,
        REPORT_JSON,
        CARD,
        COMPARE_JSON,
        COMPARE_HTML,
        *FIGURES,
    ):
        (run_dir / name).unlink(missing_ok=True)
    for name in SPLIT_FILES:
        (run_dir / SPLIT / name).unlink(missing_ok=True)


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
    for key, value in row.items():
        if isinstance(value, dict):  # per-class values: one column each
            flat.update({f"{key}/{name}": v for name, v in value.items()})
    return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in flat.items()}


def append_metrics(run_dir: str | Path, row: dict[str, Any]) -> None:
    path = Path(run_dir) / METRICS
    flat = _csv_row(row)
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(flat))
        if new:
            writer.writeheader()
        writer.writerow(flat)


def rewrite_metrics(run_dir: str | Path, history: list[dict[str, Any]]) -> None:
    """metrics.csv from a checkpoint's history: a row written after the last checkpoint (or lost
    before it) cannot survive a resume as a duplicate or a gap."""
    (Path(run_dir) / METRICS).unlink(missing_ok=True)
    for row in history:
        append_metrics(run_dir, row)


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]
