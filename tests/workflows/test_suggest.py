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
