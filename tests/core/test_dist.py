"""`torchrun -m graft train` on the CPU with gloo: one writer, the same numbers as one process,
each image's features computed once, and a killed rank ends the job (then --resume finishes it).
Loopback only: GLOO_SOCKET_IFNAME=lo, MASTER_ADDR=127.0.0.1."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import graft

from ..conftest import make_shapes

ENV = {
    **os.environ,
    "GLOO_SOCKET_IFNAME": "lo",
    "MASTER_ADDR": "127.0.0.1",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
FINETUNE = [
    "--strategy",
    "finetune",
    "--image-size",
    "64",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--no-report",
]


def _torchrun(*args, env=None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "graft",
        "train",
        *map(str, args),
    ]


def _rows(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "metrics.csv")))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("dist"), n_train=8, n_val=5, seed=2)


@pytest.mark.slow
def test_finetune_on_two_processes(data, tmp_path):
    out = tmp_path / "runs" / "ft"
    r = subprocess.run(
        _torchrun(data, "--out", out, "--epochs", "2", *FINETUNE),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ft"]  # exactly one run folder
    assert len(_rows(out)) == 2 and r.stdout.count("saved ") == 1  # rank 0 alone prints
    meta = json.loads((out / "model.json").read_text())
    assert meta["world_size"] == 2 and not (out / "last.json").exists()
    alone = graft.load(out).evaluate(data)  # one process, the saved model, the same val images
    assert alone["accuracy"] == meta["val"]["accuracy"]
    assert "2 processes x batch 4 = global batch 8" in r.stderr


@pytest.mark.slow
def test_extract_computes_each_image_once_and_trains_the_same_head(data, tmp_path):
    env = {**ENV, "GRAFT_CACHE_DIR": str(tmp_path / "cache")}
    two, one = tmp_path / "two", tmp_path / "one"
    r = subprocess.run(
        _torchrun(data, "--out", two, "--epochs", "5", "--workers", "0", "--no-report"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads((two / "model.json").read_text())["features_computed_per_rank"]
    assert sum(counts) == 3 * (8 + 5) and all(c > 0 for c in counts)  # each image once in all
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "graft",
            "train",
            str(data),
            "--out",
            str(one),
            "--epochs",
            "5",
            "--workers",
            "0",
            "--no-report",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    assert "features: 39 from cache, 0 computed" in single.stderr  # what the two ranks cached
    a, b = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_resume_finishes_it(data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _torchrun(data, "--out", run, "--epochs", "40", *FINETUNE),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.csv").exists() and len(_rows(run)) >= 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    rank1 = [p for p in Path("/proc").glob("[0-9]*") if _is_rank(p, "1", str(run))]
    assert len(rank1) == 1
    os.kill(int(rank1[0].name), signal.SIGKILL)
    start = time.time()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - start < 60
    assert "Traceback" not in out and ("failed" in err.lower() or "interrupted" in err)
    assert (run / "last.json").exists()
    r = subprocess.run(
        _torchrun("--resume", run), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [int(row["epoch"]) for row in _rows(run)] == list(range(1, 41))
    r = subprocess.run(
        [sys.executable, "-m", "graft", "train", "--resume", str(run)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "has no resumable checkpoint" in r.stderr


def _is_rank(proc: Path, rank: str, marker: str) -> bool:
    try:
        environ = (proc / "environ").read_bytes().split(b"\0")
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return f"RANK={rank}".encode() in environ and marker.encode() in cmdline


def test_resume_with_another_process_count_is_refused(data, tmp_path):
    from graft.core.errors import ConfigError

    run = tmp_path / "run"

    class Killed(BaseException):
        pass

    def stop(row):
        if row["epoch"] == 1:
            raise Killed  # as if killed after epoch 1

    with pytest.raises(Killed):
        graft.train(data, out=str(run), epochs=3, workers=0, report=False, on_epoch=stop)
    last = json.loads((run / "last.json").read_text())
    assert last["world_size"] == 1
    (run / "last.json").write_text(json.dumps({**last, "world_size": 2}))
    with pytest.raises(ConfigError, match="trained by 2 process\\(es\\) and this is 1: resume"):
        graft.train(resume=run)


def test_a_failure_without_torchrun_is_not_blamed_on_a_peer():
    from graft.core.dist import collective_errors

    with pytest.raises(RuntimeError, match="^an ordinary failure$"):
        with collective_errors("training"):
            raise RuntimeError("an ordinary failure")


def test_a_file_gone_bad_in_a_loader_worker_is_named():
    from graft.core.errors import GraftError
    from graft.core.runtime import loader_errors

    caught = (
        "Caught ImageError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        "call last):\n  File ...\ngraft.core.errors.ImageError: /d/cat/1.png: cannot open: gone"
    )
    with pytest.raises(GraftError) as err:
        with loader_errors():
            raise RuntimeError(caught)
    assert str(err.value) == (
        "/d/cat/1.png: cannot open: gone: the file changed or went missing during training; "
        "put it back, or remove it and train again"
    )
