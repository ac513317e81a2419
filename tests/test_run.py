"""`graft.train`: a TrainConfig in, a run folder out whose config.yaml reproduces the run."""

from __future__ import annotations

import subprocess
import sys

import yaml

import graft
from graft.config import make_config
from graft.runfolder import CONFIG


def test_saved_config_holds_every_value_that_ran(trained_run):
    saved = yaml.safe_load((trained_run.run_dir / CONFIG).read_text())
    for key in ("workers", "image_size", "out", "cache_dir", "epochs", "lr", "optimizer"):
        assert saved[key] is not None, key
    assert saved["image_size"] == 224 and saved["out"] == str(trained_run.run_dir)
    assert make_config(None, trained_run.run_dir / CONFIG) == trained_run.config


def test_train_takes_a_train_config(shapes_dir, tmp_path):
    cfg = make_config(shapes_dir, epochs=3, workers=0, report=False, out=str(tmp_path / "r"))
    run = graft.train(cfg)
    assert len(run.history) == 3 and run.config.epochs == 3 and run.config.optimizer == "adamw"
    assert graft.train(cfg, epochs=2).config.epochs == 2  # keyword options override it


def test_explain_runs_on_the_device_asked_for(trained_run, shapes_dir, tmp_path):
    image = shapes_dir / "val" / "circle" / "000.png"
    r = subprocess.run(
        [sys.executable, "-m", "graft", "explain", str(trained_run.run_dir), str(image),
         "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["000-000-gradcam.png"]
