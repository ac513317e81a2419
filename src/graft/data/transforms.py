"""Preprocessing: the spec that travels with the weights, and the train/eval transforms from it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.transforms import v2

from ..core.constants import MAX_IMAGE_SIZE

INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """What the pretrained weights expect: read from their config, never typed twice."""

    input_size: int  # square crop fed to the network
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875  # eval: resize the shorter side to input_size / crop_pct, then crop
    interpolation: str = "bilinear"

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.input_size / self.crop_pct))

    def with_size(self, input_size: int | None) -> PreprocessSpec:
        if input_size is None or input_size == self.input_size:
            return self
        return PreprocessSpec(input_size, self.mean, self.std, self.crop_pct, self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> PreprocessSpec:
        """The spec a model file describes, every field checked (a received file is untrusted:
        an input side of 100000 would allocate until the machine dies). ValueError names the
        field and what it must be."""
        if not isinstance(d, dict):
            raise ValueError("preprocess must be a mapping")
        size = d.get("input_size")
        if not (
            isinstance(size, int)
            and not isinstance(size, bool)
            and MIN_INPUT_SIZE <= size <= MAX_IMAGE_SIZE
        ):
            raise ValueError(
                f"preprocess.input_size must be an integer from {MIN_INPUT_SIZE} to "
                f"{MAX_IMAGE_SIZE}, got {size!r}"
            )
        mean, std = _triple(d, "mean"), _triple(d, "std")
        if not all(v > 0 for v in std):
            raise ValueError(f"preprocess.std must be positive, got {d.get('std')!r}")
        crop = d.get("crop_pct", 0.875)
        if not (_number(crop) and MIN_CROP_PCT <= crop <= 1.0):
            raise ValueError(
                f"preprocess.crop_pct must be a number from {MIN_CROP_PCT} to 1, got {crop!r}"
            )
        interpolation = d.get("interpolation", "bilinear")
        if not isinstance(interpolation, str) or interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocess.interpolation must be one of "
                f"{', '.join(INTERPOLATIONS)}, got {interpolation!r}"
            )
        return cls(size, mean, std, float(crop), interpolation)


MIN_INPUT_SIZE = 16  # below it the networks' strides leave nothing to pool
MIN_CROP_PCT = 0.25  # the eval resize is input_size / crop_pct: at most 4 x 1024 pixels a side


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _triple(d: dict[str, Any], name: str) -> tuple[float, float, float]:
    v = d.get(name)
    if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_number(x) for x in v)):
        raise ValueError(f"preprocess.{name} must be 3 finite numbers (R, G, B), got {v!r}")
    if not all(-10.0 <= x <= 10.0 for x in v):
        raise ValueError(f"preprocess.{name} must be between -10 and 10, got {list(v)}")
    return (float(v[0]), float(v[1]), float(v[2]))


def _interp(spec: PreprocessSpec) -> v2.InterpolationMode:
    return INTERPOLATIONS.get(spec.interpolation, v2.InterpolationMode.BILINEAR)


def build_transforms(
    spec: PreprocessSpec, train: bool, rotation: float = 0.0, normalize: bool = True
) -> Callable:
    """PIL image or uint8 CHW tensor -> normalised float tensor, as in the transfer tutorial.

    train: RandomResizedCrop + horizontal flip (+ rotation); eval: resize + center crop.
    `normalize=False` stops at RGB in [0, 1] (an exported model normalises inside its graph).

    >>> spec = PreprocessSpec(224, (0.5,) * 3, (0.5,) * 3)
    >>> build_transforms(spec, train=False)(torch.zeros(3, 300, 400, dtype=torch.uint8)).shape
    torch.Size([3, 224, 224])
    """
    tensor = tensor_transforms(spec) if normalize else tensor_transforms(spec)[:-1]
    return v2.Compose([*geometry_transforms(spec, train, rotation), *tensor])


def geometry_transforms(spec: PreprocessSpec, train: bool, rotation: float = 0.0) -> list:
    if train:
        ops: list = [
            v2.RandomResizedCrop(spec.input_size, interpolation=_interp(spec), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if rotation:
            ops.append(v2.RandomRotation(rotation, interpolation=_interp(spec)))
        return ops
    return [
        v2.Resize(spec.resize_size, interpolation=_interp(spec), antialias=True),
        v2.CenterCrop(spec.input_size),
    ]


def tensor_transforms(spec: PreprocessSpec) -> list:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(spec.mean), list(spec.std)),
    ]


def denormalize(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Undo Normalize for display: (..., 3, H, W) float in [0, 1]."""
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)
