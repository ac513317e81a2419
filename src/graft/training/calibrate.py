"""The temperature a trained model's probabilities are divided by, fitted on scores of images the
scoring model never trained on and that produce none of the reported numbers.

extract: the head is cheap to train on cached features, so every training image gets an
out-of-fold score: k fresh heads, each trained as the real one was (same settings and schedule,
stopped at the epoch the real one was kept at) on the other folds, score the held-out fold. The
temperature fitted to those scores is applied to the head trained on all the images. Stopping at
the same epoch matters: a head kept at epoch 3 of 60 (the best on a small val split) is far less
sure of itself than one trained to the end, and a temperature fitted on the latter made the former
worse (fm10 in bench/calibration.py: ECE 0.22 -> 0.26 on 3,000 unseen images). The val split
stays untouched, so the numbers reported on it, calibration included, are honest. finetune and
partial train the whole network or its top: k more trainings would multiply the cost, so their
temperature is fitted on the val split's scores (`fit_on`), and model.json says that the val
split's calibration numbers are then optimistic (the same bargain as choosing the best epoch on
it). Fewer than MIN_SCORES held-out scores keep the raw softmax, and model.json says why.

The out-of-fold scores themselves come back too: per-class thresholds (--target) are chosen on
them, calibrated, for the same reason (core/decisions.py).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..core.calibration import MIN_SCORES, all_right, fit_temperature, scores
from ..core.config import TrainConfig
from ..core.linear import FittedHead
from ..data.splits import stratified_folds
from ..models.backbones import Backbone
from ..models.freezing import epoch_plan
from .jobs import Job, feature_job
from .loop import fit

log = logging.getLogger(__name__)

FOLDS = 5
SMOOTHED = (
    "every held-out score was right, so the temperature was fitted against Platt's smoothed "
    "targets ((n + 1) / (n + 2) on the true class), not the labels: core/calibration.py"
)


class _Kept(Exception):
    """A fold's head reached the epoch the real one was kept at."""


@dataclass(frozen=True)
class Calibrated:
    """What model.json records under "calibration" (the temperature and how it was fitted, or
    method "none" and why not), and the out-of-fold logits and labels it was fitted on."""

    record: dict[str, Any]
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @property
    def temperature(self) -> float:
        return self.record["temperature"]

    def probabilities(self) -> torch.Tensor | None:
        """The out-of-fold scores as the saved model gives them: calibrated."""
        return None if self.logits is None else (self.logits / self.temperature).softmax(1)


def calibrate(cfg: TrainConfig, backbone: Backbone, job: Job, kept_epoch: int) -> Calibrated:
    """The temperature fitted on out-of-fold scores of the training images, with those scores.
    `kept_epoch`: the epoch the trained head was kept at. Leaves the trained head as it found
    it."""
    if job.train_features is None:
        return _none(
            f"strategy {cfg.strategy}: no out-of-fold scores without training the "
            "network again for each fold; probabilities are the raw softmax"
        )
    feats, aug, labels, samples = job.train_features
    counts = torch.bincount(labels, minlength=len(job.classes))
    k = min(FOLDS, int(counts.min()))
    if k < 2 or len(labels) < MIN_SCORES:
        return _none(
            f"too few training images to fit a calibration ({len(labels)}, a class with "
            f"{int(counts.min())}): probabilities are the raw softmax"
        )
    head = backbone.model.head
    trained = copy.deepcopy(head.state_dict())
    oof = torch.zeros(len(labels), len(job.classes))
    fold_cfg = dataclasses.replace(cfg, keep="last", patience=0)

    def stop(row: dict[str, Any]) -> None:
        if row["epoch"] >= kept_epoch:
            raise _Kept

    with torch.random.fork_rng(devices=[]):
        for held in stratified_folds(samples, k, cfg.seed):
            torch.manual_seed(cfg.seed)
            for m in head.modules():  # a fresh head, as the real one started
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            te = torch.tensor(held)
            tr = torch.tensor(sorted(set(range(len(labels))) - set(held)))
            fold = feature_job(
                fold_cfg,
                backbone,
                (feats[tr], aug[tr], labels[tr]),
                (feats[te], labels[te]),
                job.classes,
            )
            try:
                fit(fold, epoch_plan(fold_cfg, [], cfg.image_size), fold_cfg, on_epoch=stop)
            except _Kept:
                pass
            with torch.inference_mode():
                oof[te] = head.eval()(feats[te]).float()
    head.load_state_dict(trained)
    return fit_on(
        oof,
        labels,
        f"{k}-fold out-of-fold scores of the {len(labels)} training images, "
        f"each fold's head trained to epoch {kept_epoch} as the model was",
        scores_key="out_of_fold",
    )


def calibrate_fitted(fitted: FittedHead, labels: torch.Tensor) -> Calibrated:
    """extract with a fitted head (core/linear.py): the temperature fitted on the out-of-fold
    logits its cross-validation made anyway, at the L2 strength it chose (that one choice was
    made on the same scores: a hair optimistic, as any validation score of a tuned model)."""
    if fitted.oof_logits is None:
        return _none(
            "no cross-validation (a class has a single training image): probabilities are "
            "the raw softmax"
        )
    scored = labels if fitted.oof_images is None else labels[fitted.oof_images]
    which = (
        f"the {len(labels)} training images"
        if fitted.oof_images is None
        else f"{len(scored)} of the {len(labels)} training images (the subsample that chose it)"
    )
    return fit_on(
        fitted.oof_logits,
        scored,
        f"{fitted.folds}-fold out-of-fold scores of {which}, from "
        f"the cross-validation that chose the head's L2 ({fitted.l2:g})",
        scores_key="out_of_fold",
    )


def fit_on(
    logits: torch.Tensor, labels: torch.Tensor, fitted_on: str, scores_key: str = "held_out"
) -> Calibrated:
    """The temperature fitted on held-out `logits` (log-probabilities do as well: the softmax
    does not see a constant per row), or the raw softmax when there are too few of them. The
    record keeps the scores before and after under `scores_key`."""
    if len(labels) < MIN_SCORES:
        return _none(
            f"too few held-out scores to fit a calibration ({len(labels)}, fewer than "
            f"{MIN_SCORES}): probabilities are the raw softmax"
        )
    t = fit_temperature(logits, labels)
    raw, after = scores(logits.softmax(1), labels), scores((logits / t).softmax(1), labels)
    log.info(
        "calibration: temperature %.3f on %s (NLL %.3f -> %.3f)",
        t,
        fitted_on,
        raw["nll"],
        after["nll"],
    )
    record = {
        "method": "temperature",
        "temperature": round(t, 6),
        "fitted_on": fitted_on,
        scores_key: {"raw": raw, "calibrated": after},
    }
    if all_right(logits, labels):
        record["targets"] = SMOOTHED
    return Calibrated(record, logits.float(), labels.clone())


def _none(reason: str) -> Calibrated:
    return Calibrated({"method": "none", "temperature": 1.0, "reason": reason})
