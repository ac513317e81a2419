"""Explanations: where the network looked for each of its top classes (Grad-CAM or Shapley values).

Grad-CAM (Selvaraju et al. 2017) is fast and unsigned: graft computes it itself, as
pytorch-grad-cam's `GradCAM` does (channel weights = the class logit's gradient averaged over the
map, ReLU of the weighted sum, min-max scaled, bilinear up to the input; tests/inference compares
the two), in one forward pass for every class asked. Importing pytorch-grad-cam costs about 2 s
(it loads scikit-learn and OpenCV for methods graft does not use), more than the whole
explanation, and the report draws one each run. `shap` is Kernel SHAP (captum, the
`graft[explain]` extra, imported only here, when asked for) over a grid of image patches: signed
Shapley values, red pushing towards the class and blue away from it. A model with flip
test-time augmentation names the classes and probabilities predict gives (the image and its
mirror averaged); its maps explain the image as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import GraftError
from ..core.runtime import Runtime
from ..data.transforms import PreprocessSpec
from ..models.backbones import Backbone
from ..models.heads import view_features

log = logging.getLogger(__name__)

METHODS = ("gradcam", "shap")
# Kernel SHAP over a 6x6 grid of patches with 192 sampled coalitions per class. On the patch test
# (tests/outputs/test_report.py) this put the attribution inside the deciding patch on 6/6 images
# (inside/outside 3.0-97x, 7.5 s per image on 2 cores); 8x8 stayed noisy even at 400 coalitions.
SHAP_GRID = 6
SHAP_SAMPLES = 192


class Explainable(Protocol):
    """What explaining needs of a classifier (predict.Classifier has it; this module never
    imports predict, so the dependency runs one way: predict -> explain)."""

    backbone: Backbone
    classes: list[str]
    model: nn.Module
    runtime: Runtime
    spec: PreprocessSpec

    def preprocess(self, image: Any) -> torch.Tensor: ...


@dataclass
class Explanation:
    class_name: str
    probability: float
    heatmap: np.ndarray  # (H, W) at the network's input size; gradcam in [0, 1], shap signed


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise GraftError(f"explanations need the {module} package: pip install 'graft[explain]'")


def target_layer(model: nn.Module, blocks: list[str], input_size: int) -> nn.Module:
    """The last named block whose output is still a spatial map (N, C, H, W)."""
    features = model.features
    shapes: dict[str, tuple] = {}
    hooks = [
        features.get_submodule(b).register_forward_hook(
            lambda m, i, o, b=b: shapes.__setitem__(b, tuple(o.shape) if torch.is_tensor(o) else ())
        )
        for b in blocks
    ]
    try:
        with torch.inference_mode():
            device = next(model.parameters()).device  # explain runs where the model is
            model.eval()(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    spatial = [b for b in blocks if len(shapes.get(b, ())) == 4]
    if not spatial:
        raise GraftError("this backbone has no spatial block to explain")
    return features.get_submodule(spatial[-1])


def explain(
    clf: Explainable, image: Any, method: str = "gradcam", classes: int = 2
) -> tuple[torch.Tensor, list[Explanation]]:
    """(the input tensor, one Explanation per top-k class).

    >>> x, maps = clf.explain("cat.jpg", method="gradcam")  # doctest: +SKIP
    >>> maps[0].class_name, maps[0].heatmap.shape
    ('approved', (224, 224))
    """
    if method not in METHODS:
        raise GraftError(f"unknown explanation method {method!r}; choose gradcam or shap")
    x = clf.preprocess(image)[None].to(clf.runtime.device)
    model = clf.model.float().eval()
    k = max(1, min(classes, len(clf.classes)))
    tta = getattr(clf, "tta", None)
    if method == "gradcam":
        layer = target_layer(model, clf.backbone.blocks, clf.spec.input_size)
        logits, maps_of = gradcam(model, layer, x)
    if method != "gradcam" or tta:  # the classes and probabilities predict gives (with flip
        # TTA, the mirror averaged in); the maps explain the image as it is
        with torch.inference_mode():
            logits = model.head(view_features(model.features, x, tta)[1])
    probs = (logits.detach().float() / clf.temperature).softmax(1)[0].cpu()  # as predict gives
    top = probs.topk(k)
    idx = top.indices.tolist()
    maps = maps_of(idx) if method == "gradcam" else _shap(model, x, idx)
    return x[0].cpu(), [
        Explanation(clf.classes[i], float(p), m) for i, p, m in zip(idx, top.values.tolist(), maps)
    ]


def gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor):
    """Grad-CAM of one image `x` (1, 3, H, W) at `layer`'s output: (the logits (1, C), a function
    from class indices to their heatmaps, (H, W) arrays in [0, 1]). One forward pass; each class
    is one backward pass through the part of the network above `layer`. Works on a network whose
    weights are frozen: the map itself is made the leaf the gradients are taken for."""
    captured: list[torch.Tensor] = []

    def leaf(module, inputs, output):
        captured.append(output.detach().requires_grad_())
        return captured[-1].clone()  # what follows may work in place (VGG's ReLU(inplace=True))

    hook = layer.register_forward_hook(leaf)
    try:
        with torch.enable_grad():
            logits = model(x.detach())
    finally:
        hook.remove()
    (a,) = captured

    def maps_of(classes: list[int]) -> list[np.ndarray]:
        out = []
        for n, c in enumerate(classes):
            (g,) = torch.autograd.grad(logits[0, c], a, retain_graph=n + 1 < len(classes))
            cam = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).detach().float()
            cam = _unit(cam.clamp_min(0))
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
            out.append(_unit(cam.clamp_min(0))[0, 0].cpu().numpy())
        return out

    return logits, maps_of


def _unit(m: torch.Tensor) -> torch.Tensor:
    """Min-max scaled to [0, 1], as pytorch-grad-cam's scale_cam_image (a flat map stays 0)."""
    m = m - m.amin()
    return m / (1e-7 + m.amax())


def _shap(model: nn.Module, x: torch.Tensor, idx: list[int]) -> list:
    _require("captum")
    from captum.attr import KernelShap

    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device) * SHAP_GRID // h
    cols = torch.arange(w, device=x.device) * SHAP_GRID // w
    mask = (rows[:, None] * SHAP_GRID + cols[None, :]).expand(1, 3, h, w)
    # Explain logits, as shap does for classifiers: a softmax near 1.0 barely moves when one
    # patch of the evidence is removed, and the Shapley estimate drowns in sampling noise.
    explainer = KernelShap(lambda t: model(t).float())
    torch.manual_seed(0)  # Kernel SHAP samples coalitions: same image, same map
    out = []
    for i in idx:
        attr = explainer.attribute(
            x,
            baselines=0.0,
            target=i,
            feature_mask=mask,
            n_samples=SHAP_SAMPLES,
            perturbations_per_eval=32,
        )
        out.append(attr[0].sum(0).detach().cpu().numpy())
    return out


def overlay_png(image: torch.Tensor, heatmap: np.ndarray, spec: PreprocessSpec) -> bytes:
    """The network's input image with a Grad-CAM heatmap (jet, [0, 1]) blended over it: PNG."""
    import io

    from matplotlib import colormaps
    from PIL import Image

    from ..data.transforms import denormalize

    rgb = denormalize(image, spec).permute(1, 2, 0).numpy()
    heat = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3]
    mixed = (0.55 * rgb + 0.45 * heat) * 255
    buf = io.BytesIO()
    Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def explanation_figure(
    image: torch.Tensor, maps: list[Explanation], spec, method: str, title: str | None = None
):
    """The image, then one heatmap overlay per class titled with class and probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.transforms import denormalize

    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(3 * (1 + len(maps)), 3.2))
    draw_explanations(
        axes, denormalize(image, spec).permute(1, 2, 0).numpy(), maps, method, title or "image"
    )
    fig.tight_layout()
    return fig


def draw_explanations(
    axes, rgb: np.ndarray, maps: list[Explanation], method: str, title: str
) -> None:
    """One row of axes: the image, then its heatmap per class (gradcam: jet over [0, 1]; shap:
    signed bwr, symmetric around 0), each titled with class and probability."""
    axes[0].imshow(rgb)
    axes[0].set_title(title, fontsize=9)
    for ax, m in zip(axes[1:], maps):
        ax.imshow(rgb)
        if method == "shap":
            lim = float(np.abs(m.heatmap).max()) or 1.0
            ax.imshow(m.heatmap, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.55)
        else:
            ax.imshow(m.heatmap, cmap="jet", vmin=0, vmax=1, alpha=0.45)
        ax.set_title(f"{m.class_name} {m.probability:.2f}", fontsize=9)
    for ax in axes:
        ax.axis("off")


def explain_files(
    clf: Explainable,
    paths: list[str | Path],
    out_dir: str | Path,
    method: str = "gradcam",
    classes: int = 2,
) -> list[Path]:
    """One PNG per image in `out_dir`, named after the image file (never after a class)."""
    import matplotlib.pyplot as plt

    from ..core.runtime import atomic_path, safe_filename

    out_dir = Path(out_dir)
    written = []
    for n, path in enumerate(paths):
        x, maps = explain(clf, path, method, classes)
        fig = explanation_figure(x, maps, clf.spec, method, Path(path).name)
        target = out_dir / f"{n:03d}-{safe_filename(Path(path).stem)}-{method}.png"
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        written.append(target)
    return written
