"""The training loop: `train_one_epoch`, `evaluate`, `fit`. Plain functions, no event bus."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .metrics import classification_report, confusion_matrix
from .runtime import Runtime

log = logging.getLogger(__name__)

AUX_LOSS_WEIGHT = 0.4  # inception's auxiliary classifier, as in torchvision's reference recipe
Progress = Callable[[Iterable, str, int], Iterable]


def no_progress(it: Iterable, desc: str, total: int) -> Iterable:
    return it


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


def _to(x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    x = x.to(runtime.device, non_blocking=True)
    if x.dim() == 4 and runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    runtime: Runtime,
    progress: Progress = no_progress,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns mean loss and accuracy over the samples seen."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in progress(loader, "train", len(loader)):
        x, y = _to(x, runtime), y.to(runtime.device)
        with runtime.autocast():
            out = model(x)
            if isinstance(out, tuple):  # main and auxiliary logits
                logits = out[0]
                loss = criterion(logits, y) + AUX_LOSS_WEIGHT * criterion(out[1], y)
            else:
                logits = out
                loss = criterion(logits, y)
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
) -> EvalResult:
    """Loss, accuracy and every logit over `loader`, in eval mode."""
    model.eval()
    logits, targets = [], []
    for x, y in progress(loader, "val", len(loader)):
        with runtime.autocast():
            logits.append(model(_to(x, runtime)).float().cpu())
        targets.append(y)
    all_logits = torch.cat(logits) if logits else torch.empty(0, 0)
    all_targets = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
    loss = nn.functional.cross_entropy(all_logits, all_targets).item() if logits else 0.0
    acc = (all_logits.argmax(1) == all_targets).float().mean().item() if logits else 0.0
    return EvalResult(loss, acc, all_logits, all_targets)


def per_class_recall(ev: EvalResult, classes: Sequence[str]) -> dict[str, float]:
    cm = confusion_matrix(ev.targets.tolist(), ev.preds.tolist(), len(classes))
    return {c: m["recall"] for c, m in classification_report(cm, classes)["per_class"].items()}


@dataclass
class FitState:
    """What survives between `fit` calls (warm-up then unfreeze) and across a resume."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # the best epoch's row
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0  # epochs since the best, for early stopping
    stopped: str | None = None  # "interrupted" or "early stopping"

    def is_better(self, row: dict[str, Any]) -> bool:
        """Higher val accuracy wins; a tie goes to the lower val loss."""
        if self.best is None:
            return True
        return (row["val_acc"], -row["val_loss"]) > (self.best["val_acc"], -self.best["val_loss"])


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    criterion: nn.Module,
    runtime: Runtime,
    epochs: int,
    state: FitState | None = None,
    patience: int = 0,
    progress: Progress = no_progress,
    on_epoch: Callable[[dict[str, Any], FitState], None] | None = None,
    classes: Sequence[str] | None = None,
) -> FitState:
    """Train for `epochs` more epochs, keeping the best weights by val accuracy.

    With `classes`, each row also holds the per-class val recall (imbalanced data hides there).

    Ctrl-C stops after the current batch with the best weights so far in `state.best_state`.
    """
    state = state or FitState()
    scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype is torch.float16 else None
    for _ in range(epochs):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        try:
            tr = train_one_epoch(
                model, train_loader, optimizer, criterion, runtime, progress, scaler
            )
            ev = evaluate(model, val_loader, criterion, runtime, progress)
        except KeyboardInterrupt:
            state.stopped = "interrupted"
            log.warning(
                "interrupted during epoch %d: keeping the best weights so far", state.epoch + 1
            )
            break
        scheduler.step()
        state.epoch += 1
        row = {
            "epoch": state.epoch,
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
            "val_loss": ev.loss,
            "val_acc": ev.acc,
            "lr": lr,
            "seconds": time.perf_counter() - start,
        }
        if classes is not None:
            row["val_recall"] = per_class_recall(ev, classes)
        state.history.append(row)
        if state.is_better(row):
            state.best, state.bad_epochs = row, 0
            state.best_state = copy.deepcopy(model.state_dict())
        else:
            state.bad_epochs += 1
        if on_epoch is not None:
            on_epoch(row, state)
        if patience and state.bad_epochs >= patience:
            state.stopped = "early stopping"
            log.info("early stopping: no improvement for %d epochs", patience)
            break
    return state
