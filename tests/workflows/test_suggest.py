"""`graft suggest`: the images to label next, with the model's guess; the files it writes."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import pytest

import graft
from graft.core.errors import ConfigError


def test_suggest_ranks_unlabelled_images(trained_run, shapes_dir, tmp_path):
    pool = tmp_path / "inbox"
    pool.mkdir()
    for f in sorted((shapes_dir / "val").rglob("*.png")):
        shutil.copy(f, pool / f"{f.parent.name}-{f.name}")
    (pool / "broken.png").write_bytes(b"no image here")
    rows = graft.suggest(trained_run.run_dir, pool, n=5, out=tmp_path / "s")
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert len({r["path"] for r in rows}) == 5 and all("broken" not in r["path"] for r in rows)
    assert all(r["model_guess"] in ("circle", "square", "triangle") for r in rows)
    written = list(csv.DictReader(open(tmp_path / "s" / "suggest.csv", encoding="utf-8")))
    assert [w["path"] for w in written] == [r["path"] for r in rows]
    assert (tmp_path / "s" / "suggest.html").read_text().count("data:image/jpeg;base64,") == 5
    every = graft.suggest(trained_run.run_dir, pool, n=100, out=tmp_path / "all")
    assert len(every) == 24  # the whole pool, each once
    with pytest.raises(ConfigError, match="-n must be at least 1, got 0"):
        graft.suggest(trained_run.run_dir, pool, n=0)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "graft",
            "suggest",
            str(trained_run.run_dir),
            str(pool),
            "-n",
            "2",
            "--out",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("1\t") and r.stdout.splitlines()[-1].endswith(
        "suggest.html"
    )


def test_suggest_after_a_first_model_on_a_few_images(shapes_dir, tmp_path):
    """Fewer than 10 training images keep no reference features (no unknown score): suggest
    reads the run's own training images instead, and says so plainly when they are gone."""
    from graft.core.errors import DatasetError

    few = tmp_path / "few"
    for cls in ("circle", "square", "triangle"):
        (few / cls).mkdir(parents=True)
        for f in sorted((shapes_dir / "train" / cls).glob("*.png"))[:3]:
            shutil.copy(f, few / cls / f.name)
    run = graft.train(
        few, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"), workers=0, report=False
    )
    assert graft.load(run.run_dir).references is None  # 9 images: no unknown score
    pool = shapes_dir / "val"
    rows = graft.suggest(run.run_dir, pool, n=4, out=tmp_path / "s")
    assert len({r["path"] for r in rows}) == 4
    assert all(r["path"].startswith(str(pool)) for r in rows)
    first = (run.run_dir / "split" / "train.txt").read_text().splitlines()[0]
    damaged = few / first.split("\t")[1]  # a training image the run lists
    damaged.write_bytes(b"not an image any more")  # counted as not labelled, with a warning
    assert len(graft.suggest(run.run_dir, pool, n=4, out=tmp_path / "s1")) == 4
    shutil.rmtree(few)
    with pytest.raises(DatasetError, match="keeps no features of its training images and they "):
        graft.suggest(run.run_dir, pool, n=4, out=tmp_path / "s2")
