"""What trains on which data, per strategy: a `Job` (model, loaders, loss, runtime).

extract: pooled features computed once (cached, frozen/features.py), and the head alone trains on
them. finetune: images decoded once into memory and augmented every epoch (data/decoded.py).
partial: the same as finetune, or, when it pays, the top blocks train on cached activations of
the frozen trunk (frozen/activations.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.config import TrainConfig
from ..core.dist import Dist, all_gather, shard
from ..core.errors import ConfigError, DatasetError
from ..core.runtime import Progress, Runtime, default_cache_dir, loader_workers
from ..data.decoded import ImageDataset, build_datasets
from ..data.images import BadFile, format_bad_files
from ..data.splits import DatasetSplit
from ..data.transforms import build_transforms
from ..frozen.activations import (
    ActivationDataset,
    TrunkDecision,
    activation_bytes,
    cached_activations,
)
from ..frozen.features import choose_engine, extract_features
from ..frozen.networks import TopNet, cut_backbone
from ..frozen.store import OutputStore
from ..models.backbones import Backbone
from ..models.freezing import trainable_blocks

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Job:
    """What trains, on what: everything `loop.fit` needs besides the plan and the config.
    Built by keyword."""

    backbone: Backbone  # for freezing and parameter groups at each stage
    model: nn.Module  # what trains: the head on features (extract) or the whole network
    train_loader: Any
    val_loader: Any
    criterion: nn.Module
    runtime: Runtime
    generator: torch.Generator  # data order; saved in `last` so a resumed epoch is not a replay
    classes: list[str]
    set_size: Callable[[int], None] = lambda size: None  # train images at this side from now on
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (--skip-bad)
    stats: dict[str, Any] = field(default_factory=dict)  # facts for model.json
    dist: Dist = Dist()  # under torchrun: DDP, sharded train and val (finetune/partial)
    sampler: Any = None  # told the epoch (set_epoch): a DistributedSampler, or cached views
    trunk: TrunkDecision | None = None  # partial: cached activations or the trunk live, and why
    engine: tuple[str, str] | None = None  # extract: the extractor's engine and why
    # extract: the training images' (eval features, augmented views, labels, samples), from which
    # calibrate.py scores every image out of fold
    train_features: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list] | None = None


def prepare_job(
    cfg: TrainConfig,
    backbone: Backbone,
    split: DatasetSplit,
    runtime: Runtime,
    progress: Progress,
    d: Dist = Dist(),
) -> Job:
    """Decode (or look up) every image once, before the first epoch: bad files are known now."""
    if cfg.strategy == "extract":
        return _prepare_features(cfg, backbone, split, runtime, progress, d)
    if cfg.strategy == "partial":
        job, why = _prepare_cached(cfg, backbone, split, runtime, progress, d)
        if job is not None:
            return job
        job = _prepare_images(cfg, backbone, split, runtime, progress, d)
        job.trunk = TrunkDecision(cached=False, reason=why)
        return job
    return _prepare_images(cfg, backbone, split, runtime, progress, d)


def _prepare_features(
    cfg: TrainConfig,
    backbone: Backbone,
    split: DatasetSplit,
    runtime: Runtime,
    progress: Progress,
    d: Dist,
) -> Job:
    """extract: pooled features once (cached), then the head alone trains on them. Under
    torchrun each rank computes a disjoint share into the shared cache first; then every rank
    reads them all and trains the same head (a node whose cache is not shared computes what it
    misses itself)."""
    digests: dict[str, str] = {}  # hashed once: to choose the engine, then to look up
    engine, why = choose_engine(
        cfg.engine,
        backbone,
        [*split.train, *split.val],
        runtime,
        cfg.precision,
        cfg.cache_dir,
        cfg.cache_views,
        cfg.rotation,
        distributed=d.enabled,
        digests=digests,
    )
    if cfg.engine == "auto":
        log.info("extracting with %s: %s", engine, why)
    kw = dict(
        runtime=runtime,
        cache_dir=cfg.cache_dir,
        workers=cfg.workers,
        progress=progress,
        max_pixels=cfg.max_pixels,
        engine=engine,
        digests=digests,
    )
    stats: dict[str, Any] = {}
    if d.enabled:
        mine = extract_features(
            backbone, shard(split.train, d), views=cfg.cache_views, rotation=cfg.rotation, **kw
        ).computed
        mine += extract_features(backbone, shard(split.val, d), **kw).computed
        stats["features_computed_per_rank"] = all_gather(d, mine, "extracting features")
    tr = extract_features(backbone, split.train, views=cfg.cache_views, rotation=cfg.rotation, **kw)
    va = extract_features(backbone, split.val, **kw)
    skipped = check_bad(cfg, tr.bad + va.bad)
    log.info("features: %d from cache, %d computed", tr.hits + va.hits, tr.computed + va.computed)
    job = feature_job(
        cfg, backbone, (tr.features, tr.aug, tr.labels), (va.features, va.labels), split.classes
    )
    job.skipped, job.stats = skipped, stats
    job.train_features = (tr.features, tr.aug, tr.labels, tr.samples)
    job.engine = (engine, why)
    return job


def feature_job(
    cfg: TrainConfig,
    backbone: Backbone,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    classes: list[str],
) -> Job:
    """The head alone, trained on features: `train` is (eval features (N, D), augmented views
    (N, V, D), labels), `val` is (features, labels). Used by `graft train` and by `compare`'s
    folds, so a candidate is scored by the very training it stands for."""
    feats, aug, labels = train
    x = torch.cat([feats, aug.flatten(0, 1)])
    y = torch.cat([labels, labels.repeat_interleave(aug.shape[1])])
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=cfg.batch_size,
        generator=g,
        **_sampler_kwargs(cfg, y, g),
    )
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*val), batch_size=1024)
    cpu = Runtime(torch.device("cpu"), None)  # a Linear on a few MB of features: the CPU is fastest
    criterion = make_criterion(cfg, y, len(classes))
    return Job(
        backbone=backbone,
        model=backbone.model.head,
        train_loader=train_loader,
        val_loader=val_loader,
        criterion=criterion,
        runtime=cpu,
        generator=g,
        classes=classes,
    )


def _prepare_cached(
    cfg: TrainConfig,
    backbone: Backbone,
    split: DatasetSplit,
    runtime: Runtime,
    progress: Progress,
    d: Dist,
) -> tuple[Job | None, str]:
    """partial from cached trunk activations (frozen/activations.py), or (None, why not) when it
    does not apply or does not pay: then the trunk runs live."""
    views = cfg.cache_views
    blocks = trainable_blocks(backbone, cfg.strategy, cfg.unfreeze, cfg.unfreeze_last)
    why = why_trunk_live(cfg, d)
    cut = cut_backbone(backbone, blocks[0]) if why is None and blocks else None
    if why is None and cut is None:
        why = "the network is not a plain chain of blocks at the cut"
    in_memory = True
    if why is None:
        need = activation_bytes(cut, runtime, len(split.train), views, len(split.val))
        in_memory = need <= cfg.memory_gb * 2**30
        if not in_memory and not OutputStore(cfg.cache_dir or default_cache_dir(), "").writable():
            why = (
                f"{need / 1e9:.1f} GB of activations is over --memory-gb {cfg.memory_gb:g} "
                f"and the cache folder {cfg.cache_dir} cannot be written"
            )
    if why is not None:
        log.info("partial: the trunk runs live every epoch (%s)", why)
        return None, why
    kw = dict(
        cache_dir=cfg.cache_dir,
        in_memory=in_memory,
        workers=cfg.workers,
        progress=progress,
        max_pixels=cfg.max_pixels,
    )
    tr = cached_activations(backbone, cut, split.train, runtime, views, rotation=cfg.rotation, **kw)
    va = cached_activations(backbone, cut, split.val, runtime, **kw)
    skipped = check_bad(cfg, tr.bad + va.bad)
    log.info(
        "partial: %s trains on cached activations of the trunk (%d views per image, %s; "
        "%d from cache, %d computed)",
        "+".join(cut.blocks),
        views,
        "in memory" if in_memory else "read from the cache each epoch",
        tr.hits + va.hits,
        len(tr.samples) + len(va.samples) - tr.hits - va.hits,
    )
    train_ds = ActivationDataset(tr, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    labels = tr.labels
    train_loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        generator=g,
        drop_last=len(labels) > cfg.batch_size,
        **_sampler_kwargs(cfg, labels, g),
    )
    val_loader = torch.utils.data.DataLoader(ActivationDataset(va), batch_size=cfg.batch_size)
    model = runtime.prepare(TopNet(backbone.model, cut.top))
    criterion = make_criterion(cfg, labels, len(split.classes)).to(runtime.device)
    trunk = TrunkDecision(
        cached=True, reason=f"{views} views per image, blocks from {blocks[0]} on train"
    )
    job = Job(
        backbone=backbone,
        model=model,
        train_loader=train_loader,
        val_loader=val_loader,
        criterion=criterion,
        runtime=runtime,
        generator=g,
        classes=split.classes,
        skipped=skipped,
        dist=d,
        sampler=train_ds,
        trunk=trunk,
    )
    return job, ""


def why_trunk_live(cfg: TrainConfig, d: Dist = Dist()) -> str | None:
    """Why partial (resolved `cfg`) does not train from cached activations, as far as its
    settings tell, or None when they allow it (the cut and the memory are checked on the data)."""
    views = cfg.cache_views
    if not views:
        return "--cache-views 0"
    if d.enabled:
        return "under torchrun each process runs its share live"
    if cfg.progressive:
        return "--progressive changes the image size, and with it every activation"
    if views >= cfg.epochs:
        return (
            f"{views} cached views cost as many trunk passes as {cfg.epochs} live epochs; "
            "cache fewer views (--cache-views) for the speed-up"
        )
    return None


def _prepare_images(
    cfg: TrainConfig,
    backbone: Backbone,
    split: DatasetSplit,
    runtime: Runtime,
    progress: Progress,
    d: Dist,
) -> Job:
    """finetune / partial: images decoded once into memory, augmented every epoch. Under
    torchrun a DistributedSampler (seeded, padded to equal shares) splits each epoch and each
    rank scores its own share of val; --batch-size is per process."""
    train_ds, val_ds, bad = build_datasets(
        split.train,
        split.val,
        backbone.spec,
        cfg.rotation,
        cfg.workers + 1,
        int(cfg.memory_gb * 2**30),
        cfg.max_pixels,
    )
    skipped = check_bad(cfg, bad)
    # decoded datasets augment small uint8 tensors: worker processes would cost more than they save
    workers = cfg.workers if isinstance(train_ds, ImageDataset) else 0
    g = torch.Generator().manual_seed(cfg.seed)
    labels = torch.tensor(list(train_ds.labels))
    sampler = None
    order = _sampler_kwargs(cfg, labels, g)
    if d.enabled:
        if cfg.balance == "sampler":
            raise ConfigError(
                "--balance sampler does not combine with torchrun yet; use --balance weights"
            )
        sampler = torch.utils.data.DistributedSampler(
            train_ds, d.world, d.rank, shuffle=True, seed=cfg.seed
        )
        order = {"sampler": sampler, "shuffle": False}
        val_ds = torch.utils.data.Subset(val_ds, shard(list(range(len(val_ds))), d))
    per_rank = len(train_ds) // d.world
    train_loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        generator=g,
        drop_last=per_rank > cfg.batch_size,
        **order,
        **loader_workers(workers),
    )
    val_loader = torch.utils.data.DataLoader(
        val_ds, batch_size=cfg.batch_size, **loader_workers(workers)
    )

    def set_size(size: int) -> None:
        train_ds.transform = build_transforms(backbone.spec.with_size(size), True, cfg.rotation)

    criterion = make_criterion(cfg, labels, len(split.classes)).to(runtime.device)
    if d.enabled and d.is_main:
        glob = d.world * cfg.batch_size
        log.info(
            "%d processes x batch %d = global batch %d; --lr applies to that global batch "
            "as given (not rescaled)",
            d.world,
            cfg.batch_size,
            glob,
        )
    return Job(
        backbone=backbone,
        model=runtime.prepare(backbone.model),
        train_loader=train_loader,
        val_loader=val_loader,
        criterion=criterion,
        runtime=runtime,
        generator=g,
        classes=split.classes,
        set_size=set_size,
        skipped=skipped,
        dist=d,
        sampler=sampler,
    )


def check_bad(cfg: TrainConfig, bad: list[BadFile]) -> list[str]:
    """Unreadable files stop training with the list and the fix, unless skip_bad: the paths."""
    if bad and not cfg.skip_bad:
        raise DatasetError(
            f"{len(bad)} file(s) cannot be used:\n{format_bad_files(bad)}\n"
            "Fix or remove them, or pass --skip-bad to train without them "
            f"(graft verify {cfg.data_dir} lists them all)"
        )
    if bad:
        log.warning("skipping %d unreadable file(s):\n%s", len(bad), format_bad_files(bad))
    return [b.path for b in bad]


def make_criterion(cfg: TrainConfig, labels: torch.Tensor, num_classes: int) -> nn.Module:
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
