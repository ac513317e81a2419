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
from ..core.errors import BackboneError
from ..core.runtime import Progress, Runtime, default_cache_dir, no_progress
from ..data.images import BadFile, file_digest
from ..data.splits import Sample
from ..models.backbones import Backbone
from .networks import fold_batchnorm
from .runners import engine_runtime, frozen_runner, onnxruntime_available, resolve_engine
from .store import STORE_DTYPE, OutputStore, output_key
from .views import cached_views

log = logging.getLogger(__name__)

# what `--engine auto` weighs: images/s of each engine, cold, and ONNX Runtime's one-time export
# (3,000 Fashion-MNIST PNGs, lite0, 2 cores: `python bench/extract_engines.py`); so ONNX Runtime
# pays from about 3,800 uncached images
EXTRACT_RATE = {"torch": 94.4, "onnxruntime": 100.9}
EXPORT_SECONDS = 2.6


def choose_engine(
    engine: str,
    backbone: Backbone,
    samples: Sequence[Sample],
    runtime: Runtime,
    precision: str = "auto",
    cache_dir: str | Path | None = None,
    views: int = 0,
    rotation: float = 0.0,
    distributed: bool = False,
    digests: dict[str, str] | None = None,
) -> tuple[str, str]:
    """The engine that extracts `samples`' features, and why. `auto`: the one that finishes
    sooner given what each engine's cache already holds (their keys differ: PyTorch's features
    on a CPU are bf16, ONNX Runtime's fp32), ONNX Runtime paying its one-time export unless it is
    cached; PyTorch on a GPU, under torchrun (every rank must agree), in a precision other than
    fp32, or when onnxruntime is not installed. A warm cache keeps the engine that filled it.
    The files' digests it computes are kept in `digests` ({path: sha256}) for the extraction to
    reuse (`extract_features(..., digests=)`), so no file is hashed twice.

    >>> choose_engine("auto", backbone, split.train, runtime)[0]  # doctest: +SKIP
    'onnxruntime'  # 10000 images to extract: about 102 s with ONNX Runtime, 106 s with PyTorch
    """
    if engine != "auto":
        return resolve_engine(engine, runtime, precision), "asked for"
    if runtime.device.type != "cpu":
        return "torch", f"a {runtime.device.type} device: PyTorch runs the network there"
    if distributed:
        return "torch", "torchrun: every process extracts with the same engine"
    if precision not in ("auto", "fp32"):
        return "torch", f"--precision {precision}: ONNX Runtime computes in fp32"
    if not onnxruntime_available():
        return "torch", "onnxruntime is not installed (pip install 'graft[export]')"
    root = Path(cache_dir or default_cache_dir())
    digests = {} if digests is None else digests
    for path, _ in samples:
        try:
            digests[path] = digests.get(path) or file_digest(path)
        except OSError:
            continue  # reported as a bad file by the extraction itself
    seconds, notes = {}, {}
    for name in ("torch", "onnxruntime"):
        key = output_key(backbone, engine_runtime(name, runtime), rotation if views else 0.0)
        store = OutputStore(root, key)
        missing = sum(not store.has(digests[p]) for p, _ in samples if p in digests)
        seconds[name] = missing * (1 + views) / EXTRACT_RATE[name]
        notes[name] = missing
        if name == "onnxruntime" and missing:
            export = root / "onnx" / f"{output_key(backbone, engine_runtime(name, runtime))}.onnx"
            seconds[name] += 0.0 if export.exists() else EXPORT_SECONDS
    if notes["torch"] == 0 or notes["onnxruntime"] == 0:
        name = "torch" if notes["torch"] == 0 else "onnxruntime"
        return name, f"every feature is in its cache already ({len(digests)} images)"
    name = min(seconds, key=seconds.get)
    return name, (
        f"{notes[name]} images to extract: about {seconds['onnxruntime']:.0f} s with ONNX "
        f"Runtime (its one-time export included), {seconds['torch']:.0f} s with PyTorch"
    )


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
    engine: str = "auto",
    digests: dict[str, str] | None = None,
) -> FeatureSet:
    """Pooled features of every sample, from the cache where possible, computed once otherwise
    by a BatchNorm-folded copy of the network in `engine` (torch, onnxruntime: runners.py; auto:
    `choose_engine`). `digests`: {path: sha256} computed already (by `choose_engine`).
    `views` augmented views per sample (random crop, flip, `rotation`) are cached beside them."""
    digests = {} if digests is None else digests
    if engine == "auto":  # a library caller; graft train chooses once for train and val
        engine, why = choose_engine(
            engine, backbone, samples, runtime, "auto", cache_dir, views, rotation, digests=digests
        )
        log.info("extracting with %s: %s", engine, why)
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
        known=digests,
    )
    keep, kept, labels = found.kept(samples)
    dim = backbone.model.num_features

    def stacked(part: int, empty: tuple[int, ...]) -> torch.Tensor:
        if not keep:
            return torch.zeros(empty)
        return torch.stack([found.entries[i][part].to(STORE_DTYPE) for i in keep]).float()

    features, aug = stacked(0, (0, dim)), stacked(1, (0, views, dim))
    _check_finite(backbone.name, features, aug, kept)
    return FeatureSet(
        features=features,
        aug=aug,
        labels=labels,
        samples=kept,
        bad=found.bad_files(samples),
        hits=found.hits,
        computed=len(keep) - found.hits,
    )


def _check_finite(
    name: str, features: torch.Tensor, aug: torch.Tensor, samples: Sequence[Sample]
) -> None:
    """Features that are not finite numbers (weights that overflow the cache's float16, or are
    damaged) would make every head fitted or trained on them NaN: refuse them, naming an image."""
    bad = ~torch.isfinite(features).all(1) | ~torch.isfinite(aug).flatten(1).all(1)
    if bad.any():
        first = samples[int(bad.nonzero()[0])][0]
        raise BackboneError(
            f"{name}'s features of {int(bad.sum())} of {len(samples)} images are not finite "
            f"numbers (NaN or infinity; the first: {first}): its weights overflow float16 or "
            "are damaged; pass other weights (--weights) or another --backbone"
        )
