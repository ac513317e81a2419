"""Experiment trackers: a run logged to MLflow and TensorBoard as it trains (`--log`).

Each tracker gets the resolved config, every epoch's row (or the fitted head's cross-validation
path), the final val/test numbers and, at the end, the run folder's report, model card, figures
and model. The run folder stays the record: a tracker that is not installed, not reachable or
fails midway costs one warning and is then left alone; training never stops for it.

MLflow: one run per graft run (its id kept in RUN/tracking.json, so `--resume` goes on logging
into it), the tracking URI from `--tracking-uri`, else MLflow's own `MLFLOW_TRACKING_URI`, else
MLflow's default; the experiment from `MLFLOW_EXPERIMENT_NAME`, else "graft". The model is logged
in MLflow's ONNX flavor (graft's export, parity-checked) when onnx is installed, and always as the
run folder's model files. `--auto`'s candidates are child runs. TensorBoard: event files in
RUN/tensorboard (`tensorboard --logdir runs` shows every run), written by the tensorboard
package's own writer through `torch.utils.tensorboard`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.runtime import atomic_write_text

log = logging.getLogger(__name__)

TRACKING_JSON = "tracking.json"  # the MLflow run a graft run logs into
TENSORBOARD_DIR = "tensorboard"
EXPERIMENT = "graft"
FIGURES = ("curves", "confusion_matrix", "reliability", "top_losses", "predictions", "samples")
ARTIFACTS = ("report.html", "report.json", "README.md", "config.yaml", "metrics.csv")
MODEL_FILES = ("model.json", "model.safetensors", "reference.safetensors")
PROBE_SECONDS = 3.0  # how long a tracking server gets to answer before the run goes on without it


class Tracking:
    """The trackers of one run, each failure contained (one warning, then that tracker is off).

    >>> with Tracking(["tensorboard"], run_dir, cfg.to_dict()) as t:  # doctest: +SKIP
    ...     t.epoch({"epoch": 1, "train_loss": 0.5, "val_acc": 0.9})
    """

    def __init__(
        self,
        names: Iterable[str],
        run_dir: str | Path,
        config: dict[str, Any],
        tracking_uri: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.step = 0  # the last epoch (or CV step) logged: the final numbers go there
        self.trackers: list[Any] = []
        self.broken: list[Any] = []  # failed once: warned about, left alone
        self.finished = False
        for name in names:
            tracker = _call(name, "start", _TRACKERS[name], self.run_dir, config, tracking_uri)
            if tracker is not None:
                self.trackers.append(tracker)

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if not self.finished:  # an error or Ctrl-C on the way: the tracker says so
            self.end("KILLED" if kind is KeyboardInterrupt else "FAILED")

    def also(self, on_epoch):
        """`on_epoch` (or nothing) that also logs each row to the trackers."""
        if not self.trackers:
            return on_epoch

        def both(row: dict[str, Any]) -> None:
            self.epoch(row)
            if on_epoch is not None:
                on_epoch(row)

        return both

    def epoch(self, row: dict[str, Any]) -> None:
        """One epoch's row of metrics.csv."""
        self.step = int(row.get("epoch", 0))
        self._each("metrics", _numbers(row, skip=("epoch",)), self.step)

    def fitted_path(self, path: list[dict[str, Any]]) -> None:
        """The fitted head's cross-validation path, one step per L2 strength tried."""
        for step, point in enumerate(path or []):
            values = _numbers(point)  # {"l2", "cv_loss", "cv_acc"}
            if "l2" in values:
                values["cv_l2"] = values.pop("l2")
            self._each("metrics", values, step)
            self.step = step

    def finish(
        self, meta: dict[str, Any], stopped: str | None, selection: dict | None = None
    ) -> None:
        """The final numbers, the candidates of `--auto`, the files; then the end."""
        final = {**_final("val", meta.get("val")), **_final("test", meta.get("test"))}
        self._each("metrics", final, self.step)
        if selection:
            self._each("candidates", selection.get("rows") or [])
        self._each("files")
        self.end("KILLED" if stopped == "interrupted" else "FINISHED")

    def end(self, status: str) -> None:
        self._each("end", status)
        self.finished = True

    def _each(self, method: str, *args: Any) -> None:
        """`method` of every tracker still working; one that fails logs nothing more but is still
        ended (its run closed with the status)."""
        for tracker in self.trackers:
            if tracker in self.broken:
                if method == "end":  # closed quietly: its failure was said once already
                    with contextlib.suppress(Exception):
                        tracker.end(*args)
                continue
            if _call(tracker.name, method, getattr(tracker, method), *args) is _FAILED:
                self.broken.append(tracker)


_FAILED = object()


def _call(name: str, what: str, fn, *args: Any) -> Any:
    """`fn(*args)`, or one warning and `_FAILED` (None for a tracker that did not start)."""
    try:
        result = fn(*args)
        return result if what == "start" or result is not None else True
    except Exception as exc:  # a tracker is never worth the run: any failure is contained
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning(
            "--log %s: %s failed (%s); training goes on without %s, the run folder is complete",
            name,
            what,
            first[:300],
            name,
        )
        return None if what == "start" else _FAILED


def check_trackers(names: Iterable[str]) -> None:
    """Refuse, before any training, a tracker whose package is missing (the install hint)."""
    for name in names:
        module = {"mlflow": "mlflow", "tensorboard": "tensorboard"}[name]
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(
                f"--log {name} needs the {module} package: pip install 'graft[{name}]'"
            ) from None


# ---------------------------------------------------------------- MLflow


class _MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict[str, Any], uri: str | None):
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.mlflow, self.run_dir = mlflow, run_dir
        self.uri = uri or mlflow.get_tracking_uri()
        _probe(self.uri)
        self.client = MlflowClient(self.uri)
        saved = _read_json(run_dir / TRACKING_JSON).get("mlflow") or {}
        if saved.get("run_id") and saved.get("uri") == self.uri:  # --resume: the same run
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = _env("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        run = self.client.create_run(
            experiment, run_name=run_dir.name, tags={"graft.run_dir": str(run_dir.resolve())}
        )
        self.run_id, self.experiment = run.info.run_id, experiment
        record = {"mlflow": {"uri": self.uri, "run_id": self.run_id, "experiment": experiment}}
        atomic_write_text(run_dir / TRACKING_JSON, json.dumps(record, indent=2) + "\n")
        params = [Param(k, _param(v)) for k, v in sorted(config.items())]
        for i in range(0, len(params), 100):  # MLflow takes 100 params a call
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        log.info("mlflow: logging to run %s at %s", self.run_id, self.uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_key(k), v, now, step) for k, v in values.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def candidates(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param

        experiment = self.client.get_run(self.run_id).info.experiment_id
        for row in rows:
            child = self.client.create_run(
                experiment,
                run_name=str(row.get("candidate")),
                tags={"mlflow.parentRunId": self.run_id, "graft.status": str(row.get("status"))},
            )
            settings = {k: row.get(k) for k in ("backbone", "strategy", "unfreeze_last")}
            settings.update(row.get("settings") or {})
            now = int(time.time() * 1000)
            scores = _numbers(row, skip=("rank", "unfreeze_last", "cache_views"))
            self.client.log_batch(
                child.info.run_id,
                params=[Param(k, _param(v)) for k, v in settings.items()],
                metrics=[Metric(_key(k), v, now, 0) for k, v in scores.items()],
            )
            self.client.set_terminated(child.info.run_id, "FINISHED")

    def files(self) -> None:
        for name in ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        for png in sorted(self.run_dir.glob("*.png")):
            self.client.log_artifact(self.run_id, str(png), "figures")
        for name in MODEL_FILES:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name), "graft_model")
        if (self.run_dir / "model.json").is_file():
            self._onnx()

    def _onnx(self) -> None:
        """The model in MLflow's ONNX flavor (what `mlflow ui` lists as the run's model)."""
        try:
            import onnx

            from ..inference.export import export
        except ImportError:
            log.info("mlflow: onnx is not installed; the model is logged as graft's files only")
            return
        path = export(self.run_dir).path
        import mlflow.onnx

        self.mlflow.set_tracking_uri(self.uri)
        with self.mlflow.start_run(run_id=self.run_id):
            mlflow.onnx.log_model(onnx.load(str(path)), name="model")

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def _probe(uri: str) -> None:
    """A tracking server that does not answer in PROBE_SECONDS is down: say so now, not after
    MLflow's own retries (minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_SECONDS):
            pass
    except OSError as exc:
        raise ConnectionError(f"the tracking server {uri} does not answer ({exc})") from None


# ---------------------------------------------------------------- TensorBoard


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any], uri: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR))
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(config.items()))
        self.writer.add_text("config", text, 0)
        self.last = 0

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.last = max(self.last, step)
        for k, v in values.items():
            self.writer.add_scalar(_tag(k), v, step)
        self.writer.flush()

    def candidates(self, rows: list[dict[str, Any]]) -> None:
        lines = [f"    {r.get('candidate')}: {r.get('accuracy')} ({r.get('status')})" for r in rows]
        self.writer.add_text("auto/candidates", "\n".join(lines), self.last)

    def files(self) -> None:
        import numpy as np
        from PIL import Image

        for name in FIGURES:
            png = self.run_dir / f"{name}.png"
            if png.is_file():
                with Image.open(png) as im:
                    pixels = np.asarray(im.convert("RGB"))
                self.writer.add_image(f"report/{name}", pixels, self.last, dataformats="HWC")
        self.writer.flush()

    def end(self, status: str) -> None:
        self.writer.close()


_TRACKERS = {"mlflow": _MLflow, "tensorboard": _TensorBoard}


# ---------------------------------------------------------------- values


def _numbers(row: dict[str, Any], prefix: str = "", skip: Iterable[str] = ()) -> dict[str, float]:
    """The finite numbers of a row, nested dicts flattened with `/` (val_recall/circle)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


def _final(split: str, scores: Any) -> dict[str, float]:
    """The saved model's numbers on a split, as `graft evaluate` gives them (final_val_accuracy,
    ...: apart from the epochs' val_acc, which scores each epoch's head uncalibrated): accuracy,
    balanced accuracy, calibration (ECE, NLL) and each class's precision, recall and F1."""
    if not isinstance(scores, dict):
        return {}
    calibrated = (scores.get("calibration") or {}).get("calibrated") or {}
    out = _numbers(
        {
            "accuracy": scores.get("accuracy"),
            "balanced_accuracy": scores.get("balanced_accuracy"),
            "images": scores.get("n"),
            "ece": calibrated.get("ece"),
            "nll": calibrated.get("nll"),
        },
        prefix=f"final_{split}_",
    )
    for c, row in (scores.get("per_class") or {}).items():
        if isinstance(row, dict):
            values = _numbers({k: row.get(k) for k in ("precision", "recall", "f1")})
            out.update({f"final_{split}_{k}/{c}": v for k, v in values.items()})
    return out


def _key(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-./ ]", "_", name)[:250]


def _tag(name: str) -> str:
    """train_loss -> loss/train, so TensorBoard draws train and val on one card."""
    m = re.fullmatch(r"(train|val)_(loss|acc)", name)
    return f"{m.group(2)}/{m.group(1)}" if m else name


def _param(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text[:6000]  # MLflow's limit on a param's value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _env(name: str) -> str | None:
    return os.environ.get(name) or None
