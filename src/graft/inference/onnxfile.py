"""Reading an exported `.onnx` file: graft's metadata, validated, and an ONNX Runtime session.
Both the exporter (export.py) and the ONNX classifier (predict.py) use it; it imports neither.
onnx and onnxruntime come from the `graft[export]` extra and are imported here only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError, GraftError
from ..data.transforms import PreprocessSpec

FORMAT = "graft-onnx"


def require() -> None:
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if not importlib.util.find_spec(m)]
    if missing:
        raise GraftError(f"ONNX export and inference need {', '.join(missing)}: "
                         "pip install 'graft[export]'")  # fmt: skip


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
        raise CheckpointError(f"{path} was not exported by graft (no '{FORMAT}' metadata); "
                              "export it with: graft export RUN")  # fmt: skip
    try:
        classes = json.loads(props["classes"])
        spec = PreprocessSpec.from_dict(json.loads(props["preprocess"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: graft metadata is damaged ({exc!r})") from exc
    if not (isinstance(classes, list) and len(classes) >= 2
            and all(isinstance(c, str) and c for c in classes)):  # fmt: skip
        raise CheckpointError(f"{path}: metadata 'classes' must be a list of at least two names")
    return {**props, "classes": classes, "preprocess": spec}
