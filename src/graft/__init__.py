"""graft: teach a pretrained image network new classes from a small folder of labelled pictures.

>>> import graft
>>> run = graft.train("data/demo")  # doctest: +SKIP
>>> graft.load(run.run_dir).predict(["image.png"])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .core.errors import (
    BackboneError,
    CheckpointError,
    ConfigError,
    DatasetError,
    GraftError,
    ImageError,
)

# The public API, imported on first use (PEP 562): `graft --help` and a usage error need none of
# torch, and an `import graft` costs what the names used cost.
_LAZY = {
    "TrainConfig": ".core.config",
    "make_config": ".core.config",
    "discover": ".data.discovery",
    "verify": ".data.discovery",
    "load_image": ".data.images",
    "Classifier": ".inference.classifier",
    "OnnxClassifier": ".inference.classifier",
    "export": ".inference.export",
    "Backbone": ".models.backbones",
    "create_backbone": ".models.backbones",
    "list_backbones": ".models.backbones",
    "report": (".outputs.report", "build_report"),
    "Comparison": ".selection.compare",
    "compare": ".selection.compare",
    "apply_fixes": ".workflows.audit",
    "audit": ".workflows.audit",
    "set_targets": ".workflows.decisions",
    "predict_to_file": ".workflows.predict",
    "suggest": ".workflows.suggest",
    "Run": ".workflows.train",
    "train": ".workflows.train",
}

if TYPE_CHECKING:
    from .core.config import TrainConfig, make_config
    from .data.discovery import discover, verify
    from .data.images import load_image
    from .inference.classifier import Classifier, OnnxClassifier
    from .inference.export import export
    from .models.backbones import Backbone, create_backbone, list_backbones
    from .outputs.report import build_report as report
    from .selection.compare import Comparison, compare
    from .workflows.audit import apply_fixes, audit
    from .workflows.decisions import set_targets
    from .workflows.predict import predict_to_file
    from .workflows.suggest import suggest
    from .workflows.train import Run, train


def __getattr__(name: str):
    import importlib

    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'graft' has no attribute {name!r}")
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"


def load(run_dir, **kwargs) -> Classifier:
    """Load a trained classifier from a run folder, or an exported `.onnx` file."""
    from .inference.classifier import load_classifier

    return load_classifier(run_dir, **kwargs)


__all__ = [
    "apply_fixes",
    "audit",
    "Backbone",
    "BackboneError",
    "CheckpointError",
    "Classifier",
    "Comparison",
    "OnnxClassifier",
    "compare",
    "export",
    "ConfigError",
    "DatasetError",
    "GraftError",
    "ImageError",
    "Run",
    "TrainConfig",
    "create_backbone",
    "discover",
    "list_backbones",
    "load",
    "load_image",
    "make_config",
    "predict_to_file",
    "report",
    "set_targets",
    "suggest",
    "train",
    "verify",
]
