"""Pooled backbone features for the frozen extractor, computed once per image content.

Entries are keyed by the backbone's weights, its preprocessing and precision (store.output_key)
and by each file's content hash, so an edited or added file is recomputed and nothing stale is
reused. The network that computes them has its BatchNorm folded into the convolutions
(networks.py) and runs in PyTorch or ONNX Runtime (runners.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.constants import MAX_PIXELS
from ..core.runtime import Progress, Runtime, default_cache_dir, no_progress
from ..data.images import BadFile
from ..data.splits import Sample
from ..models.backbones import Backbone
from .networks import fold_batchnorm
from .runners import engine_runtime, frozen_runner
from .store import STORE_DTYPE, OutputStore, output_key
from .views import cached_views

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Features of the samples that loaded, in input order; `bad` lists the ones that did not."""

    features: torch.Tensor  # (N, D) float32, eval view
    aug: torch.Tensor  # (N, views, D) float32
    labels: torch.Tensor  # (N,)
    samples: list[Sample]
    bad: list[BadFile] = field(default_factory=list)
    hits: int = 0
    computed: int = 0


def extract_features(
    backbone: Backbone,
    samples: Sequence[Sample],
    runtime: Runtime,
    cache_dir: str | Path | None = None,
    views: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    progress: Progress = no_progress,
    rotation: float = 0.0,
    max_pixels: int = MAX_PIXELS,
    engine: str = "torch",
) -> FeatureSet:
    """Pooled features of every sample, from the cache where possible, computed once otherwise
    by a BatchNorm-folded copy of the network in `engine` (torch, onnxruntime: runners.py).
    `views` augmented views per sample (random crop, flip, `rotation`) are cached beside them."""
    runtime = engine_runtime(engine, runtime)
    key = output_key(backbone, runtime, rotation if views else 0.0)
    root = Path(cache_dir or default_cache_dir())
    cache = OutputStore(root, key)

    def make_net() -> Callable[[torch.Tensor], torch.Tensor]:
        net = fold_batchnorm(backbone.model.features, backbone.spec.input_size)
        export_key = key  # the exported network does not depend on the views' rotation
        if engine == "onnxruntime" and views and rotation:
            export_key = output_key(backbone, runtime)
        return frozen_runner(
            net, backbone.spec.input_size, runtime, engine, root / "onnx", export_key
        )

    found = cached_views(
        make_net,
        cache,
        backbone,
        samples,
        runtime,
        views,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        rotation=rotation,
        max_pixels=max_pixels,
    )
    keep, kept, labels = found.kept(samples)
    dim = backbone.model.num_features

    def stacked(part: int, empty: tuple[int, ...]) -> torch.Tensor:
        if not keep:
            return torch.zeros(empty)
        return torch.stack([found.entries[i][part].to(STORE_DTYPE) for i in keep]).float()

    return FeatureSet(
        features=stacked(0, (0, dim)),
        aug=stacked(1, (0, views, dim)),
        labels=labels,
        samples=kept,
        bad=found.bad_files(samples),
        hits=found.hits,
        computed=len(keep) - found.hits,
    )
