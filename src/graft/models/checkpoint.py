"""Model files and the resume point: written atomically, loaded without pickle.

`model.safetensors` + `model.json` are the trained classifier; `last.safetensors` + `last.json`
are everything needed to continue a run after its last finished epoch (`save_last`,
`restore_last`): this module is the only one that knows either format.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import platform
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import CheckpointError, GraftError
from ..core.runfolder import LAST_META, LAST_WEIGHTS, MODEL_META, MODEL_WEIGHTS
from ..core.runtime import atomic_path, atomic_write_text
from ..data.transforms import PreprocessSpec
from .backbones import Backbone, create_backbone

log = logging.getLogger(__name__)

FORMAT = "graft-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = MODEL_WEIGHTS
META_FILE = MODEL_META


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
    return dataclasses.replace(backbone, spec=meta["preprocess"]), meta


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


def save_last(
    run_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    stage: int,
    state: Any,
    generator: torch.Generator,
    world: int = 1,
) -> None:
    """Everything needed to continue after the epoch just finished, without pickle: tensors
    (model, best weights, optimizer buffers, RNG states) in safetensors, the rest in JSON.
    `state` is the loop's FitState. Weights first, JSON second: the JSON names the epoch only
    once its tensors are on disk."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for k, v in (state.best_state or {}).items():
        tensors[f"best.{k}"] = v
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                opt_scalars.setdefault(str(pid), {})[k] = v
    rng = _get_rng(generator)
    for name, value in rng.items():
        if torch.is_tensor(value):
            tensors[f"rng.{name}"] = value
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(Path(run_dir) / LAST_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        "format": FORMAT + "-last",
        "epoch": state.epoch,
        "stage": stage,
        "history": state.history,
        "best": state.best,
        "bad_epochs": state.bad_epochs,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {k: v for k, v in rng.items() if not torch.is_tensor(v)},
        "world_size": world,  # torchrun processes: a resume must use as many
    }
    atomic_write_text(Path(run_dir) / LAST_META, json.dumps(meta) + "\n")


@dataclass
class Resume:
    """A run's `last` checkpoint, read and checked: where training stopped and how to go on."""

    epoch: int  # epochs completed
    stage: int
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_state: dict[str, torch.Tensor] | None
    bad_epochs: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def restore(self, model: torch.nn.Module, generator: torch.Generator) -> None:
        """The model's weights and every random state (torch, python, numpy, data order)."""
        model.load_state_dict(prefixed(self.tensors, "model."))
        torch.set_rng_state(self.tensors["rng.torch"])
        generator.set_state(self.tensors["rng.generator"])
        saved = self.meta["rng"]
        random.setstate((saved["python"][0], tuple(saved["python"][1]), saved["python"][2]))
        n = saved["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), int(n[2]), int(n[3]), n[4]))

    def restore_optimizer(
        self, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any = None
    ) -> None:
        """Optimizer buffers, scheduler position and AMP loss scale of the stage in progress."""
        state: dict[int, dict[str, Any]] = {}
        for key, value in self.tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for pid, scalars in self.meta["optimizer"]["scalars"].items():
            state.setdefault(int(pid), {}).update(scalars)
        optimizer.load_state_dict(
            {"state": state, "param_groups": self.meta["optimizer"]["param_groups"]}
        )
        scheduler.load_state_dict({**scheduler.state_dict(), **self.meta["scheduler"]})
        if scaler is not None and self.meta.get("scaler"):
            scaler.load_state_dict(self.meta["scaler"])


def restore_last(run_dir: str | Path) -> Resume:
    """The `last` checkpoint of `run_dir`, or CheckpointError saying what is wrong."""
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
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT + "-last"
        or not isinstance(meta.get("epoch"), int)
    ):
        raise CheckpointError(f"{meta_path} is not a graft checkpoint")
    best_state = prefixed(tensors, "best.") or None
    return Resume(meta["epoch"], meta["stage"], meta["history"], meta["best"], best_state,
                  meta["bad_epochs"], meta, tensors)  # fmt: skip


def discard_last(run_dir: str | Path) -> None:
    """A finished run needs no resume point."""
    for name in (LAST_WEIGHTS, LAST_META):
        (Path(run_dir) / name).unlink(missing_ok=True)


def _get_rng(g: torch.Generator) -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(), "generator": g.get_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
    }  # fmt: skip


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
