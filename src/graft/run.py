"""A training run, end to end: config -> data -> backbone -> fit -> run folder with the model.

`train()` is the Python door behind `graft train`; `fit` (engine) is the loop it drives.
"""

from __future__ import annotations

import csv
import datetime as _dt
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .backbones import Backbone, create_backbone
from .config import TrainConfig, dump_yaml, make_config
from .data import DatasetSplit, ImageDataset, discover, format_bad_files, write_split
from .engine import FitState, Progress, fit, make_optimizer, make_scheduler, no_progress
from .errors import DatasetError
from .features import extract_features
from .freezing import apply_freezing, count_parameters, param_groups, trainable_blocks
from .loaders import build_datasets
from .runtime import (
    Runtime,
    atomic_write_text,
    clean_temp_files,
    default_workers,
    resolve_runtime,
    seed_everything,
)
from .transforms import build_transforms

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What `train` leaves behind: the folder and the numbers that matter."""

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

    def load(self, **kwargs: Any):
        from .predict import Classifier

        return Classifier.load(self.run_dir, **kwargs)


def train(
    data_dir: str | Path | None = None,
    *,
    config_file: str | Path | None = None,
    progress: Progress = no_progress,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> Run:
    """Train a classifier on a folder of images and save it in a run folder.

    Options are `TrainConfig` fields (strategy, epochs, lr, ...).

    >>> run = graft.train("data/demo", epochs=5)  # doctest: +SKIP
    >>> run.load().predict(["data/demo/val/bag/0001.png"])
    [{'bag': 0.97, ...}]
    """
    start = time.perf_counter()
    cfg = make_config(data_dir, config_file, **options).resolve()
    runtime = resolve_runtime(cfg.device, cfg.precision, training=cfg.strategy != "extract")
    seed_everything(cfg.seed)
    split = discover(cfg.data_dir, cfg.val_fraction, cfg.seed)
    backbone = create_backbone(cfg.backbone, len(split.classes), cfg.pretrained, cfg.weights)
    backbone.spec = backbone.spec.with_size(cfg.image_size)
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

    run_dir = _make_run_dir(cfg)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    write_split(split, run_dir / "split")
    csv_path = run_dir / "metrics.csv"

    def record(row: dict[str, Any], state: FitState) -> None:
        _append_csv(csv_path, row)
        if on_epoch is not None:
            on_epoch(row)

    if cfg.strategy == "extract":
        state, skipped = _fit_head(cfg, backbone, split, runtime, progress, record)
    else:
        state, skipped = _fit_images(cfg, backbone, split, blocks, runtime, progress, record)
    if state.best_state is None:
        raise DatasetError("training stopped before the first epoch finished; nothing to save")
    backbone.model.load_state_dict(state.best_state)
    test = _evaluate_test(cfg, backbone, split, runtime, skipped) if split.test else None
    wall = time.perf_counter() - start
    checkpoint.save_model(
        run_dir,
        backbone,
        split.classes,
        {
            "strategy": cfg.strategy,
            "trainable_blocks": blocks,
            "trainable_params": trainable,
            "total_params": total,
            "metric": "val_acc",
            "mode": "max",
            "best": state.best,
            "stopped": state.stopped,
            "test": test,
            "precision": runtime.precision,
            "wall_seconds": round(wall, 2),
            "data_dir": split.root,
            "layout": split.layout,
            "class_counts": split.counts(),
            "skipped_files": skipped,
            "config": cfg.to_dict(),
        },
    )
    return Run(
        run_dir,
        split.classes,
        state.best,
        state.history,
        trainable,
        total,
        wall,
        state.stopped,
        skipped,
        test,
    )


# ---------------------------------------------------------------- strategies


def _fit_head(
    cfg: TrainConfig,
    backbone: Backbone,
    split: DatasetSplit,
    runtime: Runtime,
    progress: Progress,
    record: Callable,
) -> tuple[FitState, list[str]]:
    """extract: pooled features once (cached), then the head alone trains on them."""
    workers = default_workers() if cfg.workers is None else cfg.workers
    kw = dict(runtime=runtime, cache_dir=cfg.cache_dir, workers=workers, progress=progress)
    tr = extract_features(backbone, split.train, views=cfg.cache_views, **kw)
    va = extract_features(backbone, split.val, **kw)
    skipped = _check_bad(cfg, tr.bad + va.bad)
    log.info("features: %d from cache, %d computed", tr.hits + va.hits, tr.computed + va.computed)
    x = torch.cat([tr.features, tr.aug.flatten(0, 1)])
    y = torch.cat([tr.labels, tr.labels.repeat_interleave(cfg.cache_views)])
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=cfg.batch_size,
        generator=g,
        **_sampler_kwargs(cfg, y, g),
    )
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(va.features, va.labels), batch_size=1024
    )
    head = backbone.model.head
    head_runtime = Runtime(torch.device("cpu"), None)  # a Linear on a few MB: the CPU is fastest
    opt = make_optimizer(
        [{"params": list(head.parameters()), "lr": cfg.lr}],
        cfg.optimizer,
        cfg.lr,
        cfg.momentum,
        cfg.weight_decay,
    )
    sched = make_scheduler(opt, cfg.schedule, cfg.epochs, cfg.step_size, cfg.gamma)
    state = fit(
        head,
        train_loader,
        val_loader,
        optimizer=opt,
        scheduler=sched,
        criterion=_criterion(cfg, y, len(split.classes)),
        runtime=head_runtime,
        epochs=cfg.epochs,
        patience=cfg.patience,
        on_epoch=record,
    )
    if state.best_state is not None:
        state.best_state = {f"head.{k}": v for k, v in state.best_state.items()}
        state.best_state = {**backbone.model.state_dict(), **state.best_state}
    return state, skipped


def _fit_images(
    cfg: TrainConfig,
    backbone: Backbone,
    split: DatasetSplit,
    blocks: list[str],
    runtime: Runtime,
    progress: Progress,
    record: Callable,
) -> tuple[FitState, list[str]]:
    """finetune / partial: the recipe runs as stages: the head alone for `warmup_epochs`, then
    the chosen blocks at `lr * backbone_lr_mult` with the head at `lr`."""
    workers = default_workers() if cfg.workers is None else cfg.workers
    train_ds, val_ds, bad = build_datasets(
        split.train, split.val, backbone.spec, cfg.rotation, workers=workers + 1
    )
    skipped = _check_bad(cfg, bad)
    # decoded datasets augment small uint8 tensors: worker processes would cost more than they save
    workers = workers if isinstance(train_ds, ImageDataset) else 0
    g = torch.Generator().manual_seed(cfg.seed)
    labels = torch.tensor(_labels(train_ds))
    train_loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        num_workers=workers,
        generator=g,
        drop_last=len(train_ds) > cfg.batch_size,
        **_sampler_kwargs(cfg, labels, g),
    )
    val_loader = torch.utils.data.DataLoader(
        val_ds, batch_size=cfg.batch_size, num_workers=workers, persistent_workers=workers > 0
    )
    model = backbone.model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = _criterion(cfg, labels, len(split.classes))
    full = backbone.spec.input_size
    low = progressive_size(full) if cfg.progressive else full
    state = FitState()
    for stage_blocks, epochs in [([], cfg.warmup_epochs), (blocks, cfg.epochs - cfg.warmup_epochs)]:
        if epochs <= 0 or state.stopped:
            continue
        apply_freezing(backbone, stage_blocks)
        mult = cfg.backbone_lr_mult if cfg.warmup_epochs else 1.0
        opt = make_optimizer(
            param_groups(backbone, cfg.lr, mult),
            cfg.optimizer,
            cfg.lr,
            cfg.momentum,
            cfg.weight_decay,
        )
        sched = make_scheduler(opt, cfg.schedule, epochs, cfg.step_size, cfg.gamma)
        low_epochs = epochs // 2 if low < full else 0
        for size, n in ((low, low_epochs), (full, epochs - low_epochs)):
            if n <= 0 or state.stopped:
                continue
            if low < full:
                log.info("training at %dpx for %d epoch(s)", size, n)
            spec = backbone.spec.with_size(size)
            train_ds.transform = build_transforms(spec, True, cfg.rotation)
            state = fit(
                model,
                train_loader,
                val_loader,
                optimizer=opt,
                scheduler=sched,
                criterion=criterion,
                runtime=runtime,
                epochs=n,
                state=state,
                patience=cfg.patience,
                progress=progress,
                on_epoch=record,
            )
    return state, skipped


def progressive_size(full: int) -> int:
    """About 70% of the input size, a multiple of 32 (224 -> 160): half the pixels, so the first
    epochs cost about 2.5x less on a CPU (bench/speed.py), as in fastai's progressive resizing."""
    return max(32, round(full * 0.7 / 32) * 32)


def _labels(ds: torch.utils.data.Dataset) -> list[int]:
    return list(ds.labels) if hasattr(ds, "labels") else [y for _, y in ds.samples]


def _evaluate_test(
    cfg: TrainConfig, backbone: Backbone, split: DatasetSplit, runtime: Runtime, skipped: list[str]
) -> dict[str, Any]:
    """The best model on test/, once: reported apart from the (selected-on) val accuracy."""
    from .predict import Classifier

    clf = Classifier(backbone, split.classes, runtime)
    report = clf.evaluate_samples(split.test)
    log.info("test accuracy %.4f on %d images", report["accuracy"], report["n"])
    return {k: report[k] for k in ("accuracy", "accuracy_ci95", "n", "skipped")}


# ---------------------------------------------------------------- helpers


def _check_bad(cfg: TrainConfig, bad: list) -> list[str]:
    if bad and not cfg.skip_bad:
        raise DatasetError(
            f"{len(bad)} file(s) cannot be used:\n{format_bad_files(bad)}\n"
            "Fix or remove them, or pass --skip-bad to train without them "
            f"(graft verify {cfg.data_dir} lists them all)"
        )
    if bad:
        log.warning("skipping %d unreadable file(s):\n%s", len(bad), format_bad_files(bad))
    return [b.path for b in bad]


def _criterion(cfg: TrainConfig, labels: torch.Tensor, num_classes: int) -> nn.Module:
    weight = None
    if cfg.balance == "weights":
        counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
        weight = counts.sum() / (num_classes * counts)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def _sampler_kwargs(cfg: TrainConfig, labels: torch.Tensor, g: torch.Generator) -> dict:
    if cfg.balance != "sampler":
        return {"shuffle": True}
    counts = torch.bincount(labels).float()
    weights = (1.0 / counts)[labels]
    sampler = torch.utils.data.WeightedRandomSampler(weights, len(labels), generator=g)
    return {"sampler": sampler, "shuffle": False}


def _make_run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        run_dir = Path(cfg.out)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.backbone)
        run_dir = Path("runs") / f"{stamp}-{safe}"
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = Path("runs") / f"{stamp}-{safe}-{n}"
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_temp_files(run_dir)
    if (run_dir / "metrics.csv").exists():
        (run_dir / "metrics.csv").unlink()  # a new run in an old folder starts a new log
    return run_dir


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
