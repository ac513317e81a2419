"""A training run, end to end: config -> data -> backbone -> job -> fit -> save.

`train()` is the Python door behind `graft train`; read it top to bottom. What trains on which
data is `jobs.prepare_job`, the epoch loop is `training.loop.fit`, the files are `checkpoint` and
`runfolder`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.cleaning import label_issues
from ..core.config import TrainConfig, dump_yaml, load_yaml, make_config
from ..core.decisions import parse_targets
from ..core.dist import Dist, broadcast, from_env, process_group
from ..core.errors import ConfigError, GraftError
from ..core.runfolder import CONFIG, REPORT_HTML, SPLIT, check_out_of_data, claim, start_new_run
from ..core.runtime import (
    Progress,
    atomic_write_text,
    no_progress,
    resolve_runtime,
    seed_everything,
    sigterm_as_interrupt,
)
from ..data.discovery import discover
from ..data.splits import load_split, report_duplicates, write_split
from ..frozen.features import extract_features
from ..models.backbones import Backbone, create_backbone
from ..models.freezing import apply_freezing, count_parameters, epoch_plan, trainable_blocks
from ..models.heads import set_feature_norm
from ..models.modelfile import ModelMeta, save_model, save_scores
from ..outputs.card import write_card
from ..outputs.pages import write_comparison
from ..outputs.tracking import Tracking, check_trackers
from ..selection.compare import DEFAULT_FOLDS, Candidate, Comparison, compare
from ..training import checkpoint
from ..training.calibrate import Calibrated, calibrate, calibrate_fitted, fit_on
from ..training.head import fit_head, refit_with_val, start_fitted
from ..training.jobs import prepare_job
from ..training.loop import fit
from .decisions import fit_decisions

log = logging.getLogger(__name__)

# --auto's winner, when it is a fitted head, is fitted again with the val images once val has
# scored it (--refit; --no-refit keeps the head val scored): +0.96 points on unseen images over
# the same picks on eleven folders and three seeds, better on seven (docs/QUALITY.md, stop 46)
AUTO_REFIT = True


@dataclass(kw_only=True)
class Run:
    """What `train` leaves behind: the folder and the numbers that matter. Built by keyword."""

    run_dir: Path
    classes: list[str]
    best: dict[str, Any]
    history: list[dict[str, Any]]
    trainable_params: int
    total_params: int
    wall_seconds: float
    stopped: str | None = None
    skipped: list[str] = field(default_factory=list)
    test: dict[str, Any] | None = None
    val_images: int = 0
    config: TrainConfig | None = None  # the resolved config that ran
    val: dict[str, Any] | None = None  # the saved model on the val split, as `graft evaluate`
    selection: dict[str, Any] | None = None  # --auto: the comparison (compare.json's content)

    @property
    def val_accuracy(self) -> float:
        """The saved model's val accuracy: the same number `graft evaluate` and the report give."""
        return self.val["accuracy"] if self.val else self.best["val_acc"]

    @property
    def val_ci95(self) -> tuple[float, float]:
        """Wilson 95% interval of the val accuracy: 150 images read as what they are."""
        from ..core.metrics import wilson_interval

        if self.val:
            return tuple(self.val["accuracy_ci95"])
        return wilson_interval(round(self.best["val_acc"] * self.val_images), self.val_images)

    def load(self, **kwargs: Any):
        from ..inference.classifier import Classifier

        return Classifier.load(self.run_dir, **kwargs)


def train(
    data: str | Path | TrainConfig | None = None,
    *,
    config_file: str | Path | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress = no_progress,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    auto: bool = False,
    budget: str | float = "5m",
    backbones: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    folds: int = DEFAULT_FOLDS,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> Run:
    """Train a classifier on a folder of images and save it in a run folder.

    `data` is the data folder (options are `TrainConfig` fields: strategy, epochs, lr, ...) or a
    whole `TrainConfig`. A folder holding a run is replaced only with `overwrite=True`.
    `resume=RUN` continues an interrupted run from its `last` checkpoint with the config saved
    in it; then `data` may say where its images are now, and `skip_bad=True` drops files that
    became unreadable.

    `auto=True` chooses the backbone and strategy first (`compare`: `budget`, `backbones`,
    `strategies`, `folds`), then trains the winner on all the training images for its fixed
    number of epochs, keeping the last: the val split chose nothing, so its accuracy is an
    unbiased estimate. The comparison is saved beside the model (compare.json, compare.html).

    >>> run = graft.train("data/demo", epochs=5)  # doctest: +SKIP
    >>> run.load().predict(["data/demo/val/bag/0001.png"])
    [{'bag': 0.97, ...}]
    """
    d = from_env()
    select = (
        dict(budget=budget, backbones=backbones, strategies=strategies, folds=folds, on_row=on_row)
        if auto
        else None
    )
    with process_group(d):
        return _train(d, data, config_file, resume, overwrite, progress, on_epoch, options, select)


def _train(
    d: Dist, data, config_file, resume, overwrite, progress, on_epoch, options, select
) -> Run:
    start = time.perf_counter()
    last = checkpoint.restore_last(resume) if resume is not None else None
    if last is not None and last.meta.get("world_size", 1) != d.world:
        was = last.meta.get("world_size", 1)
        raise ConfigError(
            f"{resume} was trained by {was} process(es) and this is {d.world}: "
            "resume it with the same number (torchrun --nproc_per_node), so the "
            "data order and the resume point match"
        )
    comparison = None
    if select is not None:
        comparison, cfg = _choose(d, data, config_file, options, resume, progress, select)
    else:
        cfg = _config(data, config_file, resume, options)
    runtime = resolve_runtime(
        cfg.device, cfg.precision, training=cfg.strategy != "extract", local_rank=d.local_rank
    )
    seed_everything(cfg.seed)
    split = (
        load_split(Path(resume) / SPLIT, data)
        if resume
        else report_duplicates(discover(cfg.data_dir, **cfg.discover_options()), cfg.dedupe)
    )
    parse_targets(cfg.target, split.classes)  # a class that is not there: before any training
    backbone = create_backbone(cfg.backbone, len(split.classes), cfg.pretrained, cfg.weights)
    cfg = broadcast(d, cfg.resolve(input_size=backbone.spec.input_size))  # one run folder
    backbone = dataclasses.replace(backbone, spec=backbone.spec.with_size(cfg.image_size))
    set_feature_norm(backbone, cfg.feature_norm)
    blocks = trainable_blocks(backbone, cfg.strategy, cfg.unfreeze, cfg.unfreeze_last)
    apply_freezing(backbone, blocks)
    trainable, total = count_parameters(backbone.model)
    log.info(
        "%s: %s trainable of %s parameters (%s), %s on %s",
        cfg.backbone,
        f"{trainable:,}",
        f"{total:,}",
        cfg.strategy,
        runtime.precision,
        runtime.device,
    )

    check_out_of_data(cfg.out, split.root)
    check_trackers(cfg.log)  # a tracker's package missing: refused before any work
    writer = claim if d.is_main else _no_claim  # rank 0 alone writes the run folder
    with writer(cfg.out, resuming=last is not None, overwrite=overwrite) as run_dir:
        job = prepare_job(cfg, backbone, split, runtime, progress, d)  # bad files stop us here
        if job.engine is not None:  # the saved config says which engine ran (auto resolved)
            cfg = dataclasses.replace(cfg, engine=job.engine[0])
        if cfg.head == "fit" and cfg.strategy != "extract" and last is None:
            _start_from_fitted_head(cfg, backbone, split, progress)
        if not d.is_main:  # the same training, nothing written: rank 0 saves the model
            if not cfg.no_loop:  # a fitted extract head needs no other rank
                with sigterm_as_interrupt():
                    fit(job, epoch_plan(cfg, blocks, backbone.spec.input_size), cfg, resume=last)
            return Run(
                run_dir=run_dir,
                classes=split.classes,
                best={},
                history=[],
                trainable_params=trainable,
                total_params=total,
                wall_seconds=0.0,
                config=cfg,
            )
        if last is None:
            start_new_run(run_dir)
            atomic_write_text(run_dir / CONFIG, dump_yaml(cfg))
            write_split(split, run_dir / SPLIT)
            if comparison is not None:
                write_comparison(run_dir, comparison.to_dict())
        trackers = cfg.log if d.is_main else ()
        with Tracking(trackers, run_dir, cfg.to_dict(), cfg.tracking_uri) as tracking:
            fitted = None
            if cfg.no_loop:
                state, fitted = fit_head(job, cfg)
                tracking.fitted_path(state.best.get("path"))
            else:
                with sigterm_as_interrupt():
                    state = fit(
                        job,
                        epoch_plan(cfg, blocks, backbone.spec.input_size),
                        cfg,
                        run_dir=run_dir,
                        resume=last,
                        progress=progress,
                        on_epoch=tracking.also(on_epoch),
                        world=d.world,
                    )
            if state.best_state is None:
                raise GraftError("training stopped before the first epoch finished; nothing saved")
            job.model.load_state_dict(state.best_state)
            if fitted is not None:
                calibrated = calibrate_fitted(fitted, job.train_features[2])
            else:
                calibrated = calibrate(cfg, backbone, job, state.best["epoch"])
            clf = _classifier(backbone, split.classes, cfg, calibrated.temperature)
            if job.train_features is None:  # finetune, partial: no out-of-fold scores
                calibrated = _calibrate_on_val(cfg, clf, split)
            else:
                _mention_label_issues(calibrated, split.root)
            decisions = fit_decisions(cfg, clf, job, split, calibrated)
            val_preds = decisions.val_preds
            val = _scores(clf.evaluate_samples(split.val, val_preds))
            val["protocol"] = _val_protocol(cfg, comparison)
            refits = _refits(cfg, fitted, val)
            log.info(
                "val accuracy of the %s: %.4f on %d images",
                "head fitted without them" if refits else "saved model",
                val["accuracy"],
                val["n"],
            )
            if refits:  # val has scored it: now it is training data too
                fitted = refit_with_val(job, cfg, fitted)
                state.best["refit"] = {**fitted.refit, "l2": fitted.l2}
                val["protocol"] += (
                    f"; the saved head was then fitted again on {fitted.refit['images']} images "
                    "(training and val): this scores the head fitted without val"
                )
            test = _scores(clf.evaluate_samples(split.test)) if split.test else None
            wall = time.perf_counter() - start
            meta = ModelMeta(
                backbone=backbone.name,
                classes=split.classes,
                preprocess=backbone.spec,
                strategy=cfg.strategy,
                trainable_blocks=blocks,
                trainable_params=trainable,
                total_params=total,
                best=state.best,
                calibration=calibrated.record,
                feature_norm=cfg.feature_norm if cfg.feature_norm != "none" else None,
                tta=_tta(cfg),
                decision=decisions.record,
                stopped=state.stopped,
                val=val,
                test=test,
                precision=runtime.precision,
                wall_seconds=round(wall, 2),
                data_dir=split.root,
                layout=split.layout,
                labels=split.labels,
                class_counts=split.counts(),
                skipped_files=job.skipped,
                config=cfg.to_dict(),
                world_size=d.world,
                trunk=str(job.trunk) if job.trunk is not None else None,
                engine=dict(zip(("engine", "reason"), job.engine)) if job.engine else None,
                selection=_selection(comparison, cfg) if comparison is not None else None,
                features_computed_per_rank=job.stats.get("features_computed_per_rank"),
            )
            save_model(run_dir, backbone, meta, decisions.reference)
            save_scores(run_dir, decisions.scores)
            write_card(run_dir)
            if cfg.report:
                _report(run_dir, val_preds, clf)
            tracking.finish(meta.to_dict(), state.stopped, comparison and comparison.to_dict())
            if state.stopped != "interrupted":  # a finished run needs no resume point
                checkpoint.discard_last(run_dir)
    return Run(
        run_dir=run_dir,
        classes=split.classes,
        best=state.best,
        history=state.history,
        trainable_params=trainable,
        total_params=total,
        wall_seconds=wall,
        stopped=state.stopped,
        skipped=job.skipped,
        test=test,
        val_images=val["n"],
        config=cfg,
        val=val,
        selection=comparison.to_dict() if comparison is not None else None,
    )


def _choose(
    d: Dist,
    data,
    config_file,
    options: dict[str, Any],
    resume,
    progress: Progress,
    select: dict[str, Any],
) -> tuple[Comparison, TrainConfig]:
    """--auto: the comparison on the training images, and the winner's config to train. The
    settings given are honoured by every candidate, or refused (compare says which)."""
    if resume is not None or d.enabled:
        raise ConfigError(
            "--auto runs in one process on a new run: not with --resume, not "
            "under torchrun (train the chosen config there)"
        )
    data_dir, given = _given(data, config_file, options)
    comparison = compare(data_dir, reserve_final=True, progress=progress, **select, **given)
    if comparison.interrupted:
        raise KeyboardInterrupt  # nothing trained yet: stop as Ctrl-C stops
    if comparison.chosen is None:
        raise GraftError(
            f"no candidate finished within the budget of "
            f"{comparison.budget_s:.0f} s: give more, e.g. --budget "
            f"{max(2, round(comparison.budget_s * 2 / 60))}m"
        )
    chosen = Candidate.from_row(comparison.chosen)
    log.info("chosen: %s (fold accuracy %.4f)", chosen.name, comparison.chosen["accuracy"])
    final = {**given, **chosen.settings()}
    cfg = make_config(data_dir, **final)
    if final.get("refit") is None and cfg.strategy == "extract" and cfg.resolved_head() == "fit":
        final["refit"] = AUTO_REFIT
    return comparison, make_config(data_dir, **final)


def _given(data, config_file, options: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The data folder and the settings the caller gave: options, a config file's keys, or the
    fields of a TrainConfig that differ from the defaults."""
    if isinstance(data, TrainConfig):
        if config_file is not None:
            raise ConfigError("pass a TrainConfig or a config file, not both")
        defaults = TrainConfig(data.data_dir).to_dict()
        given = {k: v for k, v in data.to_dict().items() if v != defaults[k]}
        return data.data_dir, {**given, **options}
    values = load_yaml(config_file) if config_file is not None else {}
    values.update({k: v for k, v in options.items() if v is not None})
    data_dir = str(data) if data is not None else values.get("data_dir")
    return data_dir, {k: v for k, v in values.items() if k != "data_dir"}


def _val_protocol(cfg: TrainConfig, comparison: Comparison | None) -> str:
    if cfg.no_loop:
        chosen = "backbone chosen by cross-validation on train, " if comparison else ""
        return f"unbiased: {chosen}head fitted with its L2 chosen by cross-validation on train"
    if cfg.keep == "best":
        return "best epoch chosen on val: optimistic"
    if comparison is not None:
        return "unbiased: model chosen by cross-validation on train, last epoch kept"
    return "unbiased: fixed epochs, last kept"


def _refits(cfg: TrainConfig, fitted, val: dict[str, Any]) -> bool:
    """--refit applies: a fitted head, and val images to add to its training ones."""
    return bool(cfg.refit) and fitted is not None and val["n"] > 0


def _selection(comparison: Comparison, cfg: TrainConfig) -> dict[str, Any]:
    """What model.json records of an --auto run: the choice, why, and how the winner trained."""
    best = comparison.chosen
    return {
        "chosen": best["candidate"],
        "fold_accuracy": best["accuracy"],
        "fold_accuracy_ci95": best["accuracy_ci95"],
        "protocol": comparison.protocol,
        "budget_s": comparison.budget_s,
        "compare_seconds": comparison.wall_s,
        "retrained": (
            f"on all {comparison.pool} training images, "
            + (
                "the head fitted with its L2 chosen by cross-validation"
                if cfg.no_loop
                else f"{cfg.epochs} epochs, the last kept"
            )
            + "; scored once on the val split, which no choice used"
            + ("; then the head fitted again with the val images" if cfg.refit else "")
        ),
        "candidates": [
            {k: r[k] for k in ("candidate", "accuracy", "status", "seconds")} for r in comparison
        ],
    }


def _config(
    data: str | Path | TrainConfig | None,
    config_file: str | Path | None,
    resume: str | Path | None,
    options: dict[str, Any],
) -> TrainConfig:
    """The config to run: a resumed run's saved one, a given TrainConfig, or file + options."""
    if resume is not None:
        if config_file is not None or set(options) - {"skip_bad"} or isinstance(data, TrainConfig):
            raise ConfigError(
                "resume reuses the run's config.yaml: it takes the run folder, "
                "and only where the images are now and skip_bad"
            )
        moved = str(data) if data is not None else None  # where the images are now
        return make_config(moved, Path(resume) / CONFIG, out=str(resume), **options)
    if isinstance(data, TrainConfig):
        if config_file is not None:
            raise ConfigError("pass a TrainConfig or a config file, not both")
        if not options:
            return data
        values = {**data.to_dict(), **options}
        return make_config(values.pop("data_dir"), None, **values)
    return make_config(data, config_file, **options)


@contextlib.contextmanager
def _no_claim(run_dir: str, **_: Any) -> Iterator[Path]:
    yield Path(run_dir)


def _classifier(backbone: Backbone, classes: list[str], cfg: TrainConfig, temperature: float):
    """The saved model as `graft evaluate` runs it (fp32, its batching, its calibration, the
    run's pixel limit): one model, one number."""
    from ..inference.classifier import Classifier

    runtime = resolve_runtime(cfg.device, "fp32")
    clf = Classifier(backbone, classes, runtime, temperature=temperature, tta=_tta(cfg))
    clf.max_pixels = cfg.max_pixels
    return clf


def _tta(cfg: TrainConfig) -> str | None:
    """model.json's and the classifier's test-time augmentation: None when there is none."""
    return cfg.tta if cfg.tta != "none" else None


def _start_from_fitted_head(cfg: TrainConfig, backbone: Backbone, split, progress) -> None:
    """finetune/partial with --head fit (partial's default): the head fitted on the frozen
    network's features of the training images first (training/head.start_fitted)."""
    fs = extract_features(
        backbone,
        split.train,
        resolve_runtime(cfg.device, cfg.precision),
        cfg.cache_dir,
        workers=cfg.workers,
        progress=progress,
        max_pixels=cfg.max_pixels,
    )
    fitted = start_fitted(cfg, backbone.model.head, fs, len(split.classes))
    log.info(
        "the head starts fitted on the frozen features (L2 %g, %s), then trains with the blocks",
        fitted.l2,
        f"{fitted.folds}-fold cross-validation" if fitted.folds else "default",
    )


def _mention_label_issues(calibrated: Calibrated, root: str) -> None:
    """The out-of-fold scores calibration made anyway, read as confident learning does
    (core/cleaning.py): images the heads that never saw them put confidently in another class."""
    probs = calibrated.probabilities()
    if probs is None:
        return
    issues = label_issues(probs, calibrated.labels)
    if issues:
        log.info(
            "%d training image(s) look mislabelled to heads that never saw them: "
            "`graft audit %s` lists them with the class suggested",
            len(issues),
            root,
        )


def _calibrate_on_val(cfg: TrainConfig, clf, split) -> Calibrated:
    """finetune and partial: the temperature fitted on the val split's scores, which it then
    applies to (training.calibrate explains why); `clf` takes it."""
    preds = clf.predict_files([p for p, _ in split.val])
    probs, _ = clf.stacked(preds)
    labels = torch.tensor([y for (_, y), p in zip(split.val, preds) if p.probs is not None])
    calibrated = fit_on(
        probs.clamp_min(1e-12).log(),
        labels,
        f"the val split's {len(labels)} images (strategy {cfg.strategy} has no out-of-fold "
        "scores): the val split's calibration numbers are optimistic",
    )
    clf.temperature = calibrated.temperature
    return calibrated


def _scores(report: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "accuracy",
        "accuracy_ci95",
        "balanced_accuracy",
        "n",
        "per_class",
        "calibration",
        "decisions",
        "skipped",
    )
    return {k: report[k] for k in keys}


def _report(run_dir: Path, val_predictions: list, clf) -> None:
    from ..outputs.report import build_report

    try:
        report = build_report(run_dir, val_predictions=val_predictions, classifier=clf)
    except GraftError as exc:  # the model is saved; a missing figure must not undo that
        log.warning("report not written: %s", exc)
        return
    log.info("report written to %s in %.1fs", run_dir / REPORT_HTML, report["build_seconds"])
