"""What extract's head reads: the pooled features as they are, or power-normalised: each number
raised to a power below 1 with its sign kept (its fourth root, `root4`, the default with the
fitted head; its square root, `power`, the default before stop 37), then each backbone's part
of the vector scaled to unit length. Pooled ReLU features are heavy-tailed (a few channels fire
strongly on every image); the root evens them out, and the unit length puts every image, and
every backbone of a concatenated one, on one scale. Perronnin et al. (2010) introduced it for
Fisher vectors; on bench/levers.py's seven folders the square root scored 1.3 points above the
features as they are with efficientnet_lite0, better on five of them, and the fourth root 0.6
more through the whole of `graft train` (0.5 on four folders made after it was seen; better on
five of the eleven, worse on two by half a point or less; docs/QUALITY.md).

The normalisation lives in the head (`NormedLinear`, an `nn.Linear` with the same weights and
state dict), so every path that runs `net.head(features)` (predict, serve, the ONNX graph, the
fitted head's folds, `--auto`) reads the features alike; model.json's `feature_norm` says which.

With flip test-time augmentation (`tta="flip"`, `view_features`) the head reads the average of
the image's features and its mirror image's, both computed in one batch; model.json's `tta` says
so, and predict, evaluate, serve and the ONNX graph all go through `view_features`.

>>> import torch
>>> x = torch.tensor([[4.0, 0.0, 9.0, 16.0]])
>>> power_normalise(x, (2, 2)).tolist()
[[1.0, 0.0, 0.6000000238418579, 0.800000011920929]]
>>> [round(v, 4) for v in power_normalise(torch.tensor([[16.0, 1.0]]), (2,), 0.25)[0].tolist()]
[0.8944, 0.4472]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import BackboneError
from .concat import Concatenated

POWER = "power"  # the signed square root (saved models say so since stop 32)
ROOT4 = "root4"  # the signed fourth root
NONE = "none"
FLIP = "flip"
EXPONENTS = {POWER: 0.5, ROOT4: 0.25}
# below it the root's slope is cut: a feature of 0 stays 0, its gradient 0; above it the slope
# (exponent x floor^(exponent-1)) stays under about 5e5 for both roots, so Grad-CAM goes through
FLOORS = {0.5: 1e-12, 0.25: 1e-8}
EPS = 1e-6  # representable in float16, unlike F.normalize's 1e-12: an all-zero vector stays 0


def power_normalise(x: torch.Tensor, parts: Sequence[int], exponent: float = 0.5) -> torch.Tensor:
    """Signed `exponent` power (0.5: the square root; 0.25: the fourth root), then each
    consecutive block of `parts[i]` numbers to unit length (computed in float32; the result in
    float32)."""
    x = x.float()
    a = x.abs().clamp_min(FLOORS[exponent])  # a finite slope at 0 (Grad-CAM goes through)
    x = x.sign() * (a.sqrt() if exponent == 0.5 else a.sqrt().sqrt())
    return torch.cat([F.normalize(p, dim=-1, eps=EPS) for p in x.split(list(parts), -1)], -1)


class NormedLinear(nn.Linear):
    """A linear head on power-normalised features; its state dict is a plain `nn.Linear`'s."""

    def __init__(
        self, in_features: int, out_features: int, parts: Sequence[int], exponent: float = 0.5
    ):
        super().__init__(in_features, out_features)
        if sum(parts) != in_features:
            raise BackboneError(f"feature parts {list(parts)} do not add up to {in_features}")
        if exponent not in FLOORS:
            raise BackboneError(f"no power normalisation with exponent {exponent!r}")
        self.parts = tuple(int(p) for p in parts)
        self.exponent = exponent

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return power_normalise(x, self.parts, self.exponent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalise(x).to(self.weight.dtype))


def set_feature_norm(backbone, kind: str | None) -> None:
    """Give `backbone`'s linear head the features as `kind` says ("root4", "power", or
    "none"/None: as they are), its weights kept."""
    if kind in (None, NONE):
        return
    if kind not in EXPONENTS:
        raise BackboneError(f"unknown feature normalisation {kind!r}; choose root4, power or none")
    net = backbone.model
    old = net.head
    if not isinstance(old, nn.Linear):
        raise BackboneError(f"{backbone.name}: --feature-norm {kind} needs a linear head")
    widths = net.features.widths if isinstance(net.features, Concatenated) else []
    head = NormedLinear(
        old.in_features, old.out_features, widths or [old.in_features], EXPONENTS[kind]
    )
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.copy_(old.bias)
    net.head = head.to(old.weight.device)


def head_input(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What `head` does to the features before its weights (identity for a plain head): the
    fitted head is solved on features so transformed."""
    normalise = getattr(head, "normalise", None)
    return normalise if normalise is not None else (lambda x: x)


def view_features(
    features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the features of `x` as it is, what the head reads): the same tensor, or with
    `tta="flip"` their average with the features of `x` mirrored left to right, one pass over
    both (a batch of 2N). The first stays single-view for what was fitted on single views: the
    unknown score's distances to training features.

    >>> plain, read = view_features(lambda t: t.mean((2, 3)), torch.rand(2, 3, 8, 8), "flip")
    >>> plain.shape, read.shape
    (torch.Size([2, 3]), torch.Size([2, 3]))
    """
    if tta in (None, NONE):
        f = features(x)
        return f, f
    if tta != FLIP:
        raise BackboneError(f"unknown test-time augmentation {tta!r}; choose flip or none")
    f = features(torch.cat([x, x.flip(-1)]))
    n = x.shape[0]  # slices, not chunk(): the ONNX graph keeps its batch size dynamic
    return f[:n], (f[:n] + f[n:]) / 2
