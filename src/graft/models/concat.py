"""Several frozen trunks as one (`--backbone efficientnet_lite0+efficientnet_lite2`): each sees the
image at its own pretrained input size and their pooled features are concatenated, so one head
reads them all. Several backbones' features together beat the best single one on most small
transfer tasks (the best backbone varies by task); on bench/levers.py's seven folders the three
embedded ones side by side scored 2.3 points above efficientnet_lite0 alone (docs/QUALITY.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.constants import BACKBONE_SEPARATOR as SEPARATOR


class Concatenated(nn.Module):
    """`trunks[i]` (image -> pooled vector) fed the image resized to `sizes[i]`; the outputs
    concatenated in order. One graph: it traces, exports to ONNX and folds BatchNorm as a
    single network does. `widths[i]`: how many numbers trunk i gives (models/heads.py scales
    each trunk's part on its own)."""

    def __init__(
        self, trunks: Sequence[nn.Module], sizes: Sequence[int], widths: Sequence[int] = ()
    ):
        super().__init__()
        self.trunks = nn.ModuleList(trunks)
        self.sizes = [int(s) for s in sizes]
        self.widths = [int(w) for w in widths]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for trunk, size in zip(self.trunks, self.sizes):
            seen = x
            if tuple(x.shape[-2:]) != (size, size):
                seen = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            out.append(trunk(seen))
        return torch.cat(out, 1)


def parts(name: str) -> list[str]:
    """The backbone names in a concatenated one ('a+b' -> ['a', 'b']); one name for a plain
    backbone."""
    return [p.strip() for p in name.split(SEPARATOR)]
