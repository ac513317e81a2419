"""A trained model's decisions (core/decisions.py): the unknown score's reference features and
threshold, and the per-class thresholds of --target, chosen when it trains (`fit_decisions`) or
later on the saved run without training again (`set_targets`, `graft thresholds`).

Thresholds are chosen on held-out scores: extract's out-of-fold scores of the training images
(calibrate.py computes them anyway), so the val split chooses nothing and its numbers at the
chosen point are honest. finetune and partial have no out-of-fold scores: their thresholds are
chosen on the val split, and model.json says its numbers there are optimistic. The held-out
scores are kept in the run folder (scores.safetensors) for `set_targets`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.config import TrainConfig
from ..core.decisions import (
    MAX_REFERENCES,
    Policy,
    choose_thresholds,
    fit_unknown,
    normalise,
    operating_report,
    parse_targets,
    pick_references,
)
from ..core.errors import ConfigError
from ..data.splits import DatasetSplit as Split
from ..inference.classifier import Classifier, Prediction
from ..models.modelfile import ModelMeta, read_meta, read_scores, write_meta
from ..outputs.card import write_card
from ..training.calibrate import Calibrated
from ..training.jobs import Job

log = logging.getLogger(__name__)

MIN_REFERENCES = 10  # fewer training images give a threshold that is noise: no unknown score


@dataclass
class Decisions:
    """What training leaves for decisions: model.json's "decision", the reference features,
    the val predictions decided by the final policy, and the held-out scores to keep."""

    record: dict[str, Any]
    reference: torch.Tensor | None
    val_preds: list[Prediction]
    scores: dict[str, torch.Tensor]


def fit_decisions(
    cfg: TrainConfig, clf: Classifier, job: Job, split: Split, calibrated: Calibrated
) -> Decisions:
    """The unknown score fitted on the training features, the val split predicted with it, and
    the thresholds of cfg.target chosen on the held-out scores; `clf` decides by them after."""
    reference, unknown = _unknown(cfg, clf, job, split)
    clf.with_decisions(
        Policy(tuple(clf.classes), {}, unknown and unknown["threshold"]),
        reference,
        unknown["k"] if unknown else 1,
    )
    val_preds = clf.predict_files([p for p, _ in split.val])
    held_out, chosen_on = _held_out(cfg, calibrated, clf, split, val_preds)
    targets = parse_targets(cfg.target, clf.classes)
    thresholds = choose_thresholds(*held_out, clf.classes, targets) if targets else {}
    clf.policy = dataclasses.replace(clf.policy, thresholds=thresholds)
    val_preds = clf.redecide(val_preds)
    record: dict[str, Any] = {"unknown": unknown, "thresholds": clf.policy.to_dict()}
    if unknown is None:
        record["unknown_reason"] = (
            f"fewer than {MIN_REFERENCES} readable training images: no unknown score"
        )
    if thresholds:
        record["chosen_on"] = chosen_on
    scores = {"held_out_probs": held_out[0], "held_out_labels": held_out[1]}
    scores.update(_val_scores(clf, split, val_preds))
    return Decisions(record, reference, val_preds, scores)


def _unknown(
    cfg: TrainConfig, clf: Classifier, job: Job, split: Split
) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """The training features the unknown score measures against (extract: the cached ones;
    otherwise one pass of the trained network over the training images) and its threshold."""
    if job.train_features is not None:
        feats = job.train_features[0]
    else:
        bad = set(job.skipped)
        train = [p for p, _ in split.train if p not in bad]
        log.info("unknown score: features of the %d training images", len(train))
        feats = clf.features(train)
    if len(feats) < MIN_REFERENCES:
        return None, None
    keep = pick_references(len(feats), MAX_REFERENCES, cfg.seed)
    reference = normalise(feats[keep])
    unknown = fit_unknown(reference)
    unknown["fitted_on"] = f"leave-one-out distances of {len(reference)} training images" + (
        f" (a random {len(reference)} of {len(feats)})" if len(reference) < len(feats) else ""
    )
    log.info(
        "unknown score: k=%d, threshold %.4f flags %.0f%% of held-out training images",
        unknown["k"],
        unknown["threshold"],
        100 * unknown["flag_rate"],
    )
    return reference, unknown


def _held_out(
    cfg: TrainConfig,
    calibrated: Calibrated,
    clf: Classifier,
    split: Split,
    val_preds: Sequence[Prediction],
) -> tuple[tuple[torch.Tensor, torch.Tensor], str]:
    """The scores thresholds are chosen on: out-of-fold, or else the val split's."""
    oof = calibrated.probabilities()
    if oof is not None and "out_of_fold" in calibrated.record:  # else: val, below
        return (oof, calibrated.labels), calibrated.record["fitted_on"]
    val = _val_scores(clf, split, val_preds)
    if cfg.target and not len(val["val_labels"]):
        raise ConfigError(
            "--target needs held-out scores: this run has no out-of-fold scores and no "
            "readable val images; train with --strategy extract or give a val split"
        )
    return (val["val_probs"], val["val_labels"]), _on_val(cfg.strategy, len(val["val_labels"]))


def _val_scores(
    clf: Classifier, split: Split, preds: Sequence[Prediction]
) -> dict[str, torch.Tensor]:
    probs, unknown = clf.stacked(preds)
    labels = [y for (_, y), p in zip(split.val, preds) if p.probs is not None]
    out = {"val_probs": probs, "val_labels": torch.tensor(labels, dtype=torch.long)}
    if unknown is not None:
        out["val_unknown"] = unknown
    return out


def set_targets(run_dir: str | Path, targets: Sequence[str]) -> ModelMeta:
    """New per-class thresholds for a saved run, chosen on the held-out scores it kept, without
    training again (no targets: back to the arg-max). Rewrites model.json (and the card) with
    the thresholds and the val split's numbers at them; returns the new model.json.

    >>> graft.set_targets("runs/moderation", ["risked:recall=0.95"])  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    scores = read_scores(run_dir, len(meta.classes))
    parsed = parse_targets(targets, meta.classes)
    probs, labels = scores["held_out_probs"], scores["held_out_labels"]
    thresholds = choose_thresholds(probs, labels, meta.classes, parsed) if parsed else {}
    policy = dataclasses.replace(meta.policy, thresholds=thresholds)
    record = {**(meta.decision or {}), "thresholds": policy.to_dict()}
    record.pop("chosen_on", None)
    if thresholds:
        record["chosen_on"] = _chosen_on(meta)
    val = dict(meta.val or {})
    decisions = policy.decide(scores["val_probs"], scores.get("val_unknown"))
    val["decisions"] = operating_report(decisions, scores["val_labels"].tolist(), meta.classes)
    if meta.config is not None:
        meta = dataclasses.replace(meta, config={**meta.config, "target": [str(t) for t in parsed]})
    meta = dataclasses.replace(meta, decision=record, val=val)
    write_meta(run_dir, meta)
    write_card(run_dir)
    return meta


def _chosen_on(meta: ModelMeta) -> str:
    if "out_of_fold" in (meta.calibration or {}):  # extract: the out-of-fold scores
        return meta.calibration["fitted_on"]
    return _on_val(meta.strategy, (meta.val or {}).get("n", 0))


def _on_val(strategy: str | None, n: int) -> str:
    return (
        f"the val split's {n} images (strategy {strategy} has no out-of-fold scores): "
        "the val numbers at this point are optimistic"
    )
