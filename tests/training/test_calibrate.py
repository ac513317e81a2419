"""Calibration in training: out-of-fold scores of extract's training images, a temperature that
only moves the confidence, the trained head left as it was, and the probabilities everywhere
divided by it."""

from __future__ import annotations

import copy

import torch

from graft.core.config import make_config
from graft.core.runtime import resolve_runtime
from graft.data.discovery import discover
from graft.models.backbones import create_backbone
from graft.models.freezing import epoch_plan
from graft.training.calibrate import calibrate
from graft.training.jobs import prepare_job
from graft.training.loop import fit

from ..conftest import make_shapes


def _extract_job(tmp_path, n_train: int, n_val: int, epochs: int):
    """An extract job on generated shapes, its features cached: (config, backbone, job)."""
    data = make_shapes(tmp_path / "data", n_train=n_train, n_val=n_val)
    cfg = make_config(data, epochs=epochs, workers=0, cache_dir=str(tmp_path / "c")).resolve(224)
    split = discover(data)
    bb = create_backbone(cfg.backbone, len(split.classes))
    job = prepare_job(cfg, bb, split, resolve_runtime("cpu", "fp32"), lambda it, *a: it)
    return cfg, bb, job


def test_calibration_leaves_the_trained_head_as_it_was(tmp_path):
    cfg, bb, job = _extract_job(tmp_path, n_train=8, n_val=2, epochs=5)
    fit(job, epoch_plan(cfg, [], cfg.image_size), cfg)
    trained = copy.deepcopy(bb.model.head.state_dict())
    calibrated = calibrate(cfg, bb, job, kept_epoch=5)
    cal = calibrated.record
    assert all(torch.equal(v, bb.model.head.state_dict()[k]) for k, v in trained.items())
    assert cal["method"] == "temperature" and 0.05 <= cal["temperature"] <= 20
    assert cal["fitted_on"] == (
        "5-fold out-of-fold scores of the 24 training images, each fold's head trained to "
        "epoch 5 as the model was"
    )
    oof = cal["out_of_fold"]  # the fit minimises this NLL, starting from T = 1
    assert oof["calibrated"]["nll"] <= oof["raw"]["nll"] + 1e-6
    assert oof["calibrated"]["accuracy"] == oof["raw"]["accuracy"]
    # the scores it was fitted on come back, for the thresholds --target chooses
    assert (
        calibrated.logits.shape == (24, 3)
        and calibrated.labels.tolist() == job.train_features[2].tolist()
    )
    assert torch.allclose(calibrated.probabilities().sum(1), torch.ones(24))


def test_too_few_images_keep_the_raw_softmax_and_say_so(tmp_path):
    cfg, bb, job = _extract_job(tmp_path, n_train=3, n_val=1, epochs=2)
    calibrated = calibrate(cfg, bb, job, kept_epoch=2)
    cal = calibrated.record
    assert calibrated.probabilities() is None
    assert cal["method"] == "none" and cal["temperature"] == 1.0
    assert cal["reason"].startswith("too few training images to fit a calibration (9,")


def test_predictions_are_the_logits_divided_by_the_temperature(trained_run, shapes_dir):
    clf = trained_run.load()
    t = clf.meta.calibration["temperature"]
    assert clf.temperature == t and t != 1.0
    images = sorted((shapes_dir / "val").rglob("*.png"))[:6]
    x = torch.stack([clf.preprocess(i) for i in images])
    net = clf.model.float()
    with torch.inference_mode():
        single = net(x).float()
        # flip TTA, the default with the fitted head: the head reads the mirrored average
        mirrored = net.head((net.features(x) + net.features(x.flip(-1))) / 2).float()
    assert clf.tta == clf.meta.tta == "flip"

    def log_probs():  # these shapes are easy: compared as logs, where the two views differ
        return clf.probabilities(images).log()

    assert torch.allclose(log_probs(), (mirrored / t).log_softmax(1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(log_probs(), (single / t).log_softmax(1), rtol=1e-4, atol=1e-4)
    clf.tta = None  # each image once: the network's own forward
    assert torch.allclose(log_probs(), (single / t).log_softmax(1), rtol=1e-4, atol=1e-4)
    clf.tta = "flip"
    report = clf.evaluate(shapes_dir)
    c = report["calibration"]
    assert c["temperature"] == t
    assert c["raw"]["accuracy"] == c["calibrated"]["accuracy"] == report["accuracy"]


def test_a_head_fitted_on_a_subsample_says_so_and_calibrates_on_its_scores(tmp_path, monkeypatch):
    """Above CV_IMAGES (lowered here to 30 of 60 images): the row model.json keeps says how the
    strength was chosen, and the temperature is fitted on the subsample's out-of-fold scores."""
    from graft.core.linear import fit_logistic_cv
    from graft.training.calibrate import calibrate_fitted
    from graft.training.head import fit_head

    data = make_shapes(tmp_path / "data", n_train=20, n_val=2)
    cfg = make_config(data, workers=0, cache_dir=str(tmp_path / "c")).resolve(224)
    split = discover(data)
    bb = create_backbone(cfg.backbone, len(split.classes))
    job = prepare_job(cfg, bb, split, resolve_runtime("cpu", "fp32"), lambda it, *a: it)
    monkeypatch.setitem(fit_logistic_cv.__kwdefaults__, "cv_images", 30)
    state, fitted = fit_head(job, cfg)
    sub = state.best["subsample"]
    assert (sub["images"], sub["of"]) == (30, 60) and state.best["l2"] == sub["l2"] * 30 / 60
    calibrated = calibrate_fitted(fitted, job.train_features[2])
    assert calibrated.record["fitted_on"].startswith(
        "5-fold out-of-fold scores of 30 of the 60 training images (the subsample that chose it)"
    )
    assert calibrated.labels.tolist() == job.train_features[2][fitted.oof_images].tolist()
