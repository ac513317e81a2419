"""A training run, end to end: config -> data -> backbone -> epoch plan -> run folder.

`train()` is the Python door behind `graft train`. Both strategies become a `_Job` (what trains,
on which loaders) and one epoch plan (stage, trainable blocks, image size per epoch) that
`_train_loop` executes with `engine.fit`, saving the `last` checkpoint after every epoch.
"""

from __future__ import annotations

import csv
import datetime as _dt
import logging
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import checkpoint
from .backbones import Backbone, create_backbone
from .config import TrainConfig, dump_yaml, make_config
from .data import (
    DatasetSplit,
    ImageDataset,
    discover,
    find_duplicates,
    format_bad_files,
    load_split,
    write_split,
)
from .engine import FitState, Progress, fit, make_optimizer, make_scheduler, no_progress
from .errors import DatasetError, GraftError
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

Plan = list[tuple[int, tuple[str, ...], int]]  # per epoch: (stage, trainable blocks, image size)


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
    val_images: int = 0

    @property
    def val_ci95(self) -> tuple[float, float]:
        """Wilson 95% interval of the best val accuracy: 150 images read as what they are."""
        from .metrics import wilson_interval

        return wilson_interval(round(self.best["val_acc"] * self.val_images), self.val_images)

    def load(self, **kwargs: Any):
        from .predict import Classifier

        return Classifier.load(self.run_dir, **kwargs)


def train(
    data_dir: str | Path | None = None,
    *,
    config_file: str | Path | None = None,
    resume: str | Path | None = None,
    progress: Progress = no_progress,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> Run:
    """Train a classifier on a folder of images and save it in a run folder.

    Options are `TrainConfig` fields (strategy, epochs, lr, ...). `resume=RUN` continues an
    interrupted run from its `last` checkpoint with the config saved in it.

    >>> run = graft.train("data/demo", epochs=5)  # doctest: +SKIP
    >>> run.load().predict(["data/demo/val/bag/0001.png"])
    [{'bag': 0.97, ...}]
    """
    start = time.perf_counter()
    if resume is not None:
        last = checkpoint.load_last(resume)
        cfg = make_config(None, Path(resume) / "config.yaml", out=str(resume))
    else:
        last = None
        cfg = make_config(data_dir, config_file, **options).resolve()
    runtime = resolve_runtime(cfg.device, cfg.precision, training=cfg.strategy != "extract")
    seed_everything(cfg.seed)
    split = load_split(Path(resume) / "split") if resume is not None else _discover(cfg)
    backbone = create_backbone(cfg.backbone, len(split.classes), cfg.pretrained, cfg.weights)
    backbone.spec = backbone.spec.with_size(cfg.image_size)
    blocks = trainable_blocks(backbone, cfg.strategy, cfg.unfreeze, cfg.unfreeze_last)
    apply_freezing(backbone, blocks)
    trainable, total = count_parameters(backbone.model)
    log.info("%s: %s trainable of %s parameters (%s), %s on %s", cfg.backbone, f"{trainable:,}",
             f"{total:,}", cfg.strategy, runtime.precision, runtime.device)  # fmt: skip

    run_dir = _make_run_dir(cfg, resuming=last is not None)
    if last is None:
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        write_split(split, run_dir / "split")
    prepare = _prepare_features if cfg.strategy == "extract" else _prepare_images
    job = prepare(cfg, backbone, split, runtime, progress)
    plan = epoch_plan(cfg, blocks, backbone.spec.input_size)
    with _sigterm_as_interrupt():
        state = _train_loop(job, plan, cfg, backbone, run_dir, last, progress, on_epoch)
    if state.best_state is None:
        raise DatasetError("training stopped before the first epoch finished; nothing to save")
    job.model.load_state_dict(state.best_state)
    test = _evaluate_test(backbone, split, runtime) if split.test else None
    wall = time.perf_counter() - start
    checkpoint.save_model(run_dir, backbone, split.classes, {
        "strategy": cfg.strategy, "trainable_blocks": blocks, "trainable_params": trainable,
        "total_params": total, "metric": "val_acc", "mode": "max", "best": state.best,
        "stopped": state.stopped, "test": test, "precision": runtime.precision,
        "wall_seconds": round(wall, 2), "data_dir": split.root, "layout": split.layout,
        "class_counts": split.counts(), "skipped_files": job.skipped, "config": cfg.to_dict(),
    })  # fmt: skip
    if cfg.report:
        from .report import build_report

        try:
            build_report(run_dir)
        except GraftError as exc:  # the model is saved; a missing figure must not undo that
            log.warning("report not written: %s", exc)
    if state.stopped != "interrupted":  # a finished run needs no resume point
        for name in (checkpoint.LAST_WEIGHTS, checkpoint.LAST_META):
            (run_dir / name).unlink(missing_ok=True)
    return Run(run_dir, split.classes, state.best, state.history, trainable, total, wall,
               state.stopped, job.skipped, test, len(job.val_loader.dataset))  # fmt: skip


def epoch_plan(cfg: TrainConfig, blocks: list[str], full: int) -> Plan:
    """The recipe as data: stage 0 trains the head alone for `warmup_epochs`, stage 1 the chosen
    blocks too; with `progressive`, the first half of each stage runs at ~70% image size."""
    if cfg.strategy == "extract":
        return [(1, (), full)] * cfg.epochs
    low = progressive_size(full) if cfg.progressive else full
    plan: Plan = []
    stages = [((), cfg.warmup_epochs), (tuple(blocks), cfg.epochs - cfg.warmup_epochs)]
    for stage, (stage_blocks, n) in enumerate(stages):
        n = max(0, n)
        n_low = n // 2 if low < full else 0
        plan += [(stage, stage_blocks, low)] * n_low + [(stage, stage_blocks, full)] * (n - n_low)
    return plan


def progressive_size(full: int) -> int:
    """About 70% of the input size, a multiple of 32 (224 -> 160): half the pixels per image.
    Opt-in (`--progressive`): on the demo it saved 7% of the wall time and cost 4 points of val
    accuracy (docs/PERFORMANCE.md)."""
    return max(32, round(full * 0.7 / 32) * 32)


# ---------------------------------------------------------------- what trains, on what


@dataclass
class _Job:
    model: nn.Module  # what trains: the head on features (extract) or the whole network
    train_loader: Any
    val_loader: Any
    criterion: nn.Module
    runtime: Runtime
    generator: torch.Generator  # data order; saved in `last` so a resumed epoch is not a replay
    set_size: Callable[[int], None]
    skipped: list[str]
    classes: list[str]


def _prepare_features(
    cfg: TrainConfig, backbone: Backbone, split: DatasetSplit, runtime: Runtime, progress: Progress
) -> _Job:
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
        torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch_size, generator=g,
        **_sampler_kwargs(cfg, y, g))  # fmt: skip
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(va.features, va.labels), batch_size=1024
    )
    cpu = Runtime(torch.device("cpu"), None)  # a Linear on a few MB of features: the CPU is fastest
    return _Job(backbone.model.head, train_loader, val_loader,
                _criterion(cfg, y, len(split.classes)), cpu, g, lambda size: None, skipped,
                split.classes)  # fmt: skip


def _prepare_images(
    cfg: TrainConfig, backbone: Backbone, split: DatasetSplit, runtime: Runtime, progress: Progress
) -> _Job:
    """finetune / partial: images decoded once into memory, augmented every epoch."""
    workers = default_workers() if cfg.workers is None else cfg.workers
    train_ds, val_ds, bad = build_datasets(split.train, split.val, backbone.spec, cfg.rotation,
                                           workers=workers + 1)  # fmt: skip
    skipped = _check_bad(cfg, bad)
    # decoded datasets augment small uint8 tensors: worker processes would cost more than they save
    workers = workers if isinstance(train_ds, ImageDataset) else 0
    g = torch.Generator().manual_seed(cfg.seed)
    labels = torch.tensor(list(train_ds.labels))
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.batch_size, num_workers=workers, generator=g,
        drop_last=len(train_ds) > cfg.batch_size, **_sampler_kwargs(cfg, labels, g))  # fmt: skip
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=cfg.batch_size,
                                             num_workers=workers)  # fmt: skip
    model = backbone.model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)

    def set_size(size: int) -> None:
        train_ds.transform = build_transforms(backbone.spec.with_size(size), True, cfg.rotation)

    return _Job(model, train_loader, val_loader, _criterion(cfg, labels, len(split.classes)),
                runtime, g, set_size, skipped, split.classes)  # fmt: skip


# ---------------------------------------------------------------- the loop


def _train_loop(
    job: _Job,
    plan: Plan,
    cfg: TrainConfig,
    backbone: Backbone,
    run_dir: Path,
    last: tuple[dict, dict] | None,
    progress: Progress,
    on_epoch: Callable | None,
) -> FitState:
    """Run the plan from its first unfinished epoch; one optimizer per stage."""
    state, stage, opt, sched = FitState(), None, None, None
    if last is not None:
        meta, tensors = last
        job.model.load_state_dict(checkpoint.prefixed(tensors, "model."))
        state = FitState(
            meta["epoch"],
            meta["history"],
            meta["best"],
            checkpoint.prefixed(tensors, "best.") or None,
            meta["bad_epochs"],
        )
        _set_rng(job.generator, meta["rng"], tensors)
        log.info("resuming %s after epoch %d of %d", run_dir, state.epoch, len(plan))
    _rewrite_csv(run_dir / "metrics.csv", state.history)

    def record(row: dict[str, Any], st: FitState) -> None:
        checkpoint.save_last(
            run_dir,
            model=job.model,
            optimizer=opt,
            scheduler=sched,
            stage=stage,
            fit_state=st,
            rng=_get_rng(job.generator),
        )
        _append_csv(run_dir / "metrics.csv", row)
        if on_epoch is not None:
            on_epoch(row)

    while state.epoch < len(plan) and not state.stopped:
        s, blocks, size = plan[state.epoch]
        if s != stage:
            stage = s
            apply_freezing(backbone, list(blocks))
            mult = cfg.backbone_lr_mult if cfg.warmup_epochs else 1.0
            groups = param_groups(backbone, cfg.lr, mult)
            opt = make_optimizer(groups, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
            n_stage = sum(1 for p in plan if p[0] == s)
            sched = make_scheduler(opt, cfg.schedule, n_stage, cfg.step_size, cfg.gamma)
            if last is not None and last[0]["stage"] == s:
                checkpoint.restore_optimizer(opt, sched, last[0], last[1])
        n = 1
        while state.epoch + n < len(plan) and plan[state.epoch + n][0::2] == (s, size):
            n += 1
        if size != backbone.spec.input_size or cfg.progressive:
            log.info("epochs %d-%d at %dpx", state.epoch + 1, state.epoch + n, size)
        job.set_size(size)
        state = fit(job.model, job.train_loader, job.val_loader, optimizer=opt, scheduler=sched,
                    criterion=job.criterion, runtime=job.runtime, epochs=n, state=state,
                    patience=cfg.patience, progress=progress, on_epoch=record,
                    classes=job.classes)  # fmt: skip
    return state


def _get_rng(g: torch.Generator) -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(), "generator": g.get_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
    }  # fmt: skip


def _set_rng(g: torch.Generator, saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    g.set_state(tensors["rng.generator"])
    random.setstate((saved["python"][0], tuple(saved["python"][1]), saved["python"][2]))
    n = saved["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), int(n[2]), int(n[3]), n[4]))


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops like Ctrl-C: after the current batch, keeping what is saved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _evaluate_test(backbone: Backbone, split: DatasetSplit, runtime: Runtime) -> dict[str, Any]:
    """The best model on test/, once: reported apart from the (selected-on) val accuracy."""
    from .predict import Classifier

    report = Classifier(backbone, split.classes, runtime).evaluate_samples(split.test)
    log.info("test accuracy %.4f on %d images", report["accuracy"], report["n"])
    return {k: report[k] for k in ("accuracy", "accuracy_ci95", "n", "per_class", "skipped")}


# ---------------------------------------------------------------- helpers


def _discover(cfg: TrainConfig) -> DatasetSplit:
    """The split, with train/val(/test) duplicates (same content) warned about or dropped."""
    split = discover(cfg.data_dir, cfg.val_fraction, cfg.seed)
    dups = find_duplicates(split)
    if dups:
        listing = "\n".join(f"  {a}  ==  {b}" for a, b in dups[:20])
        more = f"\n  ... and {len(dups) - 20} more" if len(dups) > 20 else ""
        if cfg.dedupe:
            drop = {b for _, b in dups}
            split.val = [s for s in split.val if s[0] not in drop]
            split.test = [s for s in split.test if s[0] not in drop]
            log.warning("--dedupe: dropped %d val/test image(s) that are also in train:\n%s%s",
                        len(drop), listing, more)  # fmt: skip
        else:
            log.warning(
                "%d val/test image(s) are identical to train images (validation scores "
                "will flatter); --dedupe drops them:\n%s%s",
                len(dups),
                listing,
                more,
            )
    return split


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
    weights = (1.0 / torch.bincount(labels).float())[labels]
    sampler = torch.utils.data.WeightedRandomSampler(weights, len(labels), generator=g)
    return {"sampler": sampler, "shuffle": False}


def _make_run_dir(cfg: TrainConfig, resuming: bool = False) -> Path:
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
    removed = clean_temp_files(run_dir)
    if removed:
        log.info("removed %d temp file(s) an interrupted write left in %s", removed, run_dir)
    if not resuming:  # a new run in an old folder must not resume or extend the old one
        for name in ("metrics.csv", checkpoint.LAST_WEIGHTS, checkpoint.LAST_META):
            (run_dir / name).unlink(missing_ok=True)
    return run_dir


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
    for key, value in row.items():
        if isinstance(value, dict):  # per-class values: one column each
            flat.update({f"{key}/{name}": v for name, v in value.items()})
    return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in flat.items()}


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    flat = _csv_row(row)
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(flat))
        if new:
            writer.writeheader()
        writer.writerow(flat)


def _rewrite_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.csv from the checkpoint's history: a row written after the last checkpoint (or
    lost before it) cannot survive a resume as a duplicate or a gap."""
    path.unlink(missing_ok=True)
    for row in history:
        _append_csv(path, row)
