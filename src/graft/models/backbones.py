"""Backbones: one registry (embedded, torchvision, timm) and one transfer surface.

`create_backbone(name, num_classes)` returns a `Backbone`: a `GraftNet` (features -> new head),
the preprocessing its weights expect, and its named blocks for freezing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import BackboneError, did_you_mean
from ..data.transforms import PreprocessSpec
from .concat import SEPARATOR, Concatenated, parts
from .weights import (
    EMBEDDED,
    download_torchvision,
    embedded_weights_path,
    load_into,
    load_state_dict_file,
    torchvision_weights_file,
)

log = logging.getLogger(__name__)

TORCHVISION = (
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg11",
    "vgg16",
    "alexnet",
    "inception_v3",
    "densenet121",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
)
# containers whose children are the stages users name with --unfreeze (timm and torchvision)
_STAGE_CONTAINERS = ("blocks", "stages", "layers", "features")
_AUX_HEAD = "AuxLogits.fc"  # inception_v3's auxiliary classifier


class GraftNet(nn.Module):
    """`features` (image -> pooled vector) then `head` (vector -> logits).

    Frozen BatchNorm layers stay in eval mode while training, so their running statistics,
    learned on ImageNet, are not overwritten by a few hundred of the user's images.
    """

    def __init__(
        self, features: nn.Module, head: nn.Module, num_features: int, has_aux: bool = False
    ):
        super().__init__()
        self.features = features
        self.head = head
        self.num_features = num_features
        self.has_aux = has_aux

    def forward(self, x: torch.Tensor):
        out = self.features(x)
        if isinstance(out, tuple):  # inception in train mode: (pooled features, aux logits)
            return self.head(out[0]), out[1]
        return self.head(out)

    def train(self, mode: bool = True) -> GraftNet:
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in m.parameters(recurse=False)
                ):
                    m.eval()
        return self

    def aux_head(self) -> nn.Module | None:
        return self.features.get_submodule(_AUX_HEAD) if self.has_aux else None


@dataclass(frozen=True)
class Backbone:
    """A network with a new head, the preprocessing its weights expect and its block names.
    Frozen: a different input size is a new value (`dataclasses.replace(bb, spec=...)`)."""

    name: str
    model: GraftNet
    spec: PreprocessSpec
    blocks: list[str]  # ordered block names, usable with --unfreeze

    def block(self, name: str) -> nn.Module:
        return self.model.features.get_submodule(name)


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    source: str
    params: int
    input_size: int
    offline: bool


def create_backbone(
    name: str,
    num_classes: int | None,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
) -> Backbone:
    """Build a backbone with its last layer replaced by a fresh `num_classes` head.

    `num_classes=None` keeps the pretrained ImageNet head. `weights` loads a local state dict
    of the original architecture (safetensors, or a torch file read with weights_only=True).

    >>> bb = create_backbone("efficientnet_lite0", num_classes=3)
    >>> bb.spec.input_size, bb.blocks[:3]
    (224, ['conv_stem', 'bn1', 'blocks.0'])
    """
    if SEPARATOR in name:
        return _concatenated(name, num_classes, pretrained, weights)
    if name in EMBEDDED:
        model, spec = _embedded(name, pretrained, weights)
    elif name in TORCHVISION:
        model, spec = _torchvision(name, pretrained, weights)
    elif name.startswith("timm:"):
        model, spec = _timm(name[5:], pretrained, weights)
    else:
        raise BackboneError(
            f"unknown backbone {name!r}{did_you_mean(name, [*EMBEDDED, *TORCHVISION])}; "
            "see `graft backbones`, or use any timm model as timm:<name>"
        )
    net = _replace_head(model, num_classes)
    return Backbone(name, net, spec, named_blocks(net.features))


# ---------------------------------------------------------------- sources


def _concatenated(name: str, num_classes: int | None, pretrained: bool, weights) -> Backbone:
    """'a+b': the trunks of a and b side by side (models/concat.py) under one new head; the
    preprocessing is the largest input's, and the members must normalise alike."""
    names = parts(name)
    if len(names) < 2 or len(set(names)) != len(names) or not all(names):
        raise BackboneError(
            f"backbone {name!r}: name two or more different backbones joined by "
            f"{SEPARATOR!r}, e.g. efficientnet_lite0{SEPARATOR}efficientnet_lite2"
        )
    if weights is not None:
        raise BackboneError(
            f"--weights is one state dict and {name!r} is {len(names)} networks: "
            "concatenate backbones whose weights graft can find by itself"
        )
    members = [create_backbone(n, 1, pretrained) for n in names]
    first = members[0].spec
    for m in members[1:]:
        if (m.spec.mean, m.spec.std) != (first.mean, first.std):
            raise BackboneError(
                f"{names[0]} and {m.name} normalise images differently (mean/std "
                f"{list(first.mean)}/{list(first.std)} against {list(m.spec.mean)}/"
                f"{list(m.spec.std)}): concatenate backbones that share it"
            )
    features = Concatenated(
        [m.model.features for m in members],
        [m.spec.input_size for m in members],
        [m.model.num_features for m in members],
    )
    width = sum(m.model.num_features for m in members)
    head = nn.Identity() if num_classes is None else nn.Linear(width, num_classes)
    spec = max((m.spec for m in members), key=lambda s: s.input_size)
    blocks = [f"trunks.{i}.{b}" for i, m in enumerate(members) for b in m.blocks]
    return Backbone(name, GraftNet(features, head, width), spec, blocks)


def _embedded(name: str, pretrained: bool, weights) -> tuple[nn.Module, PreprocessSpec]:
    import timm

    package, arch = EMBEDDED[name]
    model = timm.create_model(arch, pretrained=False)
    if weights is not None:
        load_into(model, load_state_dict_file(weights), name, weights)
    elif pretrained:
        path = embedded_weights_path(name)
        state = load_state_dict_file(path)
        own = model.state_dict()
        if len(state) != len(own) or any(
            a.shape != b.shape for a, b in zip(state.values(), own.values())
        ):
            raise BackboneError(f"{path} does not match {arch}: {len(state)} tensors")
        # efficientnet_pytorch names, timm order: the tensors line up one to one.
        model.load_state_dict(dict(zip(own.keys(), state.values())))
    return model, _timm_spec(model)


def _torchvision(name: str, pretrained: bool, weights) -> tuple[nn.Module, PreprocessSpec]:
    from torchvision import models

    default = models.get_model_weights(name).DEFAULT
    extra = (
        {"aux_logits": True, "transform_input": True, "init_weights": False}
        if name == "inception_v3"
        else {}
    )
    model = models.get_model(name, weights=None, **extra)
    if weights is not None:
        load_into(model, load_state_dict_file(weights), name, weights)
    elif pretrained:
        load_into(model, download_torchvision(name, default), name, default.url)
    t = default.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    spec = PreprocessSpec(crop, tuple(t.mean), tuple(t.std), crop / resize, t.interpolation.value)
    return model, spec


def _timm(arch: str, pretrained: bool, weights) -> tuple[nn.Module, PreprocessSpec]:
    import timm

    if not timm.is_model(arch):
        raise BackboneError(
            f"timm has no model {arch!r}{did_you_mean(arch, timm.list_models())}; "
            "list them with python -c 'import timm; print(timm.list_models())'"
        )
    try:
        model = timm.create_model(arch, pretrained=pretrained and weights is None)
    except Exception as exc:  # hub errors come in many types
        raise BackboneError(
            f"cannot fetch the pretrained weights of timm:{arch} ({exc}). Offline? Pass "
            "--weights PATH to a local state dict, or --no-pretrained to train from scratch"
        ) from exc
    if weights is not None:
        load_into(model, load_state_dict_file(weights), f"timm:{arch}", weights)
    return model, _timm_spec(model)


def _timm_spec(model: nn.Module) -> PreprocessSpec:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return PreprocessSpec(
        int(cfg["input_size"][-1]),
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        float(cfg.get("crop_pct", 0.875)),
        str(cfg.get("interpolation", "bilinear")),
    )


# ---------------------------------------------------------------- the transfer surface


def _replace_head(model: nn.Module, num_classes: int | None) -> GraftNet:
    """Take the model's classifier off and put a new head after its pooled features.

    timm models use timm's own surface (`get_classifier`, `reset_classifier(0)`,
    `num_features`); torchvision models have their last Linear replaced by Identity.
    """
    if hasattr(model, "reset_classifier") and hasattr(model, "get_classifier"):
        old = model.get_classifier()
        width = int(getattr(model, "head_hidden_size", None) or model.num_features)
        model.reset_classifier(0)  # forward() now ends at the pooled features
        head = old if num_classes is None else nn.Linear(width, num_classes)
        return GraftNet(model, head, width)
    linears = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not n.startswith("AuxLogits")
    ]
    if not linears:
        raise BackboneError(f"{type(model).__name__} has no Linear classifier to replace")
    path, old = linears[-1]
    parent_name, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
    head = old if num_classes is None else nn.Linear(old.in_features, num_classes)
    has_aux = isinstance(getattr(model, "AuxLogits", None), nn.Module)
    if has_aux and num_classes is not None:
        aux = model.get_submodule(_AUX_HEAD)
        model.AuxLogits.fc = nn.Linear(aux.in_features, num_classes)
    return GraftNet(model, head, old.in_features, has_aux)


def named_blocks(features: nn.Module) -> list[str]:
    """Top-level children with parameters, stage containers (blocks, stages, features...)
    opened one level: resnet -> conv1, bn1, layer1..layer4; efficientnet -> blocks.0..6."""
    out: list[str] = []
    for name, child in features.named_children():
        if name == "AuxLogits" or not any(True for _ in child.parameters()):
            continue
        if name in _STAGE_CONTAINERS and len(list(child.children())) > 1:
            out.extend(
                f"{name}.{sub}"
                for sub, m in child.named_children()
                if any(True for _ in m.parameters())
            )
        else:
            out.append(name)
    return out


# ---------------------------------------------------------------- listing


def list_backbones() -> list[BackboneInfo]:
    """The registry's named backbones with size, input size and offline availability."""
    from torchvision import models

    infos = []
    for name in EMBEDDED:
        net = create_backbone(name, None, pretrained=False).model
        spec = _timm_spec(net.features)
        try:
            offline = embedded_weights_path(name).is_file()
        except BackboneError:
            offline = False
        params = sum(p.numel() for p in net.parameters())
        infos.append(BackboneInfo(name, "embedded", params, spec.input_size, offline))
    for name in TORCHVISION:
        w = models.get_model_weights(name).DEFAULT
        infos.append(
            BackboneInfo(
                name,
                "torchvision",
                int(w.meta["num_params"]),
                int(w.transforms().crop_size[0]),
                torchvision_weights_file(name).is_file(),
            )
        )
    return infos
