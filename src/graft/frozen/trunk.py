"""Partial fine-tuning from cached trunk activations.

When only the last blocks train, the blocks below them (the trunk) are a fixed function of the
augmented image. Their output is computed once for K augmented views of each training image (the
views seeded by the file's content, as `--cache-views` is for extract) and once for each
validation image, stored like the feature cache (viewcache.py: checksummed, keyed by the trunk's
weights, the preprocessing, the precision and the block the trunk ends at), and only the top
blocks and the head train on it, one cached view per image per epoch. Frozen BatchNorm stays in
eval mode and the top is the backbone's own modules, so this is the same training as running the
trunk live on those views (tests/test_activations.py), at a fraction of the forward cost.
Past a memory budget, activations are read back from the cache files every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.constants import FP32_PARITY, MAX_PIXELS
from ..core.errors import GraftError
from ..core.runtime import Progress, Runtime, default_cache_dir, no_progress
from ..data.images import BadFile
from ..data.splits import Sample
from ..models.backbones import Backbone, GraftNet
from .features import fold_batchnorm, model_key
from .store import FeatureCache, cached_views

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the trunk's hook once the activation is captured: the rest is not computed."""


class Trunk(nn.Module):
    """Image -> the input of block `first`: a copy of the frozen network, run up to that block."""

    def __init__(self, features: nn.Module, first: str):
        super().__init__()
        self.net = features
        self._out: torch.Tensor | None = None
        features.get_submodule(first).register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._out = args[0]
        raise _Stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            self.net(x)
        except _Stop:
            pass
        out, self._out = self._out, None
        if out is None:
            raise GraftError("the trunk ended without reaching its last block")
        return out


class Top:
    """Activation -> pooled features: the backbone's own blocks from the first trainable one on
    (shared, not copied: training them trains the backbone), then its pooling."""

    def __init__(self, blocks: Sequence[nn.Module], tail: Callable[[torch.Tensor], torch.Tensor]):
        self.blocks, self.tail = list(blocks), tail

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            a = block(a)
        return self.tail(a)


class TopNet(nn.Module):
    """What trains from cached activations: `top` then the head. Its state dict is the whole
    network's, so the best weights, checkpoints and resume are those of live training."""

    def __init__(self, net: GraftNet, top: Top):
        super().__init__()
        self.net, self.top = net, top

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.top(a))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.net.load_state_dict(state_dict, strict, assign)


def _tails(features: nn.Module) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """How the network pools after its last block: timm's forward_head, torchvision's avgpool +
    flatten + (emptied) classifier. Each is checked against the whole network before use."""
    out: list[Callable] = []
    if hasattr(features, "forward_head"):
        out.append(features.forward_head)
    pool = getattr(features, "avgpool", None)
    last = getattr(features, "fc", None) or getattr(features, "classifier", None)
    if isinstance(pool, nn.Module) and isinstance(last, nn.Module):
        out.append(nn.Sequential(pool, nn.Flatten(1), last))
    return out


@dataclass
class Split:
    """The frozen trunk (a BN-folded copy where that is exact) and the top that trains."""

    trunk: Trunk
    top: Top
    blocks: list[str]  # the top's block names, first trainable one first
    shape: tuple[int, ...]  # one activation's shape


def split_backbone(backbone: Backbone, first: str) -> Split | None:
    """Cut `backbone` before block `first`, or None when the network is not a chain there (a
    connection crossing the cut, an auxiliary head): top(trunk(x)) must equal features(x)."""
    net = backbone.model
    if net.has_aux or first not in backbone.blocks:
        return None
    names = backbone.blocks[backbone.blocks.index(first) :]
    blocks = [backbone.block(n) for n in names]
    size = backbone.spec.input_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            want = net.features(x).float()
            # folding a BN into its conv moves the BN's work before its input: never at the cut
            at_bn = isinstance(blocks[0], nn.modules.batchnorm._BatchNorm)
            for fold in (False,) if at_bn else (True, False):
                frozen = fold_batchnorm(net.features, size) if fold else _frozen_copy(net.features)
                trunk = Trunk(frozen, first)
                a = trunk(x)
                for tail in _tails(net.features):
                    got = Top(blocks, tail)(a).float()
                    if got.shape == want.shape and bool(
                        (got - want).abs().max() <= FP32_PARITY * want.abs().max().clamp_min(1e-6)
                    ):
                        return Split(trunk, Top(blocks, tail), names, tuple(a.shape[1:]))
    finally:
        net.train(was_training)
    return None


def _frozen_copy(features: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(features).eval().requires_grad_(False)


# ---------------------------------------------------------------- the cached sets


@dataclass
class ActivationSet:
    """Activations of the samples that loaded: (N, K, *shape) for training views, (N, *shape) for
    the eval view; in memory, or read back from the cache (checksum verified) per item."""

    cache: FeatureCache
    digests: list[str]
    labels: torch.Tensor
    views: int  # 0: the eval view only
    memory: torch.Tensor | None
    samples: list[Sample]
    bad: list[BadFile] = field(default_factory=list)
    hits: int = 0

    def get(self, i: int, view: int = 0) -> torch.Tensor:
        if self.memory is not None:
            return self.memory[i, view] if self.views else self.memory[i]
        entry = self.cache.get(self.digests[i], self.views, need_eval=not self.views)
        if entry is None:
            raise GraftError(f"the cached activations of {self.samples[i][0]} changed or went "
                             f"missing during training (in {self.cache.dir}); train again: they "
                             "will be recomputed")  # fmt: skip
        return entry[1][view] if self.views else entry[0]


def cached_activations(
    backbone: Backbone,
    split: Split,
    samples: Sequence[Sample],
    runtime: Runtime,
    views: int = 0,
    *,
    cache_dir: str | Path | None = None,
    in_memory: bool = True,
    batch_size: int = 64,
    workers: int = 0,
    progress: Progress = no_progress,
    rotation: float = 0.0,
    max_pixels: int = MAX_PIXELS,
) -> ActivationSet:
    """The trunk's output for `views` augmented views of each sample (or its eval view when
    `views` is 0), from the cache or computed once, kept in memory or (`in_memory=False`) left
    in the cache files."""
    key = model_key(backbone, runtime, rotation if views else 0.0, trunk=split.blocks)
    # training views and eval views apart: one image is trained on in one run (or fold) and
    # scored in another, and neither entry may replace the other
    key += "-views" if views else "-eval"
    cache = FeatureCache(cache_dir or default_cache_dir(), key, dtype=None)
    found = cached_views(lambda: runtime.prepare(split.trunk), cache, backbone, samples, runtime,
                         views, eval_view=not views, keep=in_memory, batch_size=batch_size,
                         workers=workers, progress=progress, rotation=rotation,
                         max_pixels=max_pixels, label="activations",
                         views_side=backbone.spec.resize_size)  # fmt: skip
    keep = sorted(found.entries)
    memory = None
    if in_memory:
        part = 1 if views else 0
        memory = (torch.stack([found.entries[i][part].contiguous() for i in keep]) if keep
                  else torch.zeros(0, *([views] if views else []), *split.shape))  # fmt: skip
    labels = torch.tensor([samples[i][1] for i in keep], dtype=torch.long)
    bad = [BadFile(samples[i][0], r) for i, r in sorted(found.bad.items())]
    return ActivationSet(cache, [found.digests[i] for i in keep], labels, views, memory,
                         [samples[i] for i in keep], bad, found.hits)  # fmt: skip


def activation_bytes(split: Split, runtime: Runtime, train: int, views: int, val: int) -> int:
    """Memory the activations of `train` images x `views` and `val` images take."""
    item = 2 if runtime.amp_dtype is not None else 4
    per = item * int(torch.tensor(split.shape).prod())
    return per * (train * views + val)


def view_choice(seed: int, epoch: int, n: int, views: int) -> torch.Tensor:
    """Which cached view of each image an epoch trains on: drawn from (seed, epoch) alone, so a
    resumed epoch draws what it drew the first time."""
    g = torch.Generator().manual_seed((seed + 1_000_003 * (epoch + 1)) % 2**63)
    return torch.randint(views, (n,), generator=g)


class ViewsDataset(torch.utils.data.Dataset):
    """Training items: image i's cached view `view_choice(seed, epoch)[i]`; `set_epoch` each
    epoch (engine.fit does, as for a DistributedSampler)."""

    def __init__(self, acts: ActivationSet, seed: int):
        self.acts, self.seed = acts, seed
        self.labels = acts.labels.tolist()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.choice = view_choice(self.seed, epoch, len(self.labels), self.acts.views).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.acts.get(i, self.choice[i]), self.labels[i]


class EvalDataset(torch.utils.data.Dataset):
    """Validation items: each image's cached eval-view activation."""

    def __init__(self, acts: ActivationSet):
        self.acts = acts
        self.labels = acts.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.acts.get(i), self.labels[i]
