"""End to end through the `graft` command: train, evaluate, predict, verify, errors."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ..conftest import make_shapes


def graft(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "graft", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_train_evaluate_predict_end_to_end(tmp_path):
    data = make_shapes(tmp_path / "data", n_train=20, n_val=10, seed=1)
    run = tmp_path / "run"
    r = graft("train", data, "--out", run, "--workers", "0", "--epochs", "30")
    assert r.returncode == 0, r.stderr
    assert f"saved {run}" in r.stdout
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 30 and set(rows[0]) == {
        "epoch",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "seconds",
        "val_recall/circle",
        "val_recall/square",
        "val_recall/triangle",
    }
    assert (run / "report.html").exists() and (run / "report.json").exists()
    best = max(float(row["val_acc"]) for row in rows)
    assert best >= 0.9

    r = graft("evaluate", run, data, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["n"] == 30 and report["accuracy"] == pytest.approx(best)
    assert sum(map(sum, report["confusion_matrix"])) == 30

    (tmp_path / "broken.jpg").write_bytes(b"")
    r = graft(
        "predict",
        run,
        data / "val" / "circle" / "000.png",
        tmp_path / "broken.jpg",
        "--json",
        "--top-k",
        "2",
    )
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out[0]["error"] is None and len(out[0]["probabilities"]) == 2
    assert out[1] == {
        "path": str(tmp_path / "broken.jpg"),
        "decision": None,
        "probabilities": None,
        "unknown_score": None,
        "error": "empty file (0 bytes)",
    }
    assert "1 file(s) could not be read" in r.stderr
    # every row decides: the top class, or "unknown" past the threshold model.json holds
    threshold = json.loads((run / "model.json").read_text())["decision"]["unknown"]["threshold"]
    top = next(iter(out[0]["probabilities"]))
    assert out[0]["decision"] == ("unknown" if out[0]["unknown_score"] > threshold else top)

    # a picture of nothing the folder holds is "unknown", in every format
    checker = (np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)
    Image.fromarray(checker).save(tmp_path / "checker.png")
    r = graft("predict", run, tmp_path / "checker.png", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{tmp_path / 'checker.png'}\tunknown (closest: ")
    r = graft("predict", run, tmp_path / "checker.png", "--csv", "--top-k", "1")
    header, row = r.stdout.splitlines()
    assert header == "path,rank,class,probability,error,decision,unknown_score"
    assert row.split(",")[5] == "unknown" and float(row.split(",")[6]) > threshold

    # an operating point on the saved run, chosen on its out-of-fold scores, no training
    r = graft("thresholds", run, "--target", "triangle:recall=0.9")
    assert r.returncode == 0, r.stderr
    assert "thresholds chosen on 5-fold out-of-fold scores of the 60 training images" in r.stdout
    assert re.search(r"^triangle +recall 0\.9 +[01]\.\d{4} ", r.stdout, re.M), r.stdout
    meta = json.loads((run / "model.json").read_text())
    assert meta["decision"]["thresholds"]["triangle"]["kind"] == "recall"
    assert meta["config"]["target"] == ["triangle:recall=0.9"]
    assert "| triangle | recall 0.9 |" in (run / "README.md").read_text()
    r = graft("thresholds", run, "--target", "triangel:recall=0.9")
    assert r.returncode == 2 and r.stderr == (
        "error: --target 'triangel:recall=0.9': there is no class 'triangel' (did you mean: "
        "triangle?); the classes are circle, square, triangle\n"
    )
    r = graft("thresholds", run, "--target", "circle:recall=0.99")
    assert r.returncode == 2 and r.stderr == (
        "error: --target circle:recall=0.99: 20 held-out image(s) of 'circle' can promise a "
        "recall of 0.952 at most (0.99 needs 99 or more); lower the target or add images of "
        "the class\n"
    )


def test_bad_files_stop_training_before_the_first_epoch(tmp_path):
    data = make_shapes(tmp_path / "data", n_train=4, n_val=2)
    (data / "train" / "circle" / "trunc.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    r = graft("train", data, "--out", tmp_path / "run", "--workers", "0", "--epochs", "2")
    assert r.returncode == 2
    assert "error: 1 file(s) cannot be used:" in r.stderr
    assert f"{data / 'train' / 'circle' / 'trunc.png'}: not a recognised image format" in r.stderr
    assert "--skip-bad" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()
    r = graft(
        "train", data, "--out", tmp_path / "run", "--workers", "0", "--epochs", "2", "--skip-bad"
    )
    assert r.returncode == 0, r.stderr
    assert "skipped 1 unreadable file(s)" in r.stdout
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["skipped_files"] == [str(data / "train" / "circle" / "trunc.png")]


def test_verify_and_backbones(tmp_path):
    data = make_shapes(tmp_path / "data", n_train=3, n_val=1)
    r = graft("verify", data)
    assert r.returncode == 0 and "all images decode" in r.stdout
    (data / "val" / "square" / "x.png").write_text("not an image")
    r = graft("verify", data)
    assert r.returncode == 1
    assert f"bad: {data / 'val' / 'square' / 'x.png'}: a text file, not an image" in r.stdout
    r = graft("backbones", "resnet18", "--blocks")
    assert r.returncode == 0 and "layer4" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "/no/such/folder"], "error: data folder /no/such/folder does not exist"),
        (["train", "{data}", "--backbone", "resnet81"], "did you mean: resnet18"),
        (["train", "{data}", "--strategy", "partial"], "strategy 'partial' needs the blocks"),
        (["train", "{data}", "--optimizer", "sgdd"], "unknown optimizer 'sgdd' (did you mean"),
        (["predict", "/no/run", "x.png"], "is not a graft run folder"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, args, message):
    data = make_shapes(tmp_path, n_train=2, n_val=1)
    r = graft(*[a.replace("{data}", str(data)) for a in args])
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "{data}", "--bogus"], "Error: No such option: --bogus"),
        (
            ["train", "{data}", "--epoch", "3"],
            "Error: No such option: --epoch (Possible options: --epochs)",
        ),
        (["train", "{data}", "--epochs", "abc"], "Error: Invalid value for '--epochs'"),
        (["predict"], "Error: Missing argument 'run_dir'."),
        (["nosuch"], "Error: No such command 'nosuch'."),
    ],
)
def test_usage_errors_are_usage_and_one_line(tmp_path, args, message):
    data = make_shapes(tmp_path, n_train=2, n_val=1)
    r = graft(*[a.replace("{data}", str(data)) for a in args])
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "╭" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("Usage: graft") and lines[-1].startswith(message)
    if args[-1] == "--bogus":  # no far-fetched suggestion (click offered --out)
        assert lines[-1] == message


def test_bare_graft_prints_help_not_a_traceback():
    r = graft()
    assert r.returncode in (0, 2)
    assert "Traceback" not in r.stderr and "Usage: graft" in r.stdout + r.stderr
    assert "train" in r.stdout + r.stderr


def test_json_and_csv_keep_non_ascii_names_readable(trained_run, tmp_path):
    from PIL import Image

    names = ["пчела.png", "🐝 bee.png"]
    for name in names:
        Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / name)
    r = graft("predict", trained_run.run_dir, tmp_path, "--json", "--top-k", "1")
    assert r.returncode == 0, r.stderr
    assert "\\u" not in r.stdout and all(n in r.stdout for n in names)
    assert sorted(os.path.basename(x["path"]) for x in json.loads(r.stdout)) == sorted(names)
    r = graft("predict", trained_run.run_dir, tmp_path, "--csv", "--top-k", "1")
    rows = list(csv.DictReader(r.stdout.splitlines()))
    assert sorted(os.path.basename(x["path"]) for x in rows) == sorted(names)


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "{run}", "x.png", "--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["predict", "{run}", "x.png", "--top-k", "0"], "Invalid value for '--top-k'"),
        (["serve", "{run}", "--port", "99999"], "Invalid value for '--port'"),
    ],
)
def test_out_of_range_flags_are_usage_errors(trained_run, args, message):
    r = graft(*[a.replace("{run}", str(trained_run.run_dir)) for a in args])
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_hostile_values_end_in_one_line(trained_run, shapes_dir, tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "circle").mkdir()
    (tmp_path / "bad" / "circle" / "a.png").write_text("not an image")
    (tmp_path / "latin1.yaml").write_bytes(b"data_dir: d\nepochs: \xe9\n")
    cases = [
        (["train", shapes_dir, "--lr", "inf"], "lr must be a finite number"),
        (["train", shapes_dir, "--label-smoothing", "5"], "label_smoothing must be"),
        (["train", shapes_dir, "--seed", "100000000000000000000"], "seed must be between"),
        (["train", shapes_dir, "--image-size", "100000"], "image_size 100000 is over"),
        (["train", shapes_dir, "--target", "dog:recall=0.9"], "there is no class 'dog'"),
        (["train", shapes_dir, "--target", "circle:recall=2"], "must be a number in (0, 1]"),
        (["train", shapes_dir, "--out", tmp_path / "file"], "is a file, not a folder"),
        (["train", "--config", tmp_path / "latin1.yaml"], "is not UTF-8 text"),
        (["evaluate", trained_run.run_dir, tmp_path / "bad"], "none of the 1 image(s) could be"),
    ]
    for args, message in cases:
        r = graft(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_a_bad_value_is_refused_before_pytorch_loads(shapes_dir):
    code = (
        "import sys\n"
        "from graft.cli import main\n"
        f"sys.argv = ['graft', 'train', {str(shapes_dir)!r}, '--lr', 'inf']\n"
        "code = main._run(False)\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False"], r.stderr
    assert "lr must be a finite number above 0, got inf" in r.stderr


def test_train_and_compare_options_are_the_config_schema():
    """Every TrainConfig field is an option of `graft train`, with the field's own help text;
    compare has all but those it chooses per candidate (and its own --out)."""
    from dataclasses import fields

    from typer.main import get_command

    from graft.cli.main import app
    from graft.core.config import CHOSEN_PER_CANDIDATE, TrainConfig

    cli = get_command(app)
    names = {f.name for f in fields(TrainConfig)} - {"data_dir"}
    train = {p.name: p for p in cli.commands["train"].params}
    assert names <= set(train)
    assert train["memory_gb"].help == TrainConfig.__dataclass_fields__["memory_gb"].metadata["help"]
    assert train["memory_gb"].opts == ["--memory-gb"] and train["skip_bad"].secondary_opts
    compare = {p.name for p in cli.commands["compare"].params}
    # its own --out; no report, operating point or tracker: it trains nothing to keep
    kept = {"report", "target", "log", "tracking_uri"}
    assert compare & names == names - set(CHOSEN_PER_CANDIDATE) - kept


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--optimizer", "adam", "--momentum", "0.5"],
            "--momentum is ignored with --optimizer adam",
        ),
        (
            ["--strategy", "finetune", "--schedule", "cosine", "--step-size", "3"],
            "--step-size is ignored with --schedule cosine",
        ),
        (
            ["--engine", "onnxruntime", "--strategy", "finetune"],
            "--engine onnxruntime is ignored with --strategy finetune",
        ),
        (
            [
                "--auto",
                "--epochs",
                "3",
                "--warmup-epochs",
                "1",
                "--backbones",
                "efficientnet_lite0",
            ],
            "the candidate efficientnet_lite0 extract cannot honour the settings given: "
            "--warmup-epochs is ignored with --strategy extract",
        ),
    ],
)
def test_ignored_settings_stop_with_one_line(tmp_path, args, message):
    data = make_shapes(tmp_path / "data", n_train=3, n_val=1)
    r = graft("train", data, "--out", tmp_path / "run", *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
