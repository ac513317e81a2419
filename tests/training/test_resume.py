"""Interruptions: a killed run resumes to the same result; SIGTERM stops cleanly; a failed write
leaves the previous files intact and says "disk full"."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ..conftest import make_shapes

ARGS = [
    "--strategy",
    "finetune",
    "--image-size",
    "64",
    "--epochs",
    "8",
    "--warmup-epochs",
    "1",
    "--workers",
    "0",
    "--seed",
    "3",
    "--batch-size",
    "8",
    "--progressive",
]
# (--warmup-epochs and --progressive: a resume must cross stage and image-size boundaries)


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "graft", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _resume(run) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "graft", "train", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr


def _metrics(run) -> list[dict]:
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _wait_for_rows(run, n: int, proc: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.time() + limit
    while time.time() < deadline:
        if (run / "metrics.csv").exists() and len(open(run / "metrics.csv").readlines()) > n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("training did not reach the epoch in time")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("resume"), n_train=8, n_val=4, seed=5)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = _start("train", data, "--out", run, *ARGS)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return run


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(data, reference, tmp_path):
    run = tmp_path / "run"
    proc = _start("train", data, "--out", run, *ARGS)
    _wait_for_rows(run, 3, proc)  # header + 2 epochs (past the warm-up stage)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "last.json").exists() and not (run / "model.json").exists()
    (run / ".graft-tmp-model.safetensors.crashed").write_bytes(b"half a file")
    done = json.loads((run / "last.json").read_text())["epoch"]
    assert 2 <= done < 8

    _resume(run)
    assert _metrics(run) == _metrics(reference)
    got, want = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (
        json.loads((run / "model.json").read_text())["best"]["epoch"]
        == json.loads((reference / "model.json").read_text())["best"]["epoch"]
    )
    assert not list(run.glob(".graft-tmp-*"))  # the crashed write's leftover is cleaned
    assert not (run / "last.json").exists()  # finished: nothing left to resume


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_resume_finishes(data, reference, tmp_path):
    run = tmp_path / "run"
    proc = _start("train", data, "--out", run, *ARGS)
    _wait_for_rows(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err  # saved, and scripts can tell it from success
    assert "stopped early: interrupted" in out and "Traceback" not in err
    assert f"interrupted; resume with: graft train --resume {run}" in err
    meta = json.loads((run / "model.json").read_text())
    assert meta["stopped"] == "interrupted" and (run / "last.json").exists()
    _resume(run)
    assert len(_metrics(run)) == 8


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "graft", "train", "--resume", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert f"error: {tmp_path} has no resumable checkpoint" in r.stderr


DISK_FULL = """
import resource, sys
import graft
from graft.models.modelfile import save_model
clf = graft.load(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # like a nearly full disk
try:
    save_model(sys.argv[1], clf.backbone, clf.meta)
except graft.GraftError as exc:
    print(exc)
"""


def test_disk_full_keeps_previous_model(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    before = (run / "model.safetensors").read_bytes()
    r = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(run)], capture_output=True, text=True, timeout=300
    )
    assert f"disk full while writing {run / 'model.safetensors'}" in r.stdout, r.stderr
    assert (run / "model.safetensors").read_bytes() == before
    assert not list(run.glob(".graft-tmp-*"))
    import graft

    assert graft.load(run).classes == ["circle", "square", "triangle"]


def test_an_interrupt_between_epochs_stops_as_one_inside_them(shapes_dir, tmp_path):
    """SIGTERM (or Ctrl-C) that lands between epochs (here: while epoch 2's row is reported)
    stops the run as one inside an epoch does: the model saved, marked interrupted, resumable.
    It used to escape the loop and lose the run."""
    import os

    import graft

    def stop(row):
        if row["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "run"
    run = graft.train(
        shapes_dir, head="epochs", epochs=6, on_epoch=stop, out=str(out), workers=0, report=False
    )
    assert run.stopped == "interrupted" and len(run.history) == 2
    meta = json.loads((out / "model.json").read_text())
    assert meta["stopped"] == "interrupted" and (out / "last.json").exists()
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # graft's handler is gone
