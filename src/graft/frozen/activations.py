"""Partial fine-tuning from cached trunk activations.

When only the last blocks train, the blocks below them (the trunk) are a fixed function of the
augmented image. Their output is computed once for K augmented views of each training image (the
views seeded by the file's content, as `--cache-views` is for extract) and once for each
validation image, stored like the pooled features (store.py: checksummed, keyed by the trunk's
weights, the preprocessing, the precision and the block the trunk ends at), and only the top
blocks and the head train on it, one cached view per image per epoch. Frozen BatchNorm stays in
eval mode and the top is the backbone's own modules, so this is the same training as running the
trunk live on those views (tests/frozen/test_activations.py), at a fraction of the forward cost.
Past a memory budget, activations are read back from the cache files every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.constants import MAX_PIXELS
from ..core.errors import GraftError
from ..core.runtime import Progress, Runtime, default_cache_dir, no_progress
from ..data.images import BadFile
from ..data.splits import Sample
from ..models.backbones import Backbone
from .networks import Cut
from .store import OutputStore, output_key
from .views import cached_views

log = logging.getLogger(__name__)


@dataclass
class ActivationSet:
    """Activations of the samples that loaded: (N, K, *shape) for training views, (N, *shape) for
    the eval view; in memory, or read back from the cache (checksum verified) per item."""

    cache: OutputStore
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
            raise GraftError(
                f"the cached activations of {self.samples[i][0]} changed or went "
                f"missing during training (in {self.cache.dir}); train again: they "
                "will be recomputed"
            )
        return entry[1][view] if self.views else entry[0]


def cached_activations(
    backbone: Backbone,
    split: Cut,
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
    key = output_key(backbone, runtime, rotation if views else 0.0, trunk=split.blocks)
    # training views and eval views apart: one image is trained on in one run (or fold) and
    # scored in another, and neither entry may replace the other
    key += "-views" if views else "-eval"
    cache = OutputStore(cache_dir or default_cache_dir(), key, dtype=None)
    found = cached_views(
        lambda: runtime.prepare(split.trunk),
        cache,
        backbone,
        samples,
        runtime,
        views,
        eval_view=not views,
        keep=in_memory,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        rotation=rotation,
        max_pixels=max_pixels,
        label="activations",
        views_side=backbone.spec.resize_size,
    )
    keep, kept, labels = found.kept(samples)
    memory = None
    if in_memory:
        part = 1 if views else 0
        memory = (
            torch.stack([found.entries[i][part].contiguous() for i in keep])
            if keep
            else torch.zeros(0, *([views] if views else []), *split.shape)
        )
    return ActivationSet(
        cache,
        [found.digests[i] for i in keep],
        labels,
        views,
        memory,
        kept,
        found.bad_files(samples),
        found.hits,
    )


def activation_bytes(split: Cut, runtime: Runtime, train: int, views: int, val: int) -> int:
    """Memory the activations of `train` images x `views` and `val` images take."""
    item = 2 if runtime.amp_dtype is not None else 4
    per = item * int(torch.tensor(split.shape).prod())
    return per * (train * views + val)


def view_choice(seed: int, epoch: int, n: int, views: int) -> torch.Tensor:
    """Which cached view of each image an epoch trains on: drawn from (seed, epoch) alone, so a
    resumed epoch draws what it drew the first time."""
    g = torch.Generator().manual_seed((seed + 1_000_003 * (epoch + 1)) % 2**63)
    return torch.randint(views, (n,), generator=g)


class ActivationDataset(torch.utils.data.Dataset):
    """(activation, label) items of an ActivationSet: the eval view, or for a set of training
    views, image i's view `view_choice(seed, epoch)[i]`; `set_epoch` each epoch (training.loop
    does, as for a DistributedSampler)."""

    def __init__(self, acts: ActivationSet, seed: int = 0):
        self.acts, self.seed = acts, seed
        self.labels = acts.labels.tolist()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        n, views = len(self.labels), self.acts.views
        self.choice = view_choice(self.seed, epoch, n, views).tolist() if views else [0] * n

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.acts.get(i, self.choice[i]), self.labels[i]


@dataclass(frozen=True)
class TrunkDecision:
    """Whether partial trains the top on cached trunk activations or runs the trunk live, and
    why: the run's model.json (`"trunk"`) and the comparison read it."""

    cached: bool
    reason: str

    def __str__(self) -> str:
        return ("cached activations: " if self.cached else "live every epoch: ") + self.reason
