"""Export: `model.onnx` with the normalisation inside and softmax out, checked against PyTorch.

The graph takes `image`: float32 N x 3 x H x W RGB in [0, 1], resized and cropped as model.json
says (graft's own preprocessing code does that: `transforms.build_transforms(normalize=False)`),
and returns `probabilities`: N x C (calibrated) and, for a model with an unknown score,
`unknown_score`: N (the training features it measures against are inside the graph). Class names,
preprocessing, backbone, graft's version and the decision thresholds travel in the file's
metadata. Every export is run with ONNX Runtime on real images of the run
and compared with PyTorch before it replaces anything; a file that disagrees is not kept.
Needs the `graft[export]` extra (onnx, onnxruntime, onnxscript), imported here only.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.constants import EXPORT_PROBABILITY_PARITY, ONNX_OPSET
from ..core.errors import ConfigError, GraftError
from ..core.runfolder import SPLIT
from ..core.runtime import atomic_path
from ..data.transforms import PreprocessSpec
from ..models.heads import view_features
from ..models.onnx import check_opset, export_onnx
from .classifier import Classifier, OnnxClassifier
from .onnxfile import FORMAT, require

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
CHECK_IMAGES = 16


class ExportError(GraftError):
    """The exported model does not reproduce the PyTorch one (or cannot be written)."""


@dataclass
class ExportResult:
    path: Path
    images: int  # how many images the parity check ran
    max_abs_diff: float  # largest |p_onnx - p_torch| over those images and classes
    top1_agreement: float  # share of images with the same top class
    source: str  # "val split" or "generated"


class _WithPreprocessing(nn.Module):
    """image in [0, 1] -> normalise -> features -> head -> logits / temperature -> softmax: the
    calibrated probabilities `graft predict` gives, computed inside the graph (with flip TTA, both
    passes: models/heads.view_features); with `references`, the unknown score too
    (core/decisions.knn_distance, written out for the exporter)."""

    def __init__(
        self,
        net: nn.Module,
        spec: PreprocessSpec,
        temperature: float = 1.0,
        references: torch.Tensor | None = None,
        k: int = 1,
        tta: str | None = None,
    ):
        super().__init__()
        self.net, self.tta = net, tta
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        ref = None if references is None else references.float().T.contiguous()
        self.register_buffer("references", ref)  # None: no unknown score
        self.k = k

    def forward(self, image: torch.Tensor):
        feats, read = view_features(self.net.features, (image - self.mean) / self.std, self.tta)
        probs = (self.net.head(read) / self.temperature).softmax(1)
        if self.references is None:
            return probs
        sims = torch.nn.functional.normalize(feats, dim=1) @ self.references
        return probs, 1.0 - sims.topk(self.k, dim=1).values[:, -1]


def export(
    run_dir: str | Path,
    out: str | Path | None = None,
    opset: int = ONNX_OPSET,
    dynamic_batch: bool = True,
) -> ExportResult:
    """Write `RUN/model.onnx` (or `out`) and check it against the PyTorch model.

    >>> graft.export("runs/demo").max_abs_diff  # doctest: +SKIP
    2.9e-08
    """
    require()
    check_opset(opset)  # before loading anything: an opset the exporter would not write
    run_dir = Path(run_dir)
    clf = Classifier.load(run_dir, device="cpu", precision="fp32")
    out = Path(out) if out is not None else run_dir / ONNX_FILE
    _check_writable(out)
    model = _WithPreprocessing(
        clf.model.to(memory_format=torch.contiguous_format),
        clf.spec,
        clf.temperature,
        clf.references,
        clf.unknown_k,
        clf.tta,
    )
    model.eval()
    size = clf.spec.input_size
    with tempfile.TemporaryDirectory(prefix="graft-export-") as work:
        raw = Path(work) / "raw.onnx"  # the exporter may put weights beside it in raw.onnx.data
        outputs = ["probabilities"] + (["unknown_score"] if clf.references is not None else [])
        _export_graph(model, raw, size, opset, dynamic_batch, outputs)
        proto = _with_meta(raw, clf, opset, dynamic_batch)
    with atomic_path(out) as tmp:  # one self-contained file, kept only if it agrees
        _save(proto, tmp)
        result = check_parity(clf, tmp, run_dir, dynamic_batch)
        if result.max_abs_diff > EXPORT_PROBABILITY_PARITY or result.top1_agreement < 1.0:
            raise ExportError(
                f"the exported model disagrees with PyTorch on {result.images} {result.source} "
                f"image(s): max |p_onnx - p_torch| = {result.max_abs_diff:.2e} (limit "
                f"{EXPORT_PROBABILITY_PARITY:.0e}), top-1 agreement "
                f"{result.top1_agreement:.1%}; nothing was written (try another --opset)"
            )
    result.path = out
    return result


def _check_writable(out: Path) -> None:
    """Refuse, before the minutes of work, a place the file cannot go."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the file, e.g. {out / ONNX_FILE}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {out}: the folder {parent} cannot be written; choose another")


def _export_graph(
    model: nn.Module, path: Path, size: int, opset: int, dynamic: bool, outputs: list[str]
) -> None:
    try:
        export_onnx(model, path, size, outputs, opset=opset, dynamic_batch=dynamic)
    except Exception as exc:  # the exporter raises many types; the message is what matters
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {exc}") from exc


def _with_meta(path: Path, clf: Classifier, opset: int, dynamic: bool):
    """The exported graph with its weights inline and graft's metadata added."""
    import onnx

    from ..models.modelfile import versions

    proto = onnx.load(str(path))  # external weights, if any, are read in
    meta = {
        "format": FORMAT,
        "classes": json.dumps(clf.classes, ensure_ascii=False),
        "preprocess": json.dumps(clf.spec.to_dict()),
        "backbone": clf.meta.backbone,
        "graft_version": versions().get("graft", ""),
        "max_pixels": str(clf.max_pixels),
        "opset": str(opset),
        "dynamic_batch": str(dynamic).lower(),
        "input": "image: float32 N x 3 x H x W, RGB in [0, 1], resized and center-cropped",
        "output": "probabilities: float32 N x C (softmax), classes in metadata 'classes'",
        "temperature": str(clf.temperature),  # already applied inside the graph
        "tta": clf.tta or "none",  # flip: the mirror image's features averaged in, inside too
        # how the outputs become a decision: core/decisions.py, docs/GUIDE.md has it in Python
        "decision": json.dumps(
            {
                "thresholds": clf.policy.to_dict(),
                "unknown_threshold": clf.policy.unknown_threshold,
                "unknown_k": clf.unknown_k if clf.references is not None else None,
            },
            ensure_ascii=False,
        ),
    }
    if clf.references is not None:
        meta["output"] += (
            "; unknown_score: float32 N (1 - cosine similarity to the k-th nearest training image)"
        )
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"graft {clf.meta.backbone} classifier: {', '.join(clf.classes)}"
    return proto


def _save(proto, path: Path) -> None:
    import onnx

    try:
        onnx.save(proto, str(path), save_as_external_data=False)
    except ValueError as exc:  # protobuf's 2 GB limit
        raise ExportError(f"the model is too large for one ONNX file ({exc})") from exc


def check_parity(
    clf: Classifier, onnx_path: Path, run_dir: Path, dynamic_batch: bool = True
) -> ExportResult:
    """Run both models on up to CHECK_IMAGES images of the run's val split (generated ones if the
    images are gone): the largest probability difference and the top-1 agreement."""
    images, source = _check_images(clf, run_dir)
    onnx_clf = OnnxClassifier(onnx_path)
    if dynamic_batch:
        p_onnx, u_onnx = onnx_clf.scores(images, batch_size=8)
    else:  # a fixed-batch graph takes exactly the batch it was exported with
        pairs = [onnx_clf.scores(images[i : i + 2], 2) for i in range(0, len(images) - 1, 2)]
        p_onnx = torch.cat([p for p, _ in pairs])
        u_onnx = None if pairs[0][1] is None else torch.cat([u for _, u in pairs])
        images = images[: len(p_onnx)]
    p_torch, u_torch = clf.scores(images, batch_size=8)
    diff = float((p_onnx - p_torch).abs().max())
    if (u_onnx is None) != (u_torch is None):
        raise ExportError("the exported graph's unknown_score output does not match the model")
    if u_torch is not None:  # the unknown score, on the same scale as the probabilities
        diff = max(diff, float((u_onnx - u_torch).abs().max()))
    agree = float((p_onnx.argmax(1) == p_torch.argmax(1)).float().mean())
    return ExportResult(onnx_path, len(images), diff, agree, source)


def _check_images(clf: Classifier, run_dir: Path) -> tuple[list, str]:
    from ..data.splits import load_split

    try:
        val = [p for p, _ in load_split(run_dir / SPLIT).val]
        picked = val[:: max(1, len(val) // CHECK_IMAGES)][:CHECK_IMAGES]
        if picked and all(Path(p).is_file() for p in picked):
            return picked, "val split"
    except GraftError:
        pass
    g = torch.Generator().manual_seed(0)
    size = clf.spec.resize_size
    return [torch.rand(3, size, size, generator=g) for _ in range(CHECK_IMAGES)], "generated"
