"""The run folder: one live writer, a finished run never replaced by accident, a failed retrain
leaves the old run whole, and a resume accepts the advice it gives (--skip-bad, new folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import graft
from graft.core.errors import ConfigError, DatasetError
from graft.core.runfolder import claim

from ..conftest import make_shapes


def _graft(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "graft", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


class _Killed(BaseException):
    """The process dying (a Ctrl-C is a clean stop now, even between epochs: not this)."""


def _stop_after(n: int):
    def on_epoch(row):
        if row["epoch"] == n:
            raise _Killed  # as if killed right after epoch n was saved

    return on_epoch


def test_a_second_writer_is_refused_with_the_holders_pid(shapes_dir, tmp_path):
    run = tmp_path / "run"
    with claim(run):
        r = _graft("train", shapes_dir, "--out", run, "--epochs", "1", "--workers", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{run} is in use by another graft process (PID {os.getpid()})" in r.stderr
    assert not (run / ".graft-lock").exists()  # released with the holder


def test_a_finished_run_is_replaced_only_with_overwrite(trained_run, shapes_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="holds a finished run .* pass --overwrite"):
        graft.train(shapes_dir, out=str(run), epochs=1, workers=0, report=False)
    assert (run / "model.safetensors").read_bytes() == before
    done = graft.train(shapes_dir, out=str(run), epochs=2, workers=0, report=False, overwrite=True)
    assert len(done.history) == 2 and not (run / "report.html").exists()


def test_a_failed_retrain_leaves_the_old_run_whole(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = make_shapes(tmp_path / "other", n_train=3, n_val=1, classes=("a", "b"))
    (other / "train" / "a" / "broken.png").write_text("not an image")
    with pytest.raises(DatasetError, match="1 file\\(s\\) cannot be used"):
        graft.train(other, out=str(run), epochs=1, workers=0, overwrite=True)
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    graft.report(run, explain_images=0)  # still a consistent run


def test_a_new_folder_is_not_left_behind_by_a_failed_run(tmp_path):
    data = make_shapes(tmp_path / "data", n_train=2, n_val=1)
    (data / "val" / "circle" / "broken.png").write_text("")
    with pytest.raises(DatasetError):
        graft.train(data, out=str(tmp_path / "new"), epochs=1, workers=0)
    assert not (tmp_path / "new").exists()


def test_resume_accepts_skip_bad_and_a_moved_folder(tmp_path):
    data = make_shapes(tmp_path / "data", n_train=6, n_val=2, seed=4)
    run = tmp_path / "run"
    with pytest.raises(_Killed):
        graft.train(data, out=str(run), epochs=4, workers=0, report=False, on_epoch=_stop_after(2))
    assert (run / "last.json").exists()
    with pytest.raises(ConfigError, match="holds an interrupted run: continue it with graft"):
        graft.train(data, out=str(run), epochs=4, workers=0)
    (data / "train" / "square" / "001.png").unlink()
    with pytest.raises(DatasetError, match="pass --skip-bad"):
        graft.train(resume=run)
    moved = tmp_path / "moved"
    data.rename(moved)
    r = _graft("train", "--resume", run, moved, "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert "skipped 1 unreadable file(s)" in r.stdout
    assert graft.load(run).meta.best["epoch"] >= 1 and not (run / "last.json").exists()
    r = _graft("train", "--resume", run, "--epochs", "5")
    assert r.returncode == 2 and "it takes only DATA_DIR" in r.stderr
