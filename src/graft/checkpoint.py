"""Model files: `model.safetensors` + `model.json`, written atomically, loaded without pickle."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
from pathlib import Path
from typing import Any

import torch

from .backbones import Backbone, create_backbone
from .errors import CheckpointError, GraftError
from .runtime import atomic_path, atomic_write_text
from .transforms import PreprocessSpec

log = logging.getLogger(__name__)

FORMAT = "graft-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("graft", "torch", "torchvision", "timm", "safetensors", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def save_model(
    run_dir: str | Path, backbone: Backbone, classes: list[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write the weights, then the JSON that describes them; each write atomic.

    `extra` adds fields to model.json (strategy, best epoch and metrics, config...).
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    with atomic_path(run_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": backbone.name,
        "classes": list(classes),
        "preprocess": backbone.spec.to_dict(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        **(extra or {}),
    }
    atomic_write_text(run_dir / META_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    return run_dir / WEIGHTS_FILE


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """model.json, validated: the fields loading relies on exist and have the right types."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: {run_dir} is not a graft run folder (train one with graft train)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a graft model description (format != {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {meta.get('format_version')!r}; this graft reads "
            f"{FORMAT_VERSION}: upgrade graft"
        )
    classes = meta.get("classes")
    if not (
        isinstance(classes, list)
        and len(classes) >= 2
        and all(isinstance(c, str) and c for c in classes)
    ):
        raise CheckpointError(f"{path}: 'classes' must be a list of at least two names")
    unsafe = [c for c in classes if c in (".", "..") or any(ch in c for ch in "/\\\0")]
    if unsafe:
        raise CheckpointError(
            f"{path}: class name(s) {unsafe} cannot be folder names; the file is not graft's"
        )
    if not isinstance(meta.get("backbone"), str):
        raise CheckpointError(f"{path}: 'backbone' must be a backbone name (a string)")
    try:
        meta["preprocess"] = PreprocessSpec.from_dict(meta["preprocess"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: 'preprocess' is malformed ({exc!r})") from exc
    return meta


def load_model(run_dir: str | Path) -> tuple[Backbone, dict[str, Any]]:
    """Rebuild the trained network from a run folder alone: no training data, no pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_meta(run_dir)
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found; the run folder is incomplete")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is damaged or not a safetensors file: {exc}") from exc
    try:
        backbone = create_backbone(meta["backbone"], len(meta["classes"]), pretrained=False)
    except GraftError as exc:
        raise CheckpointError(f"{run_dir}/{META_FILE}: {exc}") from exc
    _check_state(backbone.model.state_dict(), state, weights, len(meta["classes"]))
    backbone.model.load_state_dict(state)
    backbone.spec = meta["preprocess"]
    return backbone, meta


def _check_state(
    expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], path: Path, num_classes: int
) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the backbone in model.json: {len(missing)} tensors missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for key, value in expected.items():
        if tuple(got[key].shape) != tuple(value.shape):
            hint = ""
            if key.startswith("head."):
                hint = f" (model.json lists {num_classes} classes; the weights have another count)"
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(got[key].shape)}, expected "
                f"{tuple(value.shape)}{hint}"
            )


# ---------------------------------------------------------------- the `last` checkpoint (resume)

LAST_WEIGHTS = "last.safetensors"
LAST_META = "last.json"


def save_last(
    run_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    stage: int,
    fit_state: Any,
    rng: dict[str, Any],
) -> None:
    """Everything needed to continue after the epoch just finished, without pickle: tensors
    (model, best weights, optimizer buffers, RNG states) in safetensors, the rest in JSON.
    Weights first, JSON second: the JSON names the epoch only once its tensors are on disk."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for k, v in (fit_state.best_state or {}).items():
        tensors[f"best.{k}"] = v
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                opt_scalars.setdefault(str(pid), {})[k] = v
    for name, value in rng.items():
        if torch.is_tensor(value):
            tensors[f"rng.{name}"] = value
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(Path(run_dir) / LAST_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        "format": FORMAT + "-last",
        "epoch": fit_state.epoch,
        "stage": stage,
        "history": fit_state.history,
        "best": fit_state.best,
        "bad_epochs": fit_state.bad_epochs,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "rng": {k: v for k, v in rng.items() if not torch.is_tensor(v)},
    }
    atomic_write_text(Path(run_dir) / LAST_META, json.dumps(meta) + "\n")


def load_last(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part, tensors) of the `last` checkpoint, or CheckpointError saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path, weights = Path(run_dir) / LAST_META, Path(run_dir) / LAST_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{run_dir} has no resumable checkpoint ({LAST_META} + {LAST_WEIGHTS}); "
            "it finished, or never completed an epoch"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(str(weights))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"the checkpoint in {run_dir} is damaged: {exc}") from exc
    if meta.get("format") != FORMAT + "-last" or not isinstance(meta.get("epoch"), int):
        raise CheckpointError(f"{meta_path} is not a graft checkpoint")
    return meta, tensors


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, scalars in meta["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
