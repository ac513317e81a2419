"""Each image's views through a frozen network, computed once: the lookup-and-compute loop.

`cached_views` runs a network over the eval view and K augmented views of each file (the views
seeded by the file's content, so they are the same whatever the order or the worker), reading
what the store (store.py) already holds and storing what it computes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.constants import MAX_PIXELS
from ..core.errors import ImageError
from ..core.runtime import Progress, Runtime, loader_errors, loader_workers, no_progress
from ..data.images import BadFile, file_digest, load_image, shrink_to_side
from ..data.splits import Sample
from ..data.transforms import build_transforms
from ..models.backbones import Backbone
from .store import OutputStore

log = logging.getLogger(__name__)


class _ImageViews(torch.utils.data.Dataset):
    """Eval view plus `views` augmented views of each file; augmentations seeded by content hash,
    so the same file always gets the same cached views whatever the worker order. Views crop
    from the full image, or (`views_side`) from one whose shorter side was decoded to that size,
    as finetune and live partial crop theirs (data/decoded.py): a JPEG photo then decodes at 1/8."""

    def __init__(
        self,
        paths: Sequence[str],
        digests: Sequence[str],
        backbone: Backbone,
        views: int,
        rotation: float = 0.0,
        max_pixels: int = MAX_PIXELS,
        eval_view: bool = True,
        views_side: int | None = None,
    ):
        self.paths, self.digests, self.views = list(paths), list(digests), views
        self.eval_view, self.views_side = eval_view, views_side
        self.max_pixels = max_pixels
        self.eval_tf = build_transforms(backbone.spec, train=False)
        self.train_tf = build_transforms(backbone.spec, train=True, rotation=rotation)
        self.min_side = backbone.spec.resize_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            side = self.min_side if not self.views else self.views_side
            img = load_image(self.paths[i], side, max_pixels=self.max_pixels)
            if self.views and side:
                img = shrink_to_side(img, side)
        except ImageError as exc:
            return i, None, exc.reason
        x = [self.eval_tf(img)] if self.eval_view else []
        if self.views:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.digests[i][:15], 16))
                x.extend(self.train_tf(img) for _ in range(self.views))
        return i, torch.stack(x), None


def _collate(batch):
    return batch


@dataclass
class Lookup:
    """What `cached_views` found or computed, by sample index: entries (eval, aug views) of the
    files that loaded (None values when not kept in memory), the bad ones and the cache hits."""

    entries: dict[int, tuple[torch.Tensor | None, torch.Tensor] | None]
    digests: dict[int, str]
    bad: dict[int, str]
    hits: int

    def kept(self, samples: Sequence[Sample]) -> tuple[list[int], list[Sample], torch.Tensor]:
        """The indices of the samples that loaded (in input order), those samples, their labels."""
        keep = sorted(self.entries)
        labels = torch.tensor([samples[i][1] for i in keep], dtype=torch.long)
        return keep, [samples[i] for i in keep], labels

    def bad_files(self, samples: Sequence[Sample]) -> list[BadFile]:
        return [BadFile(samples[i][0], r) for i, r in sorted(self.bad.items())]


@torch.inference_mode()
def cached_views(
    make_net: Callable[[], Callable[[torch.Tensor], torch.Tensor]],
    cache: OutputStore,
    backbone: Backbone,
    samples: Sequence[Sample],
    runtime: Runtime,
    views: int = 0,
    *,
    eval_view: bool = True,
    keep: bool = True,
    batch_size: int = 64,
    workers: int = 0,
    progress: Progress = no_progress,
    rotation: float = 0.0,
    max_pixels: int = MAX_PIXELS,
    label: str = "features",
    views_side: int | None = None,
    known: dict[str, str] | None = None,
) -> Lookup:
    """`make_net()`'s output for the eval view and `views` augmented views of every sample: read
    from `cache` where it holds them, computed in batches otherwise (the network is built only
    then) and stored. With `keep=False` nothing is held in memory: the cache is the store.
    `known`: {path: sha256} already computed in this call's run (not hashed again)."""
    digests, entries, bad = {}, {}, {}
    for i, (path, _) in enumerate(samples):
        try:
            digests[i] = (known or {}).get(path) or file_digest(path)
        except OSError as exc:
            bad[i] = exc.strerror or str(exc)
            continue
        hit = cache.get(digests[i], views, need_eval=eval_view)
        if hit is not None:
            entries[i] = hit if keep else None
    todo = [i for i in digests if i not in entries]
    hits = len(entries)
    if not todo:
        return Lookup(entries, digests, bad, hits)
    net = make_net()
    ds = _ImageViews(
        [samples[i][0] for i in todo],
        [digests[i] for i in todo],
        backbone,
        views,
        rotation,
        max_pixels,
        eval_view,
        views_side,
    )
    per = int(eval_view) + views
    loader = torch.utils.data.DataLoader(
        ds, batch_size=max(1, batch_size // per), collate_fn=_collate, **loader_workers(workers)
    )
    with loader_errors():
        for batch in progress(loader, label, len(loader)):
            ok = [(j, x) for j, x, _ in batch if x is not None]
            for j, _, reason in batch:
                if reason is not None:
                    bad[todo[j]] = reason
            if not ok:
                continue
            x = runtime.batch(torch.cat([x for _, x in ok]))
            with runtime.autocast():
                out = net(x).cpu()
            for (j, _), f in zip(ok, out.unflatten(0, (len(ok), per))):
                entry = (f[0], f[1:]) if eval_view else (None, f)
                cache.put(digests[todo[j]], *entry)
                entries[todo[j]] = entry if keep else None
    return Lookup(entries, digests, bad, hits)
