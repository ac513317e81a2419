"""--log mlflow and --log tensorboard against the real things: a local MLflow store (SQLite, made
by the test) read back with MLflow's client, TensorBoard's event files read back with its reader;
a tracker that is down costs a warning, never the run."""

from __future__ import annotations

import csv
import json
import logging
import re

import pytest

import graft
from graft.core.config import make_config
from graft.core.errors import ConfigError
from graft.outputs.tracking import TRACKING_JSON, Tracking

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store; MLflow's artifacts land in the test's folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def logged(shapes_dir, tmp_path_factory):
    """One epoch-head run logged to both trackers (three epochs: a history to read back)."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("tracked")
    mp.chdir(home)
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    try:
        run = graft.train(
            shapes_dir,
            out=str(home / "run"),
            head="epochs",
            epochs=3,
            workers=0,
            log=("mlflow", "tensorboard"),
            tracking_uri=uri,
        )
    finally:
        mp.undo()
    return run, uri


def _metrics_csv(run_dir):
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_mlflow_holds_the_run_its_config_its_epochs_its_numbers_and_its_model(logged):
    run, uri = logged
    client = mlflow.tracking.MlflowClient(uri)
    run_id = json.loads((run.run_dir / TRACKING_JSON).read_text())["mlflow"]["run_id"]
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    params = got.data.params
    assert params["backbone"] == "efficientnet_lite0" and params["strategy"] == "extract"
    assert (
        params["epochs"] == "3"
        and params["head"] == "epochs"
        and params["log"] == "mlflow,tensorboard"
    )
    rows = _metrics_csv(run.run_dir)
    for key in ("train_loss", "val_acc", "lr"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [1, 2, 3]
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in rows], rel=1e-5)
    meta = json.loads((run.run_dir / "model.json").read_text())
    assert got.data.metrics["final_val_accuracy"] == pytest.approx(meta["val"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {
        "report.html",
        "README.md",
        "config.yaml",
        "metrics.csv",
        "figures",
        "graft_model",
    } <= artifacts
    assert "graft_model/model.safetensors" in {
        a.path for a in client.list_artifacts(run_id, "graft_model")
    }
    mlflow.set_tracking_uri(uri)
    models = mlflow.search_logged_models(
        experiment_ids=[got.info.experiment_id], output_format="list"
    )
    assert [(m.name, m.source_run_id) for m in models] == [("model", run_id)]
    onnx_model = mlflow.onnx.load_model(models[0].model_uri)
    assert [o.name for o in onnx_model.graph.output][0] == "probabilities"


def test_tensorboard_holds_the_curves_and_the_report_figures(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = logged
    events = EventAccumulator(str(run.run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    rows = _metrics_csv(run.run_dir)
    for tag, key in (("loss/train", "train_loss"), ("acc/val", "val_acc"), ("lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([float(r[key]) for r in rows], rel=1e-5)
    assert {"report/curves", "report/confusion_matrix"} <= set(events.Tags()["images"])


def test_a_tracker_that_is_down_costs_one_warning_not_the_run(shapes_dir, tmp_path, caplog, store):
    with caplog.at_level(logging.WARNING):
        run = graft.train(
            shapes_dir,
            out=str(tmp_path / "run"),
            workers=0,
            report=False,
            log=("mlflow",),
            tracking_uri="http://127.0.0.1:9",  # nothing listens on the discard port
        )
    warnings = [r.getMessage() for r in caplog.records if "--log mlflow" in r.getMessage()]
    assert len(warnings) == 1
    assert "the tracking server http://127.0.0.1:9 does not answer" in warnings[0]
    assert "training goes on without mlflow, the run folder is complete" in warnings[0]
    assert (run.run_dir / "model.json").is_file() and run.val["accuracy"] > 0.5
    assert not (run.run_dir / TRACKING_JSON).exists()


def test_auto_candidates_are_child_runs_and_resume_logs_into_the_same_run(tmp_path, store):
    config = {"backbone": "efficientnet_lite0", "log": ["mlflow"]}
    rows = [
        {
            "candidate": "efficientnet_lite0/extract",
            "backbone": "efficientnet_lite0",
            "strategy": "extract",
            "settings": {"head": "fit"},
            "accuracy": 0.9,
            "status": "scored",
        },
        {
            "candidate": "efficientnet_lite2/extract",
            "backbone": "efficientnet_lite2",
            "strategy": "extract",
            "settings": {"head": "fit"},
            "accuracy": None,
            "status": "skipped",
        },
    ]
    with Tracking(["mlflow"], tmp_path, config, store) as t:
        t.epoch({"epoch": 1, "val_acc": 0.5})
    first = json.loads((tmp_path / TRACKING_JSON).read_text())["mlflow"]["run_id"]
    client = mlflow.tracking.MlflowClient(store)
    assert client.get_run(first).info.status == "FAILED"  # ended without finish(): say so
    with Tracking(["mlflow"], tmp_path, config, store) as t:  # as --resume does
        t.epoch({"epoch": 2, "val_acc": 0.75})
        t.finish({"val": {"accuracy": 0.8, "n": 10}}, None, {"rows": rows})
    assert json.loads((tmp_path / TRACKING_JSON).read_text())["mlflow"]["run_id"] == first
    assert [m.value for m in client.get_metric_history(first, "val_acc")] == [0.5, 0.75]
    assert client.get_run(first).info.status == "FINISHED"
    experiment = client.get_run(first).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{first}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"efficientnet_lite0/extract", "efficientnet_lite2/extract"}
    assert by_name["efficientnet_lite0/extract"].data.metrics["accuracy"] == 0.9
    assert by_name["efficientnet_lite2/extract"].data.params["strategy"] == "extract"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"log": ("wandb",)}, "unknown tracker 'wandb'; choose one of mlflow, tensorboard"),
        ({"log": ("mlflw",)}, "unknown tracker 'mlflw' (did you mean: mlflow?)"),
        ({"tracking_uri": "sqlite:///x.db"}, "--tracking-uri is MLflow's: add --log mlflow"),
        ({"log": ("mlflow", "mlflow")}, "--log names a tracker twice: mlflow, mlflow"),
    ],
)
def test_tracker_settings_are_checked(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config("data", **options)
