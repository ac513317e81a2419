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
