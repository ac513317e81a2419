"""Strategies train exactly the parameters they promise; frozen BatchNorm keeps its statistics."""

from __future__ import annotations

import pytest
import torch

from graft.core.errors import BackboneError
from graft.models.backbones import create_backbone
from graft.models.freezing import apply_freezing, count_parameters, param_groups, trainable_blocks


def _trainable_prefixes(bb) -> set[str]:
    names = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    return {n.split(".")[0] if n.startswith("head") else n.split(".")[1] for n in names}


@pytest.fixture
def resnet():
    return create_backbone("resnet18", 3, pretrained=False)


def test_extract_trains_only_the_head(resnet):
    apply_freezing(resnet, trainable_blocks(resnet, "extract"))
    trainable, total = count_parameters(resnet.model)
    assert trainable == 512 * 3 + 3 and total == 11_178_051
    assert _trainable_prefixes(resnet) == {"head"}


def test_finetune_trains_everything(resnet):
    apply_freezing(resnet, trainable_blocks(resnet, "finetune"))
    assert count_parameters(resnet.model)[0] == count_parameters(resnet.model)[1]


def test_partial_trains_named_blocks_and_is_reversible(resnet):
    apply_freezing(resnet, trainable_blocks(resnet, "partial", ["layer3", "layer4"]))
    assert _trainable_prefixes(resnet) == {"head", "layer3", "layer4"}
    apply_freezing(resnet, trainable_blocks(resnet, "partial", unfreeze_last=1))
    assert _trainable_prefixes(resnet) == {"head", "layer4"}
    groups = param_groups(resnet, lr=1.0, backbone_lr_mult=0.1)
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 1.0), ("backbone", 0.1)]
    assert sum(p.numel() for g in groups for p in g["params"]) == count_parameters(resnet.model)[0]


def test_unknown_block_lists_the_real_ones(resnet):
    with pytest.raises(BackboneError) as err:
        trainable_blocks(resnet, "partial", ["layer5"])
    assert "no block 'layer5' (did you mean: layer4, layer3, layer2?)" in str(err.value)
    assert "its blocks: conv1, bn1, layer1, layer2, layer3, layer4" in str(err.value)


def test_frozen_batchnorm_keeps_running_stats(resnet):
    apply_freezing(resnet, ["layer4"])
    before = resnet.model.features.bn1.running_mean.clone()
    before4 = resnet.model.features.layer4[0].bn1.running_mean.clone()
    resnet.model.train()
    assert not resnet.model.features.bn1.training and resnet.model.features.layer4[0].bn1.training
    resnet.model(torch.randn(4, 3, 64, 64) * 5 + 3)
    assert torch.equal(resnet.model.features.bn1.running_mean, before)
    assert not torch.equal(resnet.model.features.layer4[0].bn1.running_mean, before4)
