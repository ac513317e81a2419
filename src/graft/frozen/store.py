"""Network outputs stored per image content: a frozen network sees each image once, ever.

`cached_views` runs a network over the eval view and K augmented views of each file (the views
seeded by the file's content, so they are the same whatever the order or the worker) and keeps
the outputs in a `FeatureCache`: one checksummed safetensors file per image content, in a folder
named by a key of everything that changes the output. Pooled features (features.py) and trunk
activations (activations.py) are both stored this way.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.constants import MAX_PIXELS
from ..core.errors import GraftError, ImageError
from ..core.runtime import (
    Progress,
    Runtime,
    atomic_path,
    loader_errors,
    loader_workers,
    no_progress,
)
from ..data.images import file_digest, load_image, shrink_to_side
from ..data.splits import Sample
from ..data.transforms import build_transforms
from ..models.backbones import Backbone

log = logging.getLogger(__name__)

STORE_DTYPE = torch.float16  # pooled features are well inside fp16's range; halves the cache


class FeatureCache:
    """One folder per model key; one checksummed safetensors file per image content.

    A speed-up, never a reason to fail: a cache that cannot be read or written (read-only, full,
    a folder where a file should be, or the reverse) is reported once and training goes on
    without it. The checksum covers the digest an entry is stored under, so an entry copied to
    another image's name is refused rather than trained on.
    """

    def __init__(self, root: str | Path, key: str, dtype: torch.dtype | None = STORE_DTYPE):
        self.dir = Path(root) / key
        self.enabled = True
        self.dtype = dtype  # None: stored as computed

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def get(self, digest: str, views: int, need_eval: bool = True
            ) -> tuple[torch.Tensor | None, torch.Tensor] | None:  # fmt: skip
        """(eval (*S), aug (views, *S)) or None when absent, damaged, holding fewer views or no
        eval view when one is needed; S is (D,) for pooled features."""
        from safetensors import safe_open

        path = self._path(digest)
        try:
            if not self.enabled or not path.is_file():
                return None
            with safe_open(str(path), framework="pt") as f:
                checksum = (f.metadata() or {}).get("sha256")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if checksum != _checksum(digest, tensors):
                raise ValueError("checksum mismatch")
        except Exception as exc:  # unreadable, truncated header, bad bytes, wrong dtype...
            log.warning("feature cache entry %s is unusable (%s): recomputing", path, exc)
            return None
        ev = tensors.get("eval")
        if need_eval and ev is None:
            return None
        aug = tensors["aug"] if "aug" in tensors else ev.new_zeros(0, *ev.shape)
        if aug.shape[0] < views:
            return None
        return ev, aug[:views]

    def put(self, digest: str, eval_feat: torch.Tensor | None, aug: torch.Tensor) -> None:
        from safetensors.torch import save_file

        if not self.enabled:
            return
        tensors = {} if eval_feat is None else {"eval": self._stored(eval_feat)}
        if aug.shape[0]:
            tensors["aug"] = self._stored(aug)
        try:
            with atomic_path(self._path(digest), durable=False) as tmp:  # checksummed on reading
                save_file(tensors, str(tmp), metadata={"sha256": _checksum(digest, tensors)})
        except (OSError, GraftError) as exc:  # read-only, full, a file in place of a folder...
            self.enabled = False
            log.warning("the feature cache in %s cannot be written (%s); going on without it "
                        "(set --cache-dir to a writable folder to keep features)", self.dir,
                        getattr(exc, "strerror", None) or exc)  # fmt: skip

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        return (t if self.dtype is None else t.to(self.dtype)).contiguous()

    def writable(self) -> bool:
        """Whether entries can be written here (a probe file, removed)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            return False
        return self.enabled


def _checksum(digest: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(digest.encode())  # bound to the image the entry claims to describe
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _ViewsDataset(torch.utils.data.Dataset):
    """Eval view plus `views` augmented views of each file; augmentations seeded by content hash,
    so the same file always gets the same cached views whatever the worker order. Views crop
    from the full image, or (`views_side`) from one whose shorter side was decoded to that size,
    as finetune and live partial crop theirs (loaders.py): a JPEG photo then decodes at 1/8."""

    def __init__(self, paths: Sequence[str], digests: Sequence[str], backbone: Backbone,
                 views: int, rotation: float = 0.0, max_pixels: int = MAX_PIXELS,
                 eval_view: bool = True, views_side: int | None = None):  # fmt: skip
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


@torch.inference_mode()
def cached_views(
    make_net: Callable[[], Callable[[torch.Tensor], torch.Tensor]],
    cache: FeatureCache,
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
) -> Lookup:
    """`make_net()`'s output for the eval view and `views` augmented views of every sample: read
    from `cache` where it holds them, computed in batches otherwise (the network is built only
    then) and stored. With `keep=False` nothing is held in memory: the cache is the store."""
    digests, entries, bad = {}, {}, {}
    for i, (path, _) in enumerate(samples):
        try:
            digests[i] = file_digest(path)
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
    ds = _ViewsDataset([samples[i][0] for i in todo], [digests[i] for i in todo], backbone,
                       views, rotation, max_pixels, eval_view, views_side)  # fmt: skip
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
