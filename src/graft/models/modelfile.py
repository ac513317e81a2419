"""The model files: `model.safetensors` (the weights) + `model.json` (`ModelMeta`: what they are,
how they were trained and scored), written atomically and read without pickle. This module owns
the schema of model.json: every other module reads a saved model through `read_meta` and its
typed fields. A model file may come from elsewhere: every field is validated on reading.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.decisions import (
    UNKNOWN_K_READ,
    UNKNOWN_THRESHOLD_READ,
    Policy,
    read_thresholds,
    valid_unknown_k,
    valid_unknown_threshold,
)
from ..core.errors import CheckpointError, GraftError
from ..core.runfolder import MODEL_META, MODEL_WEIGHTS, REFERENCE, SCORES
from ..core.runtime import atomic_path, atomic_write_text
from ..data.discovery import class_names_problem
from ..data.transforms import PreprocessSpec
from .backbones import Backbone, create_backbone
from .heads import EXPONENTS, FLIP, set_feature_norm
from .weights import non_finite

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


@dataclass(frozen=True, kw_only=True)
class ModelMeta:
    """model.json: what the weights are (backbone, classes, preprocessing) and how they were
    trained and scored. Only the first three are required; the rest is None (or empty) where a
    file does not say. Nested records (best, val, test, config, selection) stay plain mappings:
    model.json keeps them as written, and the report and the card show them."""

    backbone: str
    classes: list[str]
    preprocess: PreprocessSpec
    strategy: str | None = None
    trainable_blocks: list[str] = field(default_factory=list)
    trainable_params: int | None = None
    total_params: int | None = None
    metric: str = "val_acc"  # what `best` ranks by, and in which direction
    mode: str = "max"
    best: dict[str, Any] | None = None  # the kept epoch's row of metrics.csv
    # how the probabilities are calibrated: {"method": "temperature", "temperature": T, ...} or
    # {"method": "none", "reason": ...}; absent in models saved before: the raw softmax
    calibration: dict[str, Any] | None = None
    # what the head reads (models/heads.py): "root4" (since stop 37) or "power"; absent in
    # models saved before stop 32, and in those whose head reads the features as they are
    feature_norm: str | None = None
    # test-time augmentation (models/heads.view_features): "flip"; absent in models saved
    # before, and in those that read each image once
    tta: str | None = None
    # how probabilities become decisions (core/decisions.py): {"unknown": {"method": "knn", "k",
    # "threshold", "references", ...}, "thresholds": {class: {kind, target, threshold}},
    # "chosen_on": ..., "val": the operating point on the val split}; absent: the arg-max
    decision: dict[str, Any] | None = None
    stopped: str | None = None  # early, interrupted, or None when it ran to the end
    val: dict[str, Any] | None = None  # the saved model scored on val as `graft evaluate` does
    test: dict[str, Any] | None = None
    precision: str | None = None
    wall_seconds: float | None = None
    data_dir: str | None = None
    layout: str | None = None
    labels: dict[str, Any] | None = None  # the labels table the classes came from, if any
    class_counts: dict[str, Any] | None = None
    skipped_files: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None  # the resolved TrainConfig
    world_size: int = 1
    trunk: str | None = None  # partial: cached activations or live, and why
    engine: dict[str, Any] | None = None  # extract: {"engine", "reason"} of the extractor
    selection: dict[str, Any] | None = None  # --auto: the choice and every candidate's score
    features_computed_per_rank: list[int] | None = None
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["preprocess"] = self.preprocess.to_dict()
        # keys a run has only sometimes are left out when it has not, as model.json always did
        return {k: v for k, v in d.items() if not (k in _SOMETIMES and v is None)}

    @property
    def temperature(self) -> float:
        """What the logits are divided by before the softmax (1.0: uncalibrated)."""
        return float((self.calibration or {}).get("temperature", 1.0))

    @property
    def unknown(self) -> dict[str, Any] | None:
        """The unknown score's settings ({"method": "knn", "k", "threshold", ...}), or None."""
        return (self.decision or {}).get("unknown")

    @property
    def policy(self) -> Policy:
        """Per-class thresholds and the unknown threshold, as model.json says (validated)."""
        d = self.decision or {}
        return Policy(
            tuple(self.classes),
            read_thresholds(d.get("thresholds"), self.classes),
            (self.unknown or {}).get("threshold"),
        )

    @property
    def max_pixels(self) -> int | None:
        """The decoded-pixel limit the model was trained with (config.max_pixels)."""
        return (self.config or {}).get("max_pixels")

    @classmethod
    def from_dict(cls, d: Any, where: str = "model.json") -> ModelMeta:
        """Every field checked: a model file received from elsewhere is untrusted input. A wrong
        field is a CheckpointError naming it; keys this graft does not know are ignored."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CheckpointError(
                f"{where} is not a graft model description (format != {FORMAT!r})"
            )
        if d.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{where} has format_version {d.get('format_version')!r}; this "
                f"graft reads {FORMAT_VERSION}: upgrade graft"
            )
        problem = class_names_problem(d.get("classes"))
        if problem:
            raise CheckpointError(f"{where}: {problem}; the file is not a usable graft model")
        try:
            spec = PreprocessSpec.from_dict(d.get("preprocess"))
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from exc
        values: dict[str, Any] = {"preprocess": spec}
        for f in dataclasses.fields(cls):
            if f.name == "preprocess" or f.name not in d:
                continue
            value = d[f.name]
            if not _fits(value, str(f.type)):
                raise CheckpointError(
                    f"{where}: '{f.name}' must be {f.type}, got {type(value).__name__}"
                )
            values[f.name] = value
        if "backbone" not in values:
            raise CheckpointError(f"{where}: 'backbone' must be a backbone name (a string)")
        t = (values.get("calibration") or {}).get("temperature", 1.0)
        low, high = TEMPERATURE_READ
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and low <= t <= high):
            raise CheckpointError(
                f"{where}: calibration.temperature must be a number from {low:g} to {high:g}, "
                f"got {t!r}"
            )
        if values.get("feature_norm") not in (None, *EXPONENTS):
            raise CheckpointError(
                f"{where}: feature_norm must be one of {', '.join(map(repr, EXPONENTS))} or "
                f"absent, got {values['feature_norm']!r}"
            )
        if values.get("tta") not in (None, FLIP):
            raise CheckpointError(f"{where}: tta must be {FLIP!r} or absent, got {values['tta']!r}")
        _check_decision(values.get("decision"), values["classes"], where)
        max_pixels = (values.get("config") or {}).get("max_pixels")
        if max_pixels is not None and not (
            isinstance(max_pixels, int) and 1 <= max_pixels <= MAX_PIXELS_READ
        ):
            raise CheckpointError(
                f"{where}: config.max_pixels must be an integer from 1 to "
                f"{MAX_PIXELS_READ}, got {max_pixels!r}"
            )
        return cls(**values)


_SOMETIMES = (
    "trunk",
    "selection",
    "features_computed_per_rank",
    "decision",
    "labels",
    "engine",
    "feature_norm",
    "tta",
)
MAX_REFERENCES_READ = 1_000_000  # reference features a model file may carry (10,000 are written)
# a temperature a model file may carry: far outside what a fit gives (core/calibration.T_RANGE),
# still finite and positive, so a tampered one cannot divide by zero or flip the ranking
TEMPERATURE_READ = (0.01, 100.0)
# a model may raise the decoded-pixel limit it was trained with, but not past what a machine can
# decode: 16 times Pillow's own refusal level (2.9 gigapixels, 8.6 GB of RGB)
MAX_PIXELS_READ = 16 * 178_956_970
_TYPES = {"str": str, "int": int, "float": (int, float), "dict": dict, "list": list}


def _check_decision(d: Any, classes: list[str], where: str) -> None:
    """decision: thresholds known classes' probabilities; the unknown score's k and threshold in
    range, so a tampered file cannot crash a prediction or flag everything silently."""
    if d is None:
        return
    try:
        read_thresholds(d.get("thresholds"), classes)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    unknown = d.get("unknown")
    if unknown is None:
        return
    k, t, n = (
        unknown.get(key) if isinstance(unknown, dict) else None
        for key in ("k", "threshold", "references")
    )
    if not valid_unknown_k(k):
        low, high = UNKNOWN_K_READ
        raise CheckpointError(
            f"{where}: decision.unknown.k must be a whole number from {low} to {high}, got {k!r}"
        )
    if not valid_unknown_threshold(t):
        low, high = UNKNOWN_THRESHOLD_READ
        raise CheckpointError(
            f"{where}: decision.unknown.threshold must be a number from {low:g} to {high:g}, "
            f"got {t!r}"
        )
    if not (isinstance(n, int) and not isinstance(n, bool) and k <= n <= MAX_REFERENCES_READ):
        raise CheckpointError(
            f"{where}: decision.unknown.references must be a whole number from k to "
            f"{MAX_REFERENCES_READ:,}, got {n!r}"
        )


def _fits(value: Any, annotation: str) -> bool:
    """`value` has the JSON type the field's annotation says ('int | None', 'dict[str, Any]')."""
    kinds = [a.strip().split("[")[0] for a in annotation.split("|")]
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return False  # no field is a bool; JSON's true is not a count
    return any(isinstance(value, _TYPES[k]) for k in kinds if k in _TYPES)


def save_model(
    run_dir: str | Path, backbone: Backbone, meta: ModelMeta, reference: torch.Tensor | None = None
) -> Path:
    """Write the weights (and `reference`, the training features the unknown score measures
    against), then the JSON that describes them (`meta`, stamped with the time and the
    versions); each write atomic."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    with atomic_path(run_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    if reference is not None:
        with atomic_path(run_dir / REFERENCE) as tmp:
            features = reference.detach().cpu().half().contiguous()
            save_file({"features": features}, str(tmp), metadata={"format": FORMAT})
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_meta(run_dir, dataclasses.replace(meta, created=now, versions=versions()))
    return run_dir / WEIGHTS_FILE


def write_meta(run_dir: str | Path, meta: ModelMeta) -> None:
    """model.json, atomically: `save_model` writes it after the weights; a change of decisions
    (graft thresholds) rewrites it alone."""
    text = json.dumps(meta.to_dict(), indent=2, default=str) + "\n"
    atomic_write_text(Path(run_dir) / META_FILE, text)


def read_meta(run_dir: str | Path) -> ModelMeta:
    """model.json, every field validated."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: {run_dir} is not a graft run folder (train one with graft train)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    return ModelMeta.from_dict(data, str(path))


def load_model(run_dir: str | Path) -> tuple[Backbone, ModelMeta]:
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
        backbone = create_backbone(meta.backbone, len(meta.classes), pretrained=False)
        set_feature_norm(backbone, meta.feature_norm)
    except GraftError as exc:
        raise CheckpointError(f"{run_dir}/{META_FILE}: {exc}") from exc
    _check_state(backbone.model.state_dict(), state, weights, len(meta.classes))
    backbone.model.load_state_dict(state)
    return dataclasses.replace(backbone, spec=meta.preprocess), meta


def load_reference(run_dir: str | Path, meta: ModelMeta, dims: int) -> torch.Tensor | None:
    """The training features of the unknown score (N, dims), float32, or None for a model
    without one. Checked against model.json: a file from elsewhere is untrusted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    unknown = meta.unknown
    if unknown is None:
        return None
    path = Path(run_dir) / REFERENCE
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: model.json has an unknown score, which needs it; the run folder "
            "is incomplete"
        )
    try:
        features = load_file(str(path)).get("features")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged or not a safetensors file: {exc}") from exc
    shape = (unknown["references"], dims)
    if features is None or tuple(features.shape) != shape:
        got = None if features is None else tuple(features.shape)
        raise CheckpointError(f"{path}: 'features' must have shape {shape}, got {got}")
    features = features.float()
    if not torch.isfinite(features).all():
        raise CheckpointError(f"{path}: 'features' holds values that are not finite numbers")
    return torch.nn.functional.normalize(features, dim=1)


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
    bad = non_finite({key: got[key] for key in expected})
    if bad:
        raise CheckpointError(
            f"{path}: tensor {bad[0]} holds values that are not finite numbers (NaN or "
            "infinity): the model would give no usable probabilities; train it again"
        )


def save_scores(run_dir: str | Path, scores: dict[str, torch.Tensor]) -> None:
    """The held-out and val scores a run keeps (run_dir/scores.safetensors), atomically."""
    from safetensors.torch import save_file

    with atomic_path(Path(run_dir) / SCORES) as tmp:
        save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp))


def read_scores(run_dir: Path, num_classes: int) -> dict[str, torch.Tensor]:
    """scores.safetensors (`save_scores`), checked against the model: a run folder from
    elsewhere is untrusted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = run_dir / SCORES
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: this run kept no held-out scores (trained by an older graft); "
            "train it again with --target"
        )
    try:
        s = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged or not a safetensors file: {exc}") from exc
    for probs, labels in (("held_out_probs", "held_out_labels"), ("val_probs", "val_labels")):
        p, y = s.get(probs), s.get(labels)
        ok = (
            p is not None
            and y is not None
            and p.dim() == 2
            and p.shape[1] == num_classes
            and y.shape == (len(p),)
            and torch.isfinite(p).all()
            and (len(y) == 0 or 0 <= int(y.min()) <= int(y.max()) < num_classes)
        )
        if not ok:
            raise CheckpointError(f"{path}: '{probs}' and '{labels}' do not fit the model")
    u = s.get("val_unknown")
    if u is not None and u.shape != s["val_labels"].shape:
        raise CheckpointError(f"{path}: 'val_unknown' does not fit 'val_labels'")
    return s
