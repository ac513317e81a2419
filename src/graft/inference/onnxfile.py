"""Reading an exported `.onnx` file: graft's metadata, validated, and an ONNX Runtime session.
Both the exporter (export.py) and the ONNX classifier (predict.py) use it; it imports neither.
onnx and onnxruntime come from the `graft[export]` extra and are imported here only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from ..core.decisions import (
    UNKNOWN_K_READ,
    UNKNOWN_THRESHOLD_READ,
    Policy,
    read_thresholds,
    valid_unknown_k,
    valid_unknown_threshold,
)
from ..core.errors import CheckpointError, GraftError
from ..data.discovery import class_names_problem
from ..data.transforms import PreprocessSpec
from ..models.modelfile import MAX_PIXELS_READ, TEMPERATURE_READ

FORMAT = "graft-onnx"


def require() -> None:
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if not importlib.util.find_spec(m)]
    if missing:
        raise GraftError(
            f"ONNX export and inference need {', '.join(missing)}: pip install 'graft[export]'"
        )


def session(path: str | Path):
    """An ONNX Runtime session on the CPU, or CheckpointError for a file that is not a model."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise GraftError("running an .onnx model needs onnxruntime: pip install 'graft[export]'")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: its warnings are not the user's business
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise CheckpointError(f"{path} is damaged or not an ONNX model: {exc}") from exc


def read_onnx_meta(path: str | Path) -> dict[str, Any]:
    """graft's metadata of an exported model, validated: classes, preprocessing, backbone."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found (export one with: graft export RUN)")
    if importlib.util.find_spec("onnx") is None:
        raise GraftError("reading an .onnx model needs onnx: pip install 'graft[export]'")
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CheckpointError(f"{path} is damaged or not an ONNX model: {exc}") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} was not exported by graft (no '{FORMAT}' metadata); "
            "export it with: graft export RUN"
        )
    try:
        classes = json.loads(props["classes"])
        preprocess = json.loads(props["preprocess"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: graft metadata is damaged ({exc!r})") from exc
    try:
        spec = PreprocessSpec.from_dict(preprocess)
    except ValueError as exc:
        raise CheckpointError(f"{path}: metadata {exc}") from exc
    problem = class_names_problem(classes)
    if problem:
        raise CheckpointError(f"{path}: metadata {problem}")
    max_pixels = props.get("max_pixels")
    try:
        max_pixels = int(max_pixels) if max_pixels else None
    except ValueError:
        max_pixels = -1
    if max_pixels is not None and not 1 <= max_pixels <= MAX_PIXELS_READ:
        raise CheckpointError(
            f"{path}: metadata max_pixels must be an integer from 1 to "
            f"{MAX_PIXELS_READ}, got {props.get('max_pixels')!r}"
        )
    try:
        temperature = float(props.get("temperature") or 1.0)
    except ValueError:
        temperature = -1.0
    low, high = TEMPERATURE_READ
    if not low <= temperature <= high:  # NaN fails too
        raise CheckpointError(
            f"{path}: metadata temperature must be a number from {low:g} to {high:g}, "
            f"got {props.get('temperature')!r}"
        )
    policy, k = _decision(path, props.get("decision"), classes)
    return {
        **props,
        "policy": policy,
        "unknown_k": k,
        "classes": classes,
        "preprocess": spec,
        "max_pixels": max_pixels,
        "temperature": temperature,
    }


def _decision(path: Path, text: str | None, classes: list[str]) -> tuple[Policy, int]:
    """The thresholds in the metadata (absent in files exported before: the arg-max)."""
    if not text:
        return Policy(tuple(classes)), 1
    try:
        d = json.loads(text)
        thresholds = read_thresholds(d.get("thresholds"), classes)
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: metadata decision is damaged ({exc})") from None
    t, k = d.get("unknown_threshold"), d.get("unknown_k")
    if t is not None and not valid_unknown_threshold(t):
        low, high = UNKNOWN_THRESHOLD_READ
        raise CheckpointError(
            f"{path}: metadata unknown_threshold must be from {low:g} to {high:g}, got {t!r}"
        )
    if k is not None and not valid_unknown_k(k):
        low, high = UNKNOWN_K_READ
        raise CheckpointError(f"{path}: metadata unknown_k must be from {low} to {high}, got {k!r}")
    return Policy(tuple(classes), thresholds, t), k or 1
