"""The run folder: the names of the files in it, making it, and its per-epoch `metrics.csv`.

Every module that reads or writes a run folder takes the names from here, so a name is typed once.
"""

from __future__ import annotations

import csv
import datetime as _dt
import logging
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .runtime import clean_temp_files

log = logging.getLogger(__name__)

CONFIG = "config.yaml"  # the resolved config: `graft train --config` reproduces the run
METRICS = "metrics.csv"  # one row per epoch
SPLIT = "split"  # folder: the files of each split and source.json
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
LAST_WEIGHTS = "last.safetensors"  # resume point, written after every epoch
LAST_META = "last.json"
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
CURVES = "curves.png"  # the report's figures, also embedded in report.html
CONFUSION = "confusion_matrix.png"
SAMPLES = "samples.png"
PREDICTIONS = "predictions.png"
TOP_LOSSES = "top_losses.png"
EXPLANATIONS = "explanations.png"
FIGURES = (CURVES, CONFUSION, SAMPLES, PREDICTIONS, TOP_LOSSES, EXPLANATIONS)


def default_run_dir(backbone: str, parent: str | Path = "runs") -> Path:
    """`runs/<timestamp>-<backbone>`, numbered when that folder exists already."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(parent) / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', backbone)}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def prepare_run_dir(run_dir: str | Path, resuming: bool = False) -> Path:
    """Create the folder, remove temp files an interrupted write left, and (for a new run) the
    old run's metrics and resume point, so a new run neither resumes nor extends an old one."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a folder: name a folder for the run")
    run_dir.mkdir(parents=True, exist_ok=True)
    removed = clean_temp_files(run_dir)
    if removed:
        log.info("removed %d temp file(s) an interrupted write left in %s", removed, run_dir)
    if not resuming:
        for name in (METRICS, LAST_WEIGHTS, LAST_META):
            (run_dir / name).unlink(missing_ok=True)
    return run_dir


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
