"""The frozen networks whose outputs are cached: the BatchNorm-folded extractor, and a backbone cut
into a frozen trunk (its output cached) and a top that trains (partial from cached activations).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.constants import FOLD_PARITY, FP32_PARITY
from ..core.errors import GraftError
from ..models.backbones import Backbone, GraftNet

log = logging.getLogger(__name__)


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
        pairs.append(
            (conv if conv is not None and conv.out_channels == m.num_features else None, m)
        )

    hooks = [m.register_forward_hook(after_conv) for m in net.modules() if isinstance(m, nn.Conv2d)]
    hooks += [
        m.register_forward_hook(after_bn) for m in net.modules() if isinstance(m, nn.BatchNorm2d)
    ]
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
class Cut:
    """The frozen trunk (a BN-folded copy where that is exact) and the top that trains."""

    trunk: Trunk
    top: Top
    blocks: list[str]  # the top's block names, first trainable one first
    shape: tuple[int, ...]  # one activation's shape


def cut_backbone(backbone: Backbone, first: str) -> Cut | None:
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
                        return Cut(trunk, Top(blocks, tail), names, tuple(a.shape[1:]))
    finally:
        net.train(was_training)
    return None


def _frozen_copy(features: nn.Module) -> nn.Module:
    return copy.deepcopy(features).eval().requires_grad_(False)
