"""Images for finetune and partial, decoded once.

Decoding a JPEG costs more than augmenting it, so each image is decoded once per
run into a compact uint8 tensor (shorter side = the eval resize size, a little larger than the
crop) kept in memory; RandomResizedCrop and flips then run on those tensors each epoch. Validation
images are stored already center-cropped. Past a memory budget, images are decoded from disk
every epoch instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from ..core.constants import MAX_PIXELS, MEMORY_GB
from .images import BadFile, decode_files, load_image, shrink_to_side, verify_files
from .splits import Sample
from .transforms import PreprocessSpec, build_transforms, geometry_transforms, tensor_transforms

log = logging.getLogger(__name__)


def decode_to_tensor(path: str, side: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """uint8 (3, H, W) with the shorter side resized to `side` (never enlarged past it)."""
    im = shrink_to_side(load_image(path, min_side=side, max_pixels=max_pixels), side)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) samples -> (transformed image, label)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable,
        min_side: int | None = None,
        max_pixels: int = MAX_PIXELS,
    ):
        self.samples = list(samples)
        self.transform = transform
        self.min_side, self.max_pixels = min_side, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.samples]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(load_image(path, self.min_side, max_pixels=self.max_pixels)), label


class DecodedDataset(torch.utils.data.Dataset):
    """uint8 images in memory -> `transform` each time an item is read."""

    def __init__(self, images: list[torch.Tensor], labels: list[int], transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), self.labels[i]


def decode_all(
    samples: Sequence[Sample], fn: Callable[[str], torch.Tensor], workers: int
) -> tuple[list[torch.Tensor], list[int], list[BadFile]]:
    """`fn` over every sample's file: the tensors and labels of those that decoded, the failures."""
    tensors, bad = decode_files([p for p, _ in samples], fn, workers)
    kept = [(t, y) for t, (_, y) in zip(tensors, samples) if t is not None]
    return [t for t, _ in kept], [y for _, y in kept], bad


def build_datasets(
    train: Sequence[Sample],
    val: Sequence[Sample],
    spec: PreprocessSpec,
    rotation: float = 0.0,
    workers: int = 2,
    memory_budget: int = int(MEMORY_GB * 2**30),
    max_pixels: int = MAX_PIXELS,
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, list[BadFile]]:
    """Train and val datasets, decoded once in memory when they fit the budget.

    Every file is decoded here, so the returned bad files are the full list, before any epoch.
    """
    side = spec.resize_size
    estimate = (len(train) * side * side * 4 // 3 + len(val) * spec.input_size**2) * 3
    if estimate > memory_budget:
        log.info(
            "%.3g GB of decoded images is over the %.3g GB budget (--memory-gb): decoding "
            "every epoch",
            estimate / 1e9,
            memory_budget / 1e9,
        )
        bad, _ = verify_files([p for p, _ in [*train, *val]], workers, max_pixels, side)
        skip = {b.path for b in bad}
        # the same pixels as the in-memory path: JPEGs drafted to the eval resize side
        kw = dict(min_side=side, max_pixels=max_pixels)
        return (
            ImageDataset(
                [s for s in train if s[0] not in skip], build_transforms(spec, True, rotation), **kw
            ),
            ImageDataset([s for s in val if s[0] not in skip], build_transforms(spec, False), **kw),
            bad,
        )
    eval_geometry = v2.Compose(geometry_transforms(spec, train=False))
    tr_images, tr_labels, tr_bad = decode_all(
        train, lambda p: decode_to_tensor(p, side, max_pixels), workers
    )
    va_images, va_labels, va_bad = decode_all(
        val, lambda p: eval_geometry(decode_to_tensor(p, side, max_pixels)), workers
    )
    train_tf = build_transforms(spec, True, rotation)
    val_tf = v2.Compose(tensor_transforms(spec))
    return (
        DecodedDataset(tr_images, tr_labels, train_tf),
        DecodedDataset(va_images, va_labels, val_tf),
        tr_bad + va_bad,
    )
