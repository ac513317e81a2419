"""`graft.train`: a TrainConfig in, a run folder out whose config.yaml reproduces the run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

import graft
from graft.core.config import make_config
from graft.core.runfolder import CONFIG


def test_saved_config_holds_every_value_that_ran(trained_run):
    saved = yaml.safe_load((trained_run.run_dir / CONFIG).read_text())
    for key in ("workers", "image_size", "out", "cache_dir", "head"):
        assert saved[key] is not None, key
    for key in ("epochs", "lr", "optimizer", "batch_size"):  # a fitted head runs no loop
        assert saved[key] is None, key
    assert saved["image_size"] == 224 and saved["out"] == str(trained_run.run_dir)
    assert make_config(None, trained_run.run_dir / CONFIG) == trained_run.config


def test_train_takes_a_train_config(shapes_dir, tmp_path):
    cfg = make_config(shapes_dir, epochs=3, workers=0, report=False, out=str(tmp_path / "r"))
    run = graft.train(cfg)
    assert len(run.history) == 3 and run.config.epochs == 3 and run.config.optimizer == "adamw"
    again = graft.train(cfg, epochs=2, overwrite=True)  # keyword options override it
    assert again.config.epochs == 2


def test_explain_runs_on_the_device_asked_for(trained_run, shapes_dir, tmp_path):
    image = shapes_dir / "val" / "circle" / "000.png"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "graft",
            "explain",
            str(trained_run.run_dir),
            str(image),
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["000-000-gradcam.png"]


def test_explain_gives_the_probabilities_predict_gives(trained_run, shapes_dir):
    """With flip TTA (the default) the explained classes are predict's, mirror averaged in."""
    from graft.inference.explain import explain

    clf = trained_run.load(device="cpu")
    image = shapes_dir / "val" / "triangle" / "003.png"
    _, maps = explain(clf, image, classes=3)
    want = clf.predict([image])[0]
    assert [m.class_name for m in maps] == list(want)
    assert [m.probability for m in maps] == pytest.approx(list(want.values()), rel=1e-4, abs=1e-6)
    assert all(m.heatmap.shape == (224, 224) for m in maps)


@pytest.mark.parametrize("strategy", ["extract", "finetune"])
def test_one_model_one_accuracy(shapes_dir, tmp_path, strategy):
    """model.json, the run summary, the report and `graft evaluate` give the same number."""
    out = tmp_path / strategy
    extra = {"image_size": 64, "batch_size": 8} if strategy == "finetune" else {}
    run = graft.train(shapes_dir, strategy=strategy, epochs=2, workers=0, out=str(out), **extra)
    meta = json.loads((out / "model.json").read_text())
    r = subprocess.run(
        [sys.executable, "-m", "graft", "evaluate", str(out), str(shapes_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    evaluated = json.loads(r.stdout)
    assert evaluated["n"] == meta["val"]["n"] == 24
    assert evaluated["accuracy"] == meta["val"]["accuracy"] == run.val_accuracy
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["accuracy"] == meta["val"]["accuracy"]
    rebuilt = graft.report(out, explain_images=0)  # predicts the val images afresh
    assert rebuilt["evaluation"]["accuracy"] == meta["val"]["accuracy"]
    # the calibration numbers too: the same model, calibrated the same way, everywhere
    assert evaluated["calibration"] == meta["val"]["calibration"]
    assert meta["calibration"]["method"] == "temperature"
    if strategy == "finetune":  # no out-of-fold scores: fitted on val, and it says so
        assert meta["calibration"]["fitted_on"] == (
            "the val split's 24 images (strategy finetune has no out-of-fold scores): the val "
            "split's calibration numbers are optimistic"
        )
        held = meta["calibration"]["held_out"]  # the fit minimises this NLL, from T = 1
        assert held["calibrated"]["nll"] <= held["raw"]["nll"] + 1e-6
        assert meta["calibration"]["temperature"] == evaluated["calibration"]["temperature"]


def test_refit_saves_the_head_fitted_again_with_val(shapes_dir, tmp_path):
    """--refit: val scores the head fitted on train alone, exactly as a run without it scores
    it, then the head saved is fitted again with the val images; the summary, model.json, the
    card and a rebuilt report say which is which."""
    kw = dict(workers=0, report=False)
    plain = graft.train(shapes_dir, out=str(tmp_path / "plain"), **kw)
    refit = graft.train(shapes_dir, out=str(tmp_path / "refit"), refit=True, **kw)
    assert refit.config.refit is True and "refit" not in plain.best
    assert refit.val == {**plain.val, "protocol": refit.val["protocol"]}
    assert refit.val["protocol"] == (
        plain.val["protocol"] + "; the saved head was then fitted again on 72 images (training "
        "and val): this scores the head fitted without val"
    )
    assert refit.best["refit"] == {
        "images": 72,  # 48 training images and 24 val
        "chosen_on": 48,
        "l2_chosen": plain.best["l2"],
        "l2": pytest.approx(plain.best["l2"] * 48 / 72),
    }
    weights = [
        graft.load(tmp_path / name).backbone.model.head.weight for name in ("plain", "refit")
    ]
    assert not torch.equal(*weights)
    card = (tmp_path / "refit" / "README.md").read_text()
    assert "then fitted again on 72 images (training and validation)" in card
    assert "`graft evaluate` on them now reads images it trained on" in card
    # a rebuilt report gives model.json's val numbers: the predictions kept from before the refit
    rebuilt = graft.report(tmp_path / "refit", explain_images=0)
    assert rebuilt["evaluation"]["accuracy"] == refit.val["accuracy"]
    for key in ("per_class", "calibration", "decisions"):
        assert rebuilt["evaluation"][key] == refit.val[key], key
    assert rebuilt["how_good"]["how"].endswith(
        "these are that head's predictions, kept from before the saved head was fitted again "
        "with the val images (--refit)"
    )
    (tmp_path / "refit" / "scores.safetensors").unlink()  # without them: predicted, and said so
    afresh = graft.report(tmp_path / "refit", explain_images=0)
    assert afresh["how_good"]["how"].startswith("in-sample: the saved head was fitted again")


def test_partial_starts_from_the_fitted_head(shapes_dir, tmp_path):
    """LP-FT, partial's default: at a learning rate too small to move anything, what the model
    knows is the head fitted on the frozen features; a random head (--head epochs) at the same
    rate knows nothing."""
    kw = dict(
        strategy="partial",
        unfreeze_last=1,
        epochs=1,
        lr=1e-9,
        workers=0,
        report=False,
        image_size=96,
        batch_size=8,
    )
    fitted = graft.train(shapes_dir, out=str(tmp_path / "lpft"), **kw)
    random_head = graft.train(shapes_dir, head="epochs", out=str(tmp_path / "random"), **kw)
    assert fitted.val_accuracy >= 0.8 > random_head.val_accuracy + 0.2
    assert yaml.safe_load((tmp_path / "lpft" / CONFIG).read_text())["head"] == "fit"
    assert yaml.safe_load((tmp_path / "random" / CONFIG).read_text())["head"] == "epochs"


def test_a_folder_labelled_by_a_table_trains_as_its_class_folders(tmp_path):
    """Kaggle's layout (one flat folder, train.csv with ids without extension) gives the split,
    the model and the accuracy that the same images in class folders give."""
    import shutil

    from tests.conftest import SHAPES, make_shapes

    folders = make_shapes(tmp_path / "folders", n_train=8, n_val=4, flat=True)
    flat = tmp_path / "kaggle" / "train"
    flat.mkdir(parents=True)
    lines = ["id,label"]
    for c in SHAPES:
        for f in sorted((folders / c).iterdir()):
            shutil.copy(f, flat / f"{c}_{f.name}")
            lines.append(f"{c}_{f.stem},{c}")
    table = tmp_path / "kaggle" / "train.csv"
    table.write_text("\n".join(lines) + "\n")
    common = dict(workers=0, seed=0, report=False)
    a = graft.train(folders, out=str(tmp_path / "a"), **common)
    b = graft.train(flat, out=str(tmp_path / "b"), labels=str(table), **common)
    for name in ("train", "val"):  # the same images, by class and file name
        rows_a = (tmp_path / "a" / "split" / f"{name}.txt").read_text().splitlines()
        rows_b = (tmp_path / "b" / "split" / f"{name}.txt").read_text().splitlines()
        assert sorted(r.replace("/", "_") for r in rows_a) == sorted(rows_b)
    assert a.best["val_acc"] == b.best["val_acc"] and a.best["l2"] == b.best["l2"]
    meta = json.loads((tmp_path / "b" / "model.json").read_text())
    assert meta["labels"]["path_column"] == "id" and len(meta["labels"]["sha256"]) == 64
    report = graft.load(tmp_path / "b").evaluate(flat, labels=table)
    assert report["n"] == 36 and report["accuracy"] >= 0.9
