"""Freezing strategies by block name (extract, finetune, partial), optimizer parameter groups,
and the recipe as data: which blocks train, at which image size, in each epoch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

from torch import nn

from ..core.config import TrainConfig
from ..core.errors import BackboneError, did_you_mean
from .backbones import Backbone

log = logging.getLogger(__name__)


def trainable_blocks(
    backbone: Backbone, strategy: str, unfreeze: Sequence[str] = (), unfreeze_last: int = 0
) -> list[str]:
    """The backbone blocks a strategy trains (the head always trains)."""
    if strategy == "extract":
        return []
    if strategy == "finetune":
        return list(backbone.blocks)
    if unfreeze_last:
        if not 0 < unfreeze_last <= len(backbone.blocks):
            raise BackboneError(
                f"--unfreeze-last {unfreeze_last}: {backbone.name} has {len(backbone.blocks)} "
                "blocks"
            )
        return list(backbone.blocks[-unfreeze_last:])
    for name in unfreeze:
        if name not in backbone.blocks:
            raise BackboneError(
                f"{backbone.name} has no block {name!r}{did_you_mean(name, backbone.blocks)}; "
                f"its blocks: {', '.join(backbone.blocks)}"
            )
    return [b for b in backbone.blocks if b in set(unfreeze)]


def apply_freezing(backbone: Backbone, blocks: Sequence[str]) -> None:
    """Train exactly `blocks` plus the head (and inception's aux head); freeze everything else.

    Reversible: calling it again with other blocks re-enables them. Frozen BatchNorm layers are
    kept in eval mode by `GraftNet.train`.
    """
    net = backbone.model
    net.features.requires_grad_(False)
    for name in blocks:
        backbone.block(name).requires_grad_(True)
    net.head.requires_grad_(True)
    aux = net.aux_head()
    if aux is not None:
        aux.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def param_groups(backbone: Backbone, lr: float, backbone_lr_mult: float) -> list[dict]:
    """Head at `lr`, trainable backbone parameters at `lr * backbone_lr_mult`; frozen ones left
    out, so the optimizer holds no state for them."""
    head_ids = {id(p) for p in backbone.model.head.parameters()}
    aux = backbone.model.aux_head()
    if aux is not None:
        head_ids |= {id(p) for p in aux.parameters()}
    head, body = [], []
    for p in backbone.model.parameters():
        if p.requires_grad:
            (head if id(p) in head_ids else body).append(p)
    groups = [{"params": head, "lr": lr, "name": "head"}]
    if body:
        groups.append({"params": body, "lr": lr * backbone_lr_mult, "name": "backbone"})
    return groups


# ---------------------------------------------------------------- the recipe as data


class Epoch(NamedTuple):
    """One epoch of the plan `training.loop.fit` executes."""

    stage: int  # 0: the head alone (warm-up), 1: the chosen blocks too
    blocks: tuple[str, ...]  # backbone blocks that train in this epoch
    size: int  # image side


def epoch_plan(cfg: TrainConfig, blocks: Sequence[str], full: int) -> list[Epoch]:
    """Stage 0 trains the head alone for `warmup_epochs`, stage 1 the chosen blocks too; with
    `progressive`, the first half of each stage runs at ~70% image size."""
    if cfg.strategy == "extract":
        return [Epoch(1, (), full)] * cfg.epochs
    low = progressive_size(full) if cfg.progressive else full
    plan: list[Epoch] = []
    stages = [((), cfg.warmup_epochs), (tuple(blocks), cfg.epochs - cfg.warmup_epochs)]
    for stage, (stage_blocks, n) in enumerate(stages):
        n = max(0, n)
        n_low = n // 2 if low < full else 0
        plan += [Epoch(stage, stage_blocks, low)] * n_low
        plan += [Epoch(stage, stage_blocks, full)] * (n - n_low)
    return plan


def progressive_size(full: int) -> int:
    """About 70% of the input size, a multiple of 32 (224 -> 160): half the pixels per image.
    Opt-in (`--progressive`): on the demo it saved 7% of the wall time and cost 4 points of val
    accuracy (docs/PERFORMANCE.md)."""
    return max(32, round(full * 0.7 / 32) * 32)
