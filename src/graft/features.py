"""Cached backbone features: a frozen backbone sees each image once, ever.

Entries are keyed by the backbone's weights, its preprocessing and precision (the model key) and
by each file's content hash, so an edited or added file is recomputed and nothing stale is reused.
Each entry is a small safetensors file with a checksum; a damaged entry is recomputed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backbones import Backbone
from .errors import GraftError, ImageError
from .images import MAX_PIXELS, BadFile, file_digest, load_image
from .runtime import (
    Progress,
    Runtime,
    atomic_path,
    default_cache_dir,
    loader_errors,
    loader_workers,
    no_progress,
)
from .splits import Sample
from .transforms import build_transforms

log = logging.getLogger(__name__)

STORE_DTYPE = torch.float16  # pooled features are well inside fp16's range; halves the cache


def model_key(backbone: Backbone, runtime: Runtime, rotation: float = 0.0) -> str:
    """Hash of everything that changes a feature: weights, preprocessing, precision, format, and
    the augmentation of the cached views (`rotation`)."""
    h = hashlib.sha256()
    what = {"backbone": backbone.name, "spec": backbone.spec.to_dict(),
            "precision": runtime.precision, "v": 2}  # fmt: skip  # v2: BatchNorm folded
    if rotation:  # absent when 0, so caches made before rotation was keyed stay valid
        what["rotation"] = rotation
    h.update(json.dumps(what, sort_keys=True).encode())
    for name, tensor in backbone.model.features.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


class FeatureCache:
    """One folder per model key; one checksummed safetensors file per image content.

    A speed-up, never a reason to fail: a cache that cannot be read or written (read-only, full,
    a folder where a file should be, or the reverse) is reported once and training goes on
    without it. The checksum covers the digest an entry is stored under, so an entry copied to
    another image's name is refused rather than trained on.
    """

    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / key
        self.enabled = True

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def get(self, digest: str, views: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(eval (D,), aug (views, D)) or None when absent, damaged or holding fewer views."""
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
        aug = tensors.get("aug", tensors["eval"].new_zeros(0, tensors["eval"].numel()))
        if aug.shape[0] < views:
            return None
        return tensors["eval"], aug[:views]

    def put(self, digest: str, eval_feat: torch.Tensor, aug: torch.Tensor) -> None:
        from safetensors.torch import save_file

        if not self.enabled:
            return
        tensors = {"eval": eval_feat.to(STORE_DTYPE).contiguous()}
        if aug.shape[0]:
            tensors["aug"] = aug.to(STORE_DTYPE).contiguous()
        try:
            with atomic_path(self._path(digest), durable=False) as tmp:  # checksummed on reading
                save_file(tensors, str(tmp), metadata={"sha256": _checksum(digest, tensors)})
        except (OSError, GraftError) as exc:  # read-only, full, a file in place of a folder...
            self.enabled = False
            log.warning("the feature cache in %s cannot be written (%s); going on without it "
                        "(set --cache-dir to a writable folder to keep features)", self.dir,
                        getattr(exc, "strerror", None) or exc)  # fmt: skip


def _checksum(digest: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(digest.encode())  # bound to the image the entry claims to describe
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _ViewsDataset(torch.utils.data.Dataset):
    """Eval view plus `views` augmented views of each file; augmentations seeded by content hash,
    so the same file always gets the same cached views whatever the worker order."""

    def __init__(self, paths: Sequence[str], digests: Sequence[str], backbone: Backbone,
                 views: int, rotation: float = 0.0, max_pixels: int = MAX_PIXELS):  # fmt: skip
        self.paths, self.digests, self.views = list(paths), list(digests), views
        self.max_pixels = max_pixels
        self.eval_tf = build_transforms(backbone.spec, train=False)
        self.train_tf = build_transforms(backbone.spec, train=True, rotation=rotation)
        self.min_side = backbone.spec.resize_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            side = self.min_side if not self.views else None  # views crop from the full image
            img = load_image(self.paths[i], side, max_pixels=self.max_pixels)
        except ImageError as exc:
            return i, None, exc.reason
        x = [self.eval_tf(img)]
        if self.views:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.digests[i][:15], 16))
                x.extend(self.train_tf(img) for _ in range(self.views))
        return i, torch.stack(x), None


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
    same = bool(((ya - yb).abs().max() <= 1e-3 * ya.abs().max().clamp_min(1e-6)).item())
    if not same:
        log.warning("folding BatchNorm changed this network's output: extracting unfolded")
    return same


def _collate(batch):
    return batch


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


@torch.inference_mode()
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
) -> FeatureSet:
    """Pooled features of every sample, from the cache where possible, computed once otherwise.
    `views` augmented views per sample (random crop, flip, `rotation`) are cached beside them."""
    key = model_key(backbone, runtime, rotation if views else 0.0)
    cache = FeatureCache(cache_dir or default_cache_dir(), key)
    digests, feats, augs, bad = {}, {}, {}, {}
    for i, (path, _) in enumerate(samples):
        try:
            digests[i] = file_digest(path)
        except OSError as exc:
            bad[i] = exc.strerror or str(exc)
            continue
        hit = cache.get(digests[i], views)
        if hit is not None:
            feats[i], augs[i] = hit
    todo = [i for i in digests if i not in feats]
    hits = len(feats)
    if todo:  # the network (BN folded, a copy) only when something is not in the cache
        net = runtime.prepare(fold_batchnorm(backbone.model.features, backbone.spec.input_size))
        ds = _ViewsDataset([samples[i][0] for i in todo], [digests[i] for i in todo], backbone,
                           views, rotation, max_pixels)  # fmt: skip
        n = max(1, batch_size // (1 + views))
        loader = torch.utils.data.DataLoader(
            ds, batch_size=n, collate_fn=_collate, **loader_workers(workers)
        )
        with loader_errors():
            for batch in progress(loader, "features", len(loader)):
                ok = [(j, x) for j, x, _ in batch if x is not None]
                for j, _, reason in batch:
                    if reason is not None:
                        bad[todo[j]] = reason
                if not ok:
                    continue
                x = runtime.batch(torch.cat([x for _, x in ok]))
                with runtime.autocast():
                    out = net(x).float().cpu()
                out = out.view(len(ok), 1 + views, -1)
                for (j, _), f in zip(ok, out):
                    i = todo[j]
                    feats[i], augs[i] = f[0].to(STORE_DTYPE), f[1:].to(STORE_DTYPE)
                    cache.put(digests[i], feats[i], augs[i])
    keep = [i for i in range(len(samples)) if i in feats]
    dim = backbone.model.num_features
    return FeatureSet(
        features=torch.stack([feats[i] for i in keep]).float() if keep else torch.zeros(0, dim),
        aug=torch.stack([augs[i] for i in keep]).float() if keep else torch.zeros(0, views, dim),
        labels=torch.tensor([samples[i][1] for i in keep], dtype=torch.long),
        samples=[samples[i] for i in keep],
        bad=[BadFile(samples[i][0], r) for i, r in sorted(bad.items())],
        hits=hits,
        computed=len(keep) - hits,
    )
