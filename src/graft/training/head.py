"""extract's default head, fitted rather than trained: a softmax regression solved on the job's
cached training features (core/linear.py), its L2 strength chosen by cross-validation on the
training images. The val split only scores the result, as the epoch loop's `keep="last"` does;
the out-of-fold scores of the cross-validation are the ones calibration fits its temperature on.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Collection

import torch
from torch import nn

from ..core.config import TrainConfig
from ..core.errors import GraftError
from ..core.linear import FittedHead, fit_logistic_cv, refit_logistic
from ..data.splits import Sample
from ..frozen.features import FeatureSet
from ..models.heads import head_input
from .jobs import Job, make_criterion
from .loop import FitState, evaluate, per_class_recall

log = logging.getLogger(__name__)


def fit_on_features(
    cfg: TrainConfig,
    feats: torch.Tensor,
    aug: torch.Tensor,
    labels: torch.Tensor,
    classes: int,
    head: nn.Module | None = None,
) -> FittedHead:
    """The weights of `head` (an `nn.Linear`, or models/heads.NormedLinear, which reads the
    features normalised) on eval features (N, D) and augmented views (N, V, D) of N labelled
    images, the views extra samples in their image's fold; class weights and label smoothing as
    the config says (as the epoch loop's loss has them). `compare` scores its folds with the same
    call. Load them into `head` and it scores features as they come."""
    n, views = aug.shape[0], aug.shape[1]
    image = torch.arange(n)
    reads = head_input(head) if head is not None else (lambda x: x)
    return fit_logistic_cv(
        reads(torch.cat([feats, aug.flatten(0, 1)])),
        torch.cat([labels, labels.repeat_interleave(views)]),
        classes,
        groups=torch.cat([image, image.repeat_interleave(views)]),
        class_weight=make_criterion(cfg, labels, classes).weight,
        label_smoothing=cfg.label_smoothing,
        seed=cfg.seed,
    )


def start_fitted(
    cfg: TrainConfig,
    head: nn.Linear,
    fs: FeatureSet,
    classes: int,
    samples: Collection[Sample] | None = None,
) -> FittedHead:
    """finetune/partial with --head fit (LP-FT, Kumar et al. 2022; fastai's fine_tune): `head`
    set to the head fitted on the frozen features `fs` of the training images (of `samples`
    among them: a comparison's fold), so the blocks that then train are not pulled about by a
    random head's gradients."""
    keep = torch.tensor(
        [i for i, s in enumerate(fs.samples) if samples is None or s in samples], dtype=torch.long
    )
    fitted = fit_on_features(cfg, fs.features[keep], fs.aug[keep], fs.labels[keep], classes)
    with torch.no_grad():
        head.weight.copy_(fitted.weight.to(head.weight))
        head.bias.copy_(fitted.bias.to(head.bias))
    return fitted


def fit_head(job: Job, cfg: TrainConfig) -> tuple[FitState, FittedHead]:
    """Fit the job's head (an `nn.Linear` on features) and score it on val: the state the epoch
    loop would return (`best` is the head's row, `history` is empty) and the fit itself."""
    if job.train_features is None or not isinstance(job.model, nn.Linear):
        raise GraftError("--head fit needs extract's cached features and a linear head")
    start = time.perf_counter()
    feats, aug, labels, _ = job.train_features
    fitted = fit_on_features(cfg, feats, aug, labels, len(job.classes), job.model)
    job.model.load_state_dict(fitted.linear().state_dict())
    ev = evaluate(job.model, job.val_loader, job.criterion, job.runtime)
    row = {
        "head": "fit",
        "l2": fitted.l2,
        "folds": fitted.folds,
        "val_loss": ev.loss,
        "val_acc": ev.acc,
        "seconds": round(time.perf_counter() - start, 3),
        "val_recall": per_class_recall(ev, job.classes),
        "path": fitted.path,
    }
    how = f"{fitted.folds}-fold cross-validation" if fitted.folds else "default (no CV)"
    if fitted.subsample:  # above CV_IMAGES: model.json says on how many, and the scaling
        row["subsample"] = fitted.subsample
        how += (
            f" on a subsample of {fitted.subsample['images']} of "
            f"{fitted.subsample['of']} images (there {fitted.subsample['l2']:g})"
        )
    log.info(
        "head fitted: L2 %g chosen by %s, %.2fs; val acc %.4f",
        fitted.l2,
        how,
        fitted.seconds,
        ev.acc,
    )
    state = FitState(best=row, best_state=copy.deepcopy(job.model.state_dict()), keep="last")
    return state, fitted


def refit_with_val(job: Job, cfg: TrainConfig, fitted: FittedHead) -> FittedHead:
    """The job's head fitted again on the training images (their views too) and the val
    images, at the strength cross-validation chose on the training ones (scaled to the images:
    `refit_logistic`), and loaded into the job's model: the head `--refit` saves. Call it once
    val has scored the first fit: from here on val is training data."""
    feats, aug, labels, _ = job.train_features
    val_feats, val_labels = job.val_loader.dataset.tensors
    views = aug.shape[1]
    reads = head_input(job.model)
    refit = refit_logistic(
        fitted,
        reads(torch.cat([feats, aug.flatten(0, 1), val_feats])),
        torch.cat([labels, labels.repeat_interleave(views), val_labels]),
        len(job.classes),
        chosen_on=len(labels),
        images=len(labels) + len(val_labels),
        class_weight=make_criterion(cfg, torch.cat([labels, val_labels]), len(job.classes)).weight,
        label_smoothing=cfg.label_smoothing,
    )
    job.model.load_state_dict(refit.linear().state_dict())
    log.info(
        "head fitted again with the %d val images: %d images, L2 %g (%.2fs)",
        len(val_labels),
        refit.refit["images"],
        refit.l2,
        refit.seconds - fitted.seconds,
    )
    return refit
