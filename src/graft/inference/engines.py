"""Which engine runs a saved model over many images: PyTorch, or ONNX Runtime on its export.

On a CPU, ONNX Runtime runs the exported model several times faster than PyTorch runs the run
folder (5,000 small PNGs, 2 cores: 141.9 against 41.7 images/s, `python bench/predict.py`).
The export is made once per model (about 10 s for lite0: traced, BatchNorm in the graph,
checked against PyTorch on the run's val images, docs/PERFORMANCE.md) and cached under the
feature cache, keyed by the model files' content, so a retrained run never meets a stale one.
`auto` takes ONNX Runtime on a CPU when it is installed and the images pay for the export (or
it is cached already); PyTorch on a GPU, for a few images, or when the export fails (one
warning). The choice and its reason are logged.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..core.constants import ONNX_OPSET
from ..core.errors import CheckpointError
from ..core.runtime import default_cache_dir, resolve_runtime
from ..frozen.runners import onnxruntime_available, resolve_engine
from .classifier import Classifier, OnnxClassifier

log = logging.getLogger(__name__)

# the export (~10 s) pays once ONNX Runtime's gain per image adds up to it: 10 / (1/41.7 -
# 1/141.9) = 590 images (bench/predict.py, lite0, 2 cores)
AUTO_MIN_IMAGES = 600
MODEL_FILES = ("model.json", "model.safetensors", "reference.safetensors")


def load_for(
    path: str | Path,
    images: int,
    engine: str = "auto",
    device: str = "auto",
    cache_dir: str | Path | None = None,
    local_rank: int = 0,
) -> tuple[Classifier, str]:
    """A classifier for `images` images of the run folder (or .onnx file) `path`, in the engine
    asked or chosen, and why that one.

    >>> clf, why = load_for("runs/demo", images=5000)  # doctest: +SKIP
    >>> why
    'onnxruntime: a CPU, and 5000 images pay for the one-time export'
    """
    exported = Path(path).suffix.lower() == ".onnx"  # runs in ONNX Runtime on the CPU
    runtime = resolve_runtime("cpu" if exported else device, "fp32", local_rank=local_rank)
    if engine != "auto":  # an unknown engine, or onnxruntime off the CPU or not installed
        resolve_engine(engine, runtime)
    if exported:
        return OnnxClassifier(path), "onnxruntime: an exported file"

    def pytorch() -> Classifier:
        return Classifier.load(path, device=device, local_rank=local_rank)

    if engine == "torch" or not (Path(path) / "model.json").is_file():
        return pytorch(), "torch: asked for"  # or its error
    on_cpu = runtime.device.type == "cpu"
    target = _export_path(Path(path), cache_dir)
    why = "asked for" if engine == "onnxruntime" else ""
    if not why:
        why = _auto_reason(on_cpu, target.exists(), images)
        if why.startswith("torch"):
            return pytorch(), why
    try:
        if not target.exists():
            from .export import export

            target.parent.mkdir(parents=True, exist_ok=True)
            export(path, out=target)
        return OnnxClassifier(target), f"onnxruntime: {why}"
    except CheckpointError:
        raise  # the model itself is unusable: PyTorch would say the same
    except Exception as exc:  # the exporter and ONNX Runtime raise many types
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        log.warning("ONNX Runtime cannot run %s (%s); predicting with PyTorch", path, first)
        return pytorch(), f"torch: the export failed ({first})"


def _auto_reason(on_cpu: bool, cached: bool, images: int) -> str:
    if not on_cpu:
        return "torch: a GPU (PyTorch runs it there)"
    if not onnxruntime_available():
        return "torch: onnxruntime is not installed (pip install 'graft[export]')"
    if cached:
        return "a CPU, and this model's export is cached"
    if images < AUTO_MIN_IMAGES:
        return f"torch: {images} image(s) do not pay for the one-time export ({AUTO_MIN_IMAGES}+)"
    return f"a CPU, and {images} images pay for the one-time export"


def _export_path(run_dir: Path, cache_dir: str | Path | None) -> Path:
    """Where this model's export is cached: its files' content (and the opset) as the key."""
    h = hashlib.sha256(f"graft-export-{ONNX_OPSET}".encode())
    for name in MODEL_FILES:
        file = run_dir / name
        if file.is_file():
            h.update(name.encode())
            with open(file, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / "exports" / f"{h.hexdigest()[:32]}.onnx"
