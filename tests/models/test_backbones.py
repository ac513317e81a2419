"""Backbone registry: embedded weights are real, heads are replaced, blocks are named."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from graft.core.errors import BackboneError
from graft.data.transforms import build_transforms
from graft.models.backbones import create_backbone, list_backbones
from graft.models.heads import NormedLinear, set_feature_norm, view_features


def test_embedded_lite0_knows_a_cat():
    skimage_data = pytest.importorskip("skimage.data")
    bb = create_backbone("efficientnet_lite0", num_classes=None)  # keep the ImageNet head
    x = build_transforms(bb.spec, train=False)(Image.fromarray(skimage_data.chelsea()))
    with torch.inference_mode():
        top3 = bb.model.eval()(x[None]).topk(3).indices[0].tolist()
    assert any(281 <= i <= 285 for i in top3), top3
    assert bb.spec.mean == (0.5, 0.5, 0.5) and bb.spec.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "name, blocks_tail",
    [
        ("resnet18", ["layer3", "layer4"]),
        ("vgg11", ["features.18", "classifier"]),
        ("efficientnet_lite0", ["conv_head", "bn2"]),
        ("timm:resnet10t", ["layer3", "layer4"]),
    ],
)
def test_head_replaced_and_blocks_named(name, blocks_tail):
    bb = create_backbone(name, num_classes=3, pretrained=False)
    assert bb.blocks[-2:] == blocks_tail
    assert bb.model.head.out_features == 3
    with torch.inference_mode():
        out = bb.model.eval()(torch.zeros(2, 3, bb.spec.input_size, bb.spec.input_size))
    assert out.shape == (2, 3)


def test_inception_aux_head_replaced_too():
    bb = create_backbone("inception_v3", num_classes=4, pretrained=False)
    assert bb.spec.input_size == 299
    assert bb.model.aux_head().out_features == 4
    logits, aux = bb.model.train()(torch.zeros(2, 3, 299, 299))
    assert logits.shape == aux.shape == (2, 4)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(BackboneError) as err:
        create_backbone("resnet81", 2)
    assert "did you mean: resnet18" in str(err.value)
    with pytest.raises(BackboneError, match="timm has no model 'resnett18'"):
        create_backbone("timm:resnett18", 2)


def test_offline_download_error_names_file_and_remedies(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import urllib.request

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(BackboneError) as err:
        create_backbone("resnet18", 2)
    msg = str(err.value)
    assert "--weights PATH" in msg and "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg


def test_local_weights_file(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    ref = resnet18()
    save_file(ref.state_dict(), str(tmp_path / "r18.safetensors"))
    bb = create_backbone("resnet18", 2, weights=tmp_path / "r18.safetensors")
    assert torch.equal(bb.model.features.conv1.weight, ref.conv1.weight)
    torch.save({"conv1.weight": ref.conv1.weight}, tmp_path / "partial.pth")
    with pytest.raises(BackboneError, match="do not fit resnet18"):
        create_backbone("resnet18", 2, weights=tmp_path / "partial.pth")


def test_list_backbones_reports_offline_embedded():
    infos = {i.name: i for i in list_backbones()}
    assert infos["efficientnet_lite0"].offline and infos["efficientnet_lite0"].input_size == 224
    assert infos["resnet18"].params == 11_689_512
    assert infos["inception_v3"].input_size == 299


def test_timm_models_use_timms_own_classifier_surface():
    """reset_classifier(0) leaves the pooled features; the new head sits on num_features."""
    bb = create_backbone("timm:resnet10t", num_classes=5, pretrained=False)
    assert bb.model.num_features == bb.model.features.num_features == 512
    assert isinstance(bb.model.features.get_classifier(), torch.nn.Identity)
    with torch.inference_mode():
        assert bb.model.features.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    lite = create_backbone("efficientnet_lite0", num_classes=2, pretrained=False).model
    assert not [k for k in lite.state_dict() if k.startswith("features.classifier")]


def test_backbone_is_not_mutated():
    import dataclasses

    bb = create_backbone("efficientnet_lite0", num_classes=2, pretrained=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bb.spec = bb.spec.with_size(160)
    assert dataclasses.replace(bb, spec=bb.spec.with_size(160)).spec.input_size == 160


def test_a_weights_file_that_is_no_weights_says_so(tmp_path):
    from graft.models.weights import load_state_dict_file

    text = tmp_path / "notimg.txt"
    text.write_text("not weights\n")
    with pytest.raises(
        BackboneError,
        match=r"notimg.txt is not a torch weights file that can be "
        r"read \(\w+",
    ):
        load_state_dict_file(text)


def test_concatenated_backbones_are_one_network_with_every_feature():
    bb = create_backbone("efficientnet_lite0+efficientnet_lite2", 3, pretrained=False)
    assert bb.spec.input_size == 260  # the largest member's preprocessing
    assert bb.model.num_features == 2 * 1280 and bb.blocks[0] == "trunks.0.conv_stem"
    with torch.no_grad():
        assert bb.model(torch.randn(2, 3, 260, 260)).shape == (2, 3)
        assert bb.model.features(torch.randn(1, 3, 224, 224)).shape == (1, 2560)


@pytest.mark.parametrize(
    "name, kw, message",
    [
        ("efficientnet_lite0+efficientnet_lite0", {}, "name two or more different backbones"),
        ("efficientnet_lite0+", {}, "name two or more different backbones"),
        ("efficientnet_lite0+resnet18", {}, "normalise images differently"),
        ("efficientnet_lite0+efficientnet_lite1", {"weights": "w.pt"}, "--weights is one state"),
    ],
)
def test_concatenations_that_cannot_be_are_refused(name, kw, message):
    with pytest.raises(BackboneError, match=message):
        create_backbone(name, 3, pretrained=False, **kw)


@pytest.mark.parametrize("kind, exponent", [("root4", 0.25), ("power", 0.5)])
def test_power_normalised_head_scales_each_backbone_on_its_own(kind, exponent):
    bb = create_backbone("efficientnet_lite0+efficientnet_lite2", 3, pretrained=False)
    plain = {k: v.clone() for k, v in bb.model.head.state_dict().items()}
    set_feature_norm(bb, kind)
    head = bb.model.head
    assert isinstance(head, NormedLinear) and head.parts == (1280, 1280)
    assert head.exponent == exponent
    two = torch.tensor([[16.0, 1.0] + [0.0] * 1278 + [0.0] * 1280])  # 16 and 1: 2:1 or 4:1
    ratio = head.normalise(two)[0, 0] / head.normalise(two)[0, 1]
    assert torch.allclose(ratio, torch.tensor(16.0**exponent))
    assert head.state_dict().keys() == plain.keys()  # the same weights file as a plain head
    assert all(torch.equal(head.state_dict()[k], v) for k, v in plain.items())
    x = torch.cat([torch.full((1, 1280), 4.0), torch.zeros(1, 1280)], 1)
    seen = head.normalise(x)
    # the first part square-rooted to 2s, then unit length; the all-zero second part stays 0
    assert torch.allclose(seen[0, :1280].norm(), torch.tensor(1.0))
    assert torch.equal(seen[0, 1280:], torch.zeros(1280))
    assert torch.allclose(head(x), torch.nn.functional.linear(seen, head.weight, head.bias))
    neg = head.normalise(-x)  # the sign is kept: features of other backbones can be negative
    assert torch.allclose(neg, -seen)
    x.requires_grad_(True)  # Grad-CAM differentiates through it: no infinite slope at 0
    head(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(BackboneError, match="choose root4, power or none"):
        set_feature_norm(bb, "cube")


def test_flip_tta_averages_each_image_with_its_mirror_in_one_pass():
    calls = []

    def features(t):  # a features network that sees left from right: column-weighted sums
        calls.append(t.shape[0])
        return (t * torch.arange(t.shape[-1], dtype=t.dtype)).sum((2, 3))

    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    plain, read = view_features(features, x, "flip")
    assert calls == [6]  # the images and their mirrors batched together
    assert torch.allclose(plain, features(x))
    assert torch.allclose(read, (features(x) + features(x.flip(-1))) / 2)
    assert not torch.allclose(read, plain)
    for off in (None, "none"):
        a, b = view_features(features, x, off)
        assert a is b and torch.allclose(a, plain)
    with pytest.raises(BackboneError, match="unknown test-time augmentation 'rotate'"):
        view_features(features, x, "rotate")


def test_a_weights_file_with_values_that_are_not_numbers_is_refused(tmp_path):
    from safetensors.torch import save_file

    from graft.models.weights import load_state_dict_file

    state = {"a.weight": torch.ones(3), "b.weight": torch.tensor([1.0, float("nan")])}
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(
        BackboneError,
        match=r"w.safetensors holds values that are not finite numbers \(NaN or infinity\) in 1 "
        r"tensor\(s\), e.g. b.weight: saved from a training that diverged",
    ):
        load_state_dict_file(tmp_path / "w.safetensors")
