"""graft's own Grad-CAM against pytorch-grad-cam's, which it replaces in the report's path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from graft.core.runtime import resolve_runtime
from graft.inference.classifier import Classifier
from graft.inference.explain import gradcam, target_layer
from graft.models.backbones import create_backbone


def _classifier(name: str) -> Classifier:
    torch.manual_seed(0)
    bb = create_backbone(name, 3, pretrained=False)
    return Classifier(bb, ["a", "b", "c"], resolve_runtime("cpu", "fp32"))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_gradcam_equals_pytorch_grad_cam(name):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    clf = _classifier(name)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 130, 3), np.uint8))
    x = clf.preprocess(img)[None]
    model = clf.model.float().eval()
    layer = target_layer(model, clf.backbone.blocks, clf.spec.input_size)
    logits, maps_of = gradcam(model, layer, x)
    ours = maps_of([0, 1, 2])
    with GradCAM(model=model, target_layers=[layer]) as cam:
        theirs = [cam(input_tensor=x, targets=[ClassifierOutputTarget(c)])[0] for c in range(3)]
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (clf.spec.input_size,) * 2
        assert np.abs(a - b).max() < 1e-3
        assert a.min() >= 0 and a.max() <= 1 + 1e-6
    assert max(a.max() for a in ours) == pytest.approx(1.0, abs=1e-5)  # not all flat
    with torch.inference_mode():
        assert torch.allclose(logits.detach(), model(x), atol=1e-5)


def test_gradcam_of_a_frozen_network():
    """The model a training run leaves has requires_grad off on its frozen blocks: the map
    still has its gradient, and the weights still none."""
    clf = _classifier("efficientnet_lite0")
    for p in clf.model.parameters():
        p.requires_grad_(False)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), np.uint8))
    [m] = clf.explain(img, "gradcam", classes=1)
    assert m.heatmap.shape == (224, 224) and m.heatmap.max() == pytest.approx(1.0, abs=1e-5)
    assert all(p.grad is None for p in clf.model.parameters())
