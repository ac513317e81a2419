"""graft predict --out: rows written batch by batch, a crashed job resumed to the same file, a
full disk stopping with the rows before intact; iter_predictions as predict_files in pieces."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

import graft
from graft.core.errors import ConfigError, GraftError
from graft.workflows.predict import CSV_HEADER, Written, _append, predict_to_file


@pytest.fixture(scope="module")
def images(shapes_dir, tmp_path_factory):
    """The shapes' val images (24) and one broken file in the middle."""
    folder = tmp_path_factory.mktemp("queue")
    paths = sorted(str(p) for p in (shapes_dir / "val").rglob("*.png"))
    bad = folder / "broken.png"
    bad.write_bytes(b"not a png")
    return paths[:10] + [str(bad)] + paths[10:]


def test_the_stream_is_predict_files_in_batches(trained_run, images):
    clf = graft.load(trained_run.run_dir)
    whole = clf.predict_files(images, top_k=2, batch_size=4)
    batches = list(clf.iter_predictions(images, top_k=2, batch_size=4, workers=1))
    assert [len(b) for b in batches] == [4] * 6 + [1]
    assert [p for b in batches for p in b] == whole
    assert whole[10].error and whole[10].probs is None


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_crashed_job_resumes_to_the_file_an_uncut_job_writes(
    trained_run, images, tmp_path, suffix
):
    clf = graft.load(trained_run.run_dir)
    full = tmp_path / f"full{suffix}"
    done = predict_to_file(clf, images, full, top_k=3, batch_size=5)
    assert (done.predicted, done.skipped, done.errors) == (25, 0, 1)
    text = full.read_text()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: len(text.encode()) * 2 // 3 - 7])  # mid-line, mid-batch
    again = predict_to_file(clf, images, cut, resume=True, top_k=3, batch_size=5)
    assert cut.read_text() == text
    assert again.skipped + again.predicted == 25 and again.skipped >= 10


def test_the_formats_are_the_stdout_ones(trained_run, images, tmp_path):
    clf = graft.load(trained_run.run_dir)
    predict_to_file(clf, images, tmp_path / "p.csv", top_k=2, batch_size=8)
    predict_to_file(clf, images, tmp_path / "p.jsonl", top_k=2, batch_size=8)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == CSV_HEADER and len(lines) == 1 + 24 * 2 + 1
    assert lines[1 + 20].endswith('broken.png,,,,"a text file, not an image",,')
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == images
    assert records[10]["error"] and records[0]["decision"] in ("circle", "square", "triangle")


def test_an_existing_file_needs_resume_and_the_suffix_is_the_format(trained_run, images, tmp_path):
    clf = graft.load(trained_run.run_dir)
    (tmp_path / "mine.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"mine.csv exists: add --resume to go on with it"):
        predict_to_file(clf, images, tmp_path / "mine.csv")
    with pytest.raises(ConfigError, match=r"mine.csv is not graft predict's CSV"):
        predict_to_file(clf, images, tmp_path / "mine.csv", resume=True)
    assert (tmp_path / "mine.csv").read_text() == "a,b\n"  # a file graft did not write: untouched
    with pytest.raises(ConfigError, match=r"name a .csv or a .jsonl file"):
        predict_to_file(clf, images, tmp_path / "out.txt")


class _FullDisk:
    """A file whose disk fills up halfway through a write (as a real one does: part written)."""

    def __init__(self, before: str):
        self.data = before

    def tell(self) -> int:
        return len(self.data)

    def write(self, text: str) -> None:
        self.data += text[: len(text) // 2]
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass

    def truncate(self, size: int) -> None:
        self.data = self.data[:size]


def test_a_full_disk_stops_with_one_line_and_the_rows_before_intact(tmp_path):
    fh = _FullDisk(CSV_HEADER + "\na.png,1,circle,0.9,,circle,\n")
    with pytest.raises(GraftError) as err:
        _append(fh, tmp_path / "p.csv", "b.png,1,square,0.8,,square,\n", Written(tmp_path, 1))
    assert str(err.value) == (
        f"disk full while writing {tmp_path / 'p.csv'}: the 1 file(s) before are in it; free "
        "some space and run the same command with --resume"
    )
    assert fh.data == CSV_HEADER + "\na.png,1,circle,0.9,,circle,\n"


def test_the_command_writes_out_and_refuses_to_overwrite(trained_run, images, tmp_path):
    out = tmp_path / "queue.jsonl"
    cmd = [sys.executable, "-m", "graft", "predict", str(trained_run.run_dir), *images[:6]]
    r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and f"{out}: 6 file(s) predicted" in r.stderr
    r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "exists: add --resume" in r.stderr
    r = subprocess.run([*cmd, "--out", str(out), "--resume"], capture_output=True, text=True)
    assert r.returncode == 0 and "1 file(s) predicted, 5 already in it" in r.stderr
    assert len(out.read_text().splitlines()) == 6


def _torchrun_predict(run_dir, images, *args) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "graft", "predict", str(run_dir), *images, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_under_torchrun_each_process_predicts_a_share_and_rank_0_merges(
    trained_run, images, tmp_path
):
    clf = graft.load(trained_run.run_dir)
    reference = tmp_path / "one.csv"
    predict_to_file(clf, images, reference)  # the command's defaults: top 5, batches of 32
    text = reference.read_text()
    out = tmp_path / "two.csv"
    r = _torchrun_predict(trained_run.run_dir, images, "--out", str(out))
    assert r.returncode != 0  # the broken file: exit 1, as in one process
    assert r.stderr.count(f"{out}: 25 file(s) predicted") == 1, r.stderr
    assert r.stderr.count("1 file(s) could not be read") == 1
    _same_rows(out.read_text(), text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "two.csv"]  # parts gone

    # a job that died: FILE cut mid-line, rank 1's part begun (its first files, which the cut
    # FILE holds too); the same command with --resume finishes FILE as an uncut job writes it
    cut = tmp_path / "cut.csv"
    cut.write_bytes(reference.read_bytes()[: len(text.encode()) * 2 // 3 - 7])
    predict_to_file(clf, images[13:16], tmp_path / "cut.part1of2.csv")
    r = _torchrun_predict(trained_run.run_dir, images, "--out", str(cut), "--resume")
    assert "already in it" in r.stderr, r.stderr
    _same_rows(cut.read_text(), text)
    assert not list(tmp_path.glob("cut.part*"))


def _same_rows(got: str, want: str) -> None:
    """The same rows in the same order; numbers equal to the float noise of other batch sizes
    and thread counts (one process with two threads, two with one each)."""
    import csv
    import io

    a, b = (list(csv.reader(io.StringIO(t))) for t in (got, want))
    assert [r[:3] + r[4:6] for r in a] == [r[:3] + r[4:6] for r in b]
    for ra, rb in zip(a[1:], b[1:]):
        for x, y in ((ra[3], rb[3]), (ra[6], rb[6])):
            assert (x == y == "") or abs(float(x) - float(y)) <= 1e-5


def test_a_share_each_in_order():
    from graft.core.dist import Dist, block

    items = list(range(11))
    shares = [block(items, Dist(rank, rank, 3)) for rank in range(3)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert block(items[:2], Dist(2, 2, 3)) == [] and block(items, Dist()) == items
