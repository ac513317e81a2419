"""Pooled backbone features for the frozen extractor, computed once per image content.

Entries are keyed by the backbone's weights, its preprocessing and precision (the model key) and
by each file's content hash (viewcache.py), so an edited or added file is recomputed and nothing
stale is reused. The network that computes them has its BatchNorm folded into the convolutions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.constants import FOLD_PARITY, MAX_PIXELS
from ..core.runtime import Progress, Runtime, default_cache_dir, no_progress
from ..data.images import BadFile
from ..data.splits import Sample
from ..models.backbones import Backbone
from .runners import engine_runtime, frozen_runner
from .store import STORE_DTYPE, FeatureCache, cached_views

log = logging.getLogger(__name__)


def model_key(backbone: Backbone, runtime: Runtime, rotation: float = 0.0,
              trunk: Sequence[str] = ()) -> str:  # fmt: skip
    """Hash of everything that changes a feature: weights, preprocessing, precision, format, and
    the augmentation of the cached views (`rotation`). With `trunk` (the top blocks, which train),
    the key of the activations entering the first of them: only the weights below count."""
    h = hashlib.sha256()
    what = {"backbone": backbone.name, "spec": backbone.spec.to_dict(),
            "precision": runtime.precision, "v": 2}  # fmt: skip  # v2: BatchNorm folded
    if rotation:  # absent when 0, so caches made before rotation was keyed stay valid
        what["rotation"] = rotation
    if trunk:  # training views cropped from the image decoded at the eval resize side
        what["activations_of"] = trunk[0]
        what["views_from"] = backbone.spec.resize_size
    h.update(json.dumps(what, sort_keys=True).encode())
    top = tuple(f"{b}." for b in trunk)
    for name, tensor in backbone.model.features.state_dict().items():
        if top and name.startswith(top):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def fold_batchnorm(features: nn.Module, size: int) -> nn.Module:
    """A copy of a frozen network with every BatchNorm that directly follows a convolution folded
    into it (w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta), the BN's own
    activation kept. Same function in exact arithmetic; on lite0, 49 folds, 1.3-1.9x images/s on
    2 cores and features within 2e-6 of the stock network in fp32 (bench/fold_batchnorm.py).
    Conv->BN pairs are found by data flow (the BN's input is the conv's output), not by name."""
    net = copy.deepcopy(features).eval()
    produced: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}  # the tensor kept: ids not reused
    pairs: list[tuple[nn.Conv2d | None, nn.BatchNorm2d]] = []

    def after_conv(m, i, o):
        produced[id(o)] = (m, o)

    def after_bn(m, i, o):
        conv, _ = produced.get(id(i[0]), (None, None))
        pairs.append((conv if conv is not None and conv.out_channels == m.num_features else None,
                      m))  # fmt: skip

    hooks = [m.register_forward_hook(after_conv) for m in net.modules()
             if isinstance(m, nn.Conv2d)]  # fmt: skip
    hooks += [m.register_forward_hook(after_bn) for m in net.modules()
              if isinstance(m, nn.BatchNorm2d)]  # fmt: skip
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    produced.clear()
    feeds: dict[int, int] = {}
    for conv, _ in pairs:
        feeds[id(conv)] = feeds.get(id(conv), 0) + 1
    parent = {id(m): (p, n) for p in net.modules() for n, m in p.named_children()}
    for conv, bn in pairs:
        if conv is None or feeds[id(conv)] != 1 or bn.running_var is None:
            continue  # a BN after something else, or a conv feeding two BNs: left as it is
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight.detach(), shift * bn.weight.detach() + bn.bias.detach()
        with torch.no_grad():
            conv.weight.mul_(scale.view(-1, *[1] * (conv.weight.dim() - 1)))
            bias = shift if conv.bias is None else conv.bias.detach() * scale + shift
            conv.bias = nn.Parameter(bias.clone(), requires_grad=False)
        rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
        owner, name = parent[id(bn)]  # timm's BatchNormAct2d: keep its activation
        setattr(owner, name, nn.Sequential(*rest) if rest else nn.Identity())
    return net if _same_function(features, net, size) else copy.deepcopy(features).eval()


def _same_function(a: nn.Module, b: nn.Module, size: int) -> bool:
    """A guard for architectures where a folded conv's output also went elsewhere."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ya, yb = a.eval()(x).float(), b(x).float()
    same = bool(((ya - yb).abs().max() <= FOLD_PARITY * ya.abs().max().clamp_min(1e-6)).item())
    if not same:
        log.warning("folding BatchNorm changed this network's output: extracting unfolded")
    return same


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
    by a BatchNorm-folded copy of the network in `engine` (torch, onnxruntime: engines.py).
    `views` augmented views per sample (random crop, flip, `rotation`) are cached beside them."""
    runtime = engine_runtime(engine, runtime)
    key = model_key(backbone, runtime, rotation if views else 0.0)
    root = Path(cache_dir or default_cache_dir())
    cache = FeatureCache(root, key)

    def make_net() -> Callable[[torch.Tensor], torch.Tensor]:
        net = fold_batchnorm(backbone.model.features, backbone.spec.input_size)
        export_key = key  # the exported network does not depend on the views' rotation
        if engine == "onnxruntime" and views and rotation:
            export_key = model_key(backbone, runtime)
        return frozen_runner(net, backbone.spec.input_size, runtime, engine, root / "onnx",
                             export_key)  # fmt: skip

    found = cached_views(make_net, cache, backbone, samples, runtime, views,
                         batch_size=batch_size, workers=workers, progress=progress,
                         rotation=rotation, max_pixels=max_pixels)  # fmt: skip
    keep = sorted(found.entries)
    dim = backbone.model.num_features

    def stacked(part: int, empty: tuple[int, ...]) -> torch.Tensor:
        if not keep:
            return torch.zeros(empty)
        return torch.stack([found.entries[i][part].to(STORE_DTYPE) for i in keep]).float()

    return FeatureSet(
        features=stacked(0, (0, dim)),
        aug=stacked(1, (0, views, dim)),
        labels=torch.tensor([samples[i][1] for i in keep], dtype=torch.long),
        samples=[samples[i] for i in keep],
        bad=[BadFile(samples[i][0], r) for i, r in sorted(found.bad.items())],
        hits=found.hits,
        computed=len(keep) - found.hits,
    )
