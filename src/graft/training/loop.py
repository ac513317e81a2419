"""The training loop: `fit` runs an epoch plan with `train_one_epoch` and `evaluate`.

One `for epoch` loop over the plan (freezing.Epoch: stage, trainable blocks, image size): a new
stage gets a new optimizer, a new size a new train transform, and every finished epoch is saved
as the resume point. Plain functions, no callbacks but `on_epoch` for the caller to show a row.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import TrainConfig
from ..core.dist import Dist, all_gather, collective_errors, sync_buffers, wrap
from ..core.errors import GraftError
from ..core.metrics import classification_report, confusion_matrix
from ..core.runfolder import append_metrics, rewrite_metrics
from ..core.runtime import Progress, Runtime, loader_errors, no_progress, signals_held
from ..models.freezing import Epoch, apply_freezing, param_groups
from .checkpoint import Resume, save_last
from .jobs import Job

log = logging.getLogger(__name__)

AUX_LOSS_WEIGHT = 0.4  # inception's auxiliary classifier, as in torchvision's reference recipe


class DivergedError(GraftError):
    """The training loss became nan or inf: nothing from this run is worth keeping as best."""


def fit(
    job: Job,
    plan: Sequence[Epoch],
    cfg: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    resume: Resume | None = None,
    progress: Progress = no_progress,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    world: int = 1,
) -> FitState:
    """Train `job` through `plan` from its first unfinished epoch, keeping the best weights by val
    accuracy. With `run_dir`, each epoch appends to metrics.csv and saves the resume point.
    Ctrl-C (or SIGTERM) stops after the current batch with the best weights so far. Under
    torchrun (`job.dist`) the model trains in DDP on this rank's share of each epoch, and every
    rank sees the same val figures, so best epoch and early stopping agree everywhere."""
    state = FitState.start(resume, job, cfg.keep)
    if run_dir is not None:
        rewrite_metrics(run_dir, state.history)
    scaler = torch.amp.GradScaler("cuda") if job.runtime.amp_dtype is torch.float16 else None
    stage = size = optimizer = scheduler = trainer = None
    for epoch in plan[state.epoch :]:
        try:  # Ctrl-C or SIGTERM anywhere in the epoch: stop, keeping the best weights so far
            if epoch.stage != stage:
                stage = epoch.stage
                optimizer, scheduler = start_stage(job, plan, epoch, cfg)
                trainer = wrap(job.dist, job.model, job.runtime.device)  # DDP under torchrun
                if resume is not None and resume.stage == stage:
                    resume.restore_optimizer(optimizer, scheduler, scaler)
            if job.sampler is not None:
                job.sampler.set_epoch(state.epoch)  # a new, seeded order of the shards each epoch
            if epoch.size != size:
                size = epoch.size
                job.set_size(size)
                if cfg.progressive:
                    log.info("epoch %d on at %dpx", state.epoch + 1, size)
            start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            with loader_errors(), collective_errors("training"):  # a dead worker or rank
                tr = train_one_epoch(
                    trainer,
                    job.train_loader,
                    optimizer,
                    job.criterion,
                    job.runtime,
                    progress,
                    scaler,
                    job.dist,
                )
                sync_buffers(job.dist, job.model)  # validate (and save) rank 0's model
                ev = evaluate(
                    job.model, job.val_loader, job.criterion, job.runtime, progress, job.dist
                )
            with signals_held():  # the epoch's state, resume point and row: all or none
                scheduler.step()
                row = state.record(job, tr, ev, lr, time.perf_counter() - start)
                if run_dir is not None:
                    save_last(
                        run_dir,
                        model=job.model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        scaler=scaler,
                        stage=stage,
                        state=state,
                        generator=job.generator,
                        world=world,
                    )
                    append_metrics(run_dir, row)
            if on_epoch is not None:
                on_epoch(row)
        except KeyboardInterrupt:
            state.stopped = "interrupted"
            log.warning("interrupted in epoch %d: keeping the best weights so far", state.epoch + 1)
            break
        if cfg.patience and state.bad_epochs >= cfg.patience:
            state.stopped = "early stopping"
            log.info("early stopping: no improvement for %d epochs", cfg.patience)
            break
    return state


def start_stage(
    job: Job, plan: Sequence[Epoch], epoch: Epoch, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, Any]:
    """Freeze all but the stage's blocks; a fresh optimizer and scheduler for the stage (the
    backbone at `lr * backbone_lr_mult` after a warm-up, the head at `lr`)."""
    apply_freezing(job.backbone, list(epoch.blocks))
    mult = cfg.backbone_lr_mult if cfg.warmup_epochs else 1.0
    groups = param_groups(job.backbone, cfg.lr, mult)
    optimizer = make_optimizer(groups, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    n_epochs = sum(1 for e in plan if e.stage == epoch.stage)
    return optimizer, make_scheduler(optimizer, cfg.schedule, n_epochs, cfg.step_size, cfg.gamma)


def make_optimizer(
    groups: list[dict], name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int, step_size: int, gamma: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    runtime: Runtime,
    progress: Progress = no_progress,
    scaler: torch.amp.GradScaler | None = None,
    d: Dist = Dist(),
) -> dict[str, float]:
    """One pass over `loader`; returns mean loss and accuracy over the samples seen (by every
    rank, under torchrun)."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in progress(loader, "train", len(loader)):
        x, y = runtime.batch(x), runtime.batch(y)
        with runtime.autocast():
            out = model(x)
            if isinstance(out, tuple):  # main and auxiliary logits
                logits = out[0]
                loss = criterion(logits, y) + AUX_LOSS_WEIGHT * criterion(out[1], y)
            else:
                logits = out
                loss = criterion(logits, y)
        if not math.isfinite(loss.item()):
            raise DivergedError(
                f"the training loss became {loss.item()} (diverged); nothing "
                "was saved as best: lower --lr and train again"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = y.numel()
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
    if d.enabled:
        parts = all_gather(d, (total_loss, correct, seen), "training")
        total_loss, correct, seen = (sum(p[i] for p in parts) for i in range(3))
    return {"loss": total_loss / max(1, seen), "acc": correct / max(1, seen)}


@dataclass
class EvalResult:
    loss: float
    acc: float
    logits: torch.Tensor  # (N, C) float32 on the CPU
    targets: torch.Tensor  # (N,)

    @property
    def preds(self) -> torch.Tensor:
        return self.logits.argmax(1)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    runtime: Runtime,
    progress: Progress = no_progress,
    d: Dist = Dist(),
) -> EvalResult:
    """Loss (by `criterion`: label smoothing and class weights count), accuracy and every logit
    over `loader`, in eval mode. Under torchrun each rank scores its share and the logits of all
    are gathered, so every rank computes the same figures."""
    model.eval()
    logits, targets = [], []
    for x, y in progress(loader, "val", len(loader)):
        with runtime.autocast():
            logits.append(model(runtime.batch(x)).float().cpu())
        targets.append(y)
    if d.enabled:
        local = (torch.cat(logits), torch.cat(targets)) if logits else None
        parts = [p for p in all_gather(d, local, "validating") if p is not None]
        logits, targets = [p[0] for p in parts], [p[1] for p in parts]
    if not logits:
        return EvalResult(0.0, 0.0, torch.empty(0, 0), torch.empty(0, dtype=torch.long))
    all_logits, all_targets = torch.cat(logits), torch.cat(targets)
    loss = copy.deepcopy(criterion).cpu()(all_logits, all_targets).item()
    acc = (all_logits.argmax(1) == all_targets).float().mean().item()
    return EvalResult(loss, acc, all_logits, all_targets)


def per_class_recall(ev: EvalResult, classes: Sequence[str]) -> dict[str, float]:
    cm = confusion_matrix(ev.targets.tolist(), ev.preds.tolist(), len(classes))
    return {c: m["recall"] for c, m in classification_report(cm, classes)["per_class"].items()}


@dataclass
class FitState:
    """Where the loop stands: survives stage and size changes, and a resume."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # the best epoch's row
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0  # epochs since the best, for early stopping
    stopped: str | None = None  # "interrupted" or "early stopping"
    keep: str = "best"  # "last": every epoch replaces the kept one; val only measures

    @classmethod
    def start(cls, resume: Resume | None, job: Job, keep: str = "best") -> FitState:
        """A fresh state, or the resumed one with the model's weights and RNGs restored."""
        if resume is None:
            return cls(keep=keep)
        resume.restore(job.model, job.generator)
        log.info("resuming after epoch %d", resume.epoch)
        return cls(
            resume.epoch,
            resume.history,
            resume.best,
            resume.best_state,
            resume.bad_epochs,
            keep=keep,
        )

    def is_better(self, row: dict[str, Any]) -> bool:
        """Higher val accuracy wins; a tie goes to the lower val loss. With keep="last" the
        newest epoch always does."""
        if self.best is None or self.keep == "last":
            return True
        return (row["val_acc"], -row["val_loss"]) > (self.best["val_acc"], -self.best["val_loss"])

    def record(
        self, job: Job, tr: dict[str, float], ev: EvalResult, lr: float, seconds: float
    ) -> dict[str, Any]:
        """The epoch's row (with per-class val recall: imbalanced data hides there); the best
        weights kept when it is the best so far."""
        self.epoch += 1
        row = {
            "epoch": self.epoch,
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
            "val_loss": ev.loss,
            "val_acc": ev.acc,
            "lr": lr,
            "seconds": seconds,
            "val_recall": per_class_recall(ev, job.classes),
        }
        self.history.append(row)
        if self.is_better(row):
            self.best, self.bad_epochs = row, 0
            self.best_state = copy.deepcopy(job.model.state_dict())
        else:
            self.bad_epochs += 1
        return row
