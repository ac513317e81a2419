"""graft: teach a pretrained image network new classes from a small folder of labelled pictures.

>>> import graft
>>> run = graft.train("data/demo")  # doctest: +SKIP
>>> graft.load(run.run_dir).predict(["image.png"])  # doctest: +SKIP
"""

from __future__ import annotations

from .core.config import TrainConfig, make_config
from .core.errors import (
    BackboneError,
    CheckpointError,
    ConfigError,
    DatasetError,
    GraftError,
    ImageError,
)
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
