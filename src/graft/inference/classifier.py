"""Prediction: a `Classifier` loaded from a run folder gives class probabilities for images."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..core.calibration import raw_probabilities
from ..core.calibration import scores as calibration_scores
from ..core.constants import MAX_PIXELS
from ..core.decisions import Policy, knn_distance, normalise, operating_report
from ..core.errors import CheckpointError, ConfigError, DatasetError, GraftError, ImageError
from ..core.metrics import classification_report, confusion_matrix, most_confused
from ..core.runtime import Runtime, default_workers, resolve_runtime
from ..data.discovery import labelled_samples
from ..data.images import load_image, prepare_image
from ..data.splits import Sample
from ..data.transforms import build_transforms
from ..frozen.networks import fold_batchnorm
from ..models.backbones import Backbone
from ..models.heads import view_features
from ..models.modelfile import ModelMeta, load_model, load_reference

log = logging.getLogger(__name__)

ImageLike = str | Path | bytes | Image.Image | np.ndarray | torch.Tensor
ACCEPTED = (
    "a file path (str or Path), the file's bytes, a PIL image, a numpy array "
    "(H x W or H x W x 3, uint8) or a tensor (3 x H x W, uint8 or float in [0, 1])"
)


@dataclass
class Prediction:
    """One file's result: probabilities (highest first), the decision (a class, "unknown" or
    "review": core/decisions.py) and the unknown score (None for a model without one), or the
    reason it could not be read."""

    path: str
    probs: dict[str, float] | None
    error: str | None = None
    decision: str | None = None
    unknown: float | None = None


class Classifier:
    """A trained network with its classes and preprocessing (an exported one: OnnxClassifier).

    >>> clf = graft.load("runs/demo")  # doctest: +SKIP
    >>> clf.predict(["shirt.png"], top_k=2)
    [{'tshirt_top': 0.91, 'dress': 0.05}]
    """

    def __init__(
        self,
        backbone: Backbone,
        classes: list[str],
        runtime: Runtime,
        meta: ModelMeta | None = None,
        temperature: float | None = None,
        policy: Policy | None = None,
        references: torch.Tensor | None = None,
        tta: str | None = None,
    ):
        self.backbone = backbone
        self.classes = list(classes)
        self.runtime = runtime
        self.meta = meta  # model.json, for a classifier loaded from a run folder
        # logits / temperature before the softmax: calibrated probabilities (core/calibration.py)
        self.temperature = temperature or (meta.temperature if meta is not None else 1.0)
        # how probabilities become decisions, and the training features the unknown score
        # measures against (L2-normalised; None: no unknown score)
        self.policy = policy or (meta.policy if meta is not None else Policy(tuple(classes)))
        self.references = references.float() if references is not None else None
        self.unknown_k = (meta.unknown or {}).get("k", 1) if meta is not None else 1
        # "flip": the head reads each image's features averaged with its mirror's (one more
        # forward pass); None: each image once. Settable: `clf.tta = None` trades it for speed
        self.tta = tta or (meta.tta if meta is not None else None)
        self.spec = backbone.spec
        self.max_pixels = (meta.max_pixels if meta is not None else None) or MAX_PIXELS
        # channels_last where it pays: about 2x faster convolutions on CPU (oneDNN) and cuDNN
        self.model = runtime.prepare(backbone.model).eval()
        self._transform = build_transforms(self.spec, train=False)
        self._folded: torch.nn.Module | None = None  # built at the first prediction
        self._folding = threading.Lock()

    @classmethod
    def load(
        cls, run_dir: str | Path, device: str = "auto", precision: str = "fp32", local_rank: int = 0
    ) -> Classifier:
        """Load from a run folder alone. fp32 by default so probabilities are reproducible.
        `local_rank`: which GPU of the machine (under torchrun, each process its own)."""
        backbone, meta = load_model(run_dir)
        references = load_reference(run_dir, meta, backbone.model.num_features)
        runtime = resolve_runtime(device, precision, local_rank=local_rank)
        return cls(backbone, meta.classes, runtime, meta, references=references)

    def with_decisions(
        self, policy: Policy, references: torch.Tensor | None = None, k: int = 1
    ) -> Classifier:
        """This classifier deciding by `policy`, with the unknown score against `references`
        (features of training images, L2-normalised) at the k-th neighbour."""
        self.policy, self.unknown_k = policy, k
        self.references = references.float() if references is not None else None
        return self

    def preprocess(self, image: ImageLike) -> torch.Tensor:
        """One image (path, bytes or PIL image) -> the normalised (3, H, W) tensor the network
        takes; raises `ImageError` for a file that cannot be read."""
        if isinstance(image, (np.ndarray, torch.Tensor)):
            image = _array_to_image(image)
        if isinstance(image, Image.Image):
            return self._transform(prepare_image(image))
        return self._transform(load_image(image, self.spec.resize_size, max_pixels=self.max_pixels))

    def probabilities(self, images: Sequence[ImageLike], batch_size: int = 32) -> torch.Tensor:
        """(N, C) probabilities; raises `ImageError` for a file that cannot be read."""
        return self.scores(images, batch_size)[0]

    def scores(
        self, images: Sequence[ImageLike], batch_size: int = 32
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, C) probabilities and (N,) unknown scores (None for a model without them);
        raises `ImageError` for a file that cannot be read."""
        images = as_image_list(images)
        out = [
            self._forward([self.preprocess(im) for im in images[i : i + batch_size]])
            for i in range(0, len(images), batch_size)
        ]
        if not out:
            return torch.zeros(0, len(self.classes)), None
        probs = torch.cat([p for p, _ in out])
        unknown = None if out[0][1] is None else torch.cat([u for _, u in out])
        return probs, unknown

    def features(self, images: Sequence[ImageLike], batch_size: int = 32) -> torch.Tensor:
        """(N, D) L2-normalised features, the vectors the head reads: what the unknown score
        (and a folder audit) compares images by."""
        images = as_image_list(images)
        out = [
            self._features([self.preprocess(im) for im in images[i : i + batch_size]])
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.model.num_features)

    def features_files(
        self, paths: Sequence[ImageLike], batch_size: int = 32
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[Prediction]]:
        """Features (N, D, L2-normalised) and probabilities (N, C) of the files that read, in one
        pass, with their indices in `paths`; the ones that did not read, with their errors."""
        paths = as_image_list(paths)
        feats, probs, kept, bad = [], [], [], []
        for i in range(0, len(paths), batch_size):
            tensors = []
            for j, p in enumerate(paths[i : i + batch_size]):
                try:
                    tensors.append(self.preprocess(p))
                    kept.append(i + j)
                except ImageError as exc:
                    bad.append(Prediction(_label(p), None, exc.reason))
            if tensors:
                f, p = self._features(tensors, with_probs=True)
                feats.append(f)
                probs.append(p)
        if not feats:
            return (
                torch.zeros(0, self.model.num_features),
                torch.zeros(0, len(self.classes)),
                [],
                bad,
            )
        return torch.cat(feats), torch.cat(probs), kept, bad

    def predict(
        self, images: Sequence[ImageLike], top_k: int | None = None, batch_size: int = 32
    ) -> list[dict[str, float]]:
        """For each image, {class: probability}, highest first (all classes, or the top k)."""
        check_top_k(top_k)
        probs = self.probabilities(as_image_list(images), batch_size)
        return [self._top(p, top_k) for p in probs]

    def stacked(self, preds: Sequence[Prediction]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The predictions that read, as tensors: probabilities (N, C) in class order (made with
        top_k=None) and unknown scores (N,), None for a model without them."""
        good = [p for p in preds if p.probs is not None]
        probs = torch.tensor([[p.probs[c] for c in self.classes] for p in good])
        unknown = None
        if good and good[0].unknown is not None:
            unknown = torch.tensor([p.unknown for p in good])
        return probs.reshape(-1, len(self.classes)), unknown

    def redecide(self, preds: Sequence[Prediction]) -> list[Prediction]:
        """The same predictions decided by this classifier's policy as it is now (all classes'
        probabilities needed: predictions made with top_k=None)."""
        decisions = iter(self.policy.decide(*self.stacked(preds)))
        return [dataclasses.replace(p, decision=next(decisions)) if p.probs else p for p in preds]

    def decide(self, images: Sequence[ImageLike], batch_size: int = 32) -> list[str]:
        """For each image its decision: a class, "unknown" (none of these) or "review"
        (no class clears its threshold, or several do): core/decisions.py."""
        return self.policy.decide(*self.scores(images, batch_size))

    def _top(self, p: torch.Tensor, top_k: int | None) -> dict[str, float]:
        k = len(self.classes) if top_k is None else max(1, min(top_k, len(self.classes)))
        values, idx = p.topk(k)
        return {self.classes[i]: float(v) for v, i in zip(values.tolist(), idx.tolist())}

    def predict_files(
        self,
        paths: Sequence[ImageLike],
        top_k: int | None = None,
        batch_size: int = 32,
        names: Sequence[str] | None = None,
    ) -> list[Prediction]:
        """Like `predict`, but a file that cannot be read gets its error instead of stopping.
        `names` label the results (for bytes or PIL images); paths label themselves."""
        return [
            p for batch in self.iter_predictions(paths, top_k, batch_size, names) for p in batch
        ]

    def iter_predictions(
        self,
        paths: Sequence[ImageLike],
        top_k: int | None = None,
        batch_size: int = 32,
        names: Sequence[str] | None = None,
        workers: int | None = None,
    ) -> Iterator[list[Prediction]]:
        """`predict_files` as a stream: one list of predictions per batch, in input order. The
        next batch decodes in `workers` threads (default: the cores) while this one runs through
        the network, so memory holds two batches whatever the number of files.

        >>> for batch in clf.iter_predictions(paths, top_k=3):  # doctest: +SKIP
        ...     write(batch)
        """
        check_top_k(top_k)
        paths = as_image_list(paths)
        starts = range(0, len(paths), batch_size)
        threads = max(1, workers or default_workers() + 1)
        # one thread hands out the next batch, `threads` decode it: a batch waiting on its
        # images never holds a decoding thread
        with ThreadPoolExecutor(threads) as pool, ThreadPoolExecutor(1) as ahead_of:

            def decode(i: int):
                return i, list(pool.map(self._try_preprocess, paths[i : i + batch_size]))

            ahead = None
            for n, i in enumerate(starts):
                current = ahead.result() if ahead is not None else decode(i)
                if n + 1 < len(starts):  # the next batch decodes while this one computes
                    ahead = ahead_of.submit(decode, starts[n + 1])
                yield self._score_batch(paths, names, *current, top_k)

    def _try_preprocess(self, image: ImageLike) -> torch.Tensor | str:
        """The network's input for `image`, or the reason it cannot be read."""
        try:
            return self.preprocess(image)
        except ImageError as exc:
            return exc.reason

    def decode(self, images: Sequence[ImageLike]) -> list[torch.Tensor | str]:
        """Each image as the network's input, or the reason it cannot be read (no network run:
        callers decode in their own threads and batch the forwards, as `graft serve` does)."""
        return [self._try_preprocess(im) for im in images]

    def forward(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Calibrated probabilities (N, C) and unknown scores (N,) or None of decoded images."""
        return self._forward(tensors)

    def results(
        self,
        labels: Sequence[str],
        decoded: Sequence[torch.Tensor | str],
        probs: torch.Tensor,
        unknown: torch.Tensor | None,
        top_k: int | None = None,
    ) -> list[Prediction]:
        """Predictions from `forward`'s outputs over the decoded images of `decoded` (in order),
        the unreadable ones with their reason."""
        decisions = iter(self.policy.decide(probs, unknown))
        scored = iter(zip(probs, unknown.tolist() if unknown is not None else repeat(None)))
        out = []
        for label, t in zip(labels, decoded):
            if not isinstance(t, torch.Tensor):
                out.append(Prediction(label, None, t))
                continue
            row, u = next(scored)
            out.append(Prediction(label, self._top(row, top_k), None, next(decisions), _round(u)))
        return out

    def _score_batch(self, paths, names, i: int, decoded: list, top_k: int | None):
        probs, unknown = self._forward([t for t in decoded if isinstance(t, torch.Tensor)])
        labels = [
            names[i + j] if names is not None else _label(paths[i + j]) for j in range(len(decoded))
        ]
        return self.results(labels, decoded, probs, unknown, top_k)

    @torch.inference_mode()
    def _forward(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Calibrated probabilities (N, C) and unknown scores (N,) or None."""
        if not tensors:
            return torch.zeros(0, len(self.classes)), None
        feats, probs = self._features(tensors, with_probs=True)
        if self.references is None:
            return probs, None
        return probs, knn_distance(feats, self.references, self.unknown_k)

    @torch.inference_mode()
    def _features(self, tensors: list[torch.Tensor], with_probs: bool = False):
        """L2-normalised features of the images as they are; `with_probs`: and the calibrated
        probabilities, in the same pass (with flip TTA the head reads the mirrored average)."""
        x = self.runtime.batch(torch.stack(tensors))
        with self.runtime.autocast():
            if not with_probs:
                return normalise(self._network()(x).float().cpu())
            feats, read = view_features(self._network(), x, self.tta)
            logits = self.model.head(read)
        probs = (logits.float() / self.temperature).softmax(1).cpu()
        return normalise(feats.float().cpu()), probs

    def _network(self) -> torch.nn.Module:
        """The features network predictions run through: on a CPU, a copy with each BatchNorm
        folded into the convolution before it (frozen/networks.py: the same function, within
        2e-6 in fp32; about 1.5x the images/s of lite0 on 2 cores), made from the weights as they
        are at the first prediction; elsewhere, or without a BatchNorm, the model's own."""
        if self._folded is None:
            with self._folding:  # graft serve predicts from several threads
                if self._folded is None:
                    features = self.model.features
                    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in features.modules())
                    self._folded = (
                        fold_batchnorm(features, self.spec.input_size)
                        if has_bn and self.runtime.device.type == "cpu"
                        else features
                    )
        return self._folded

    def explain(self, image: ImageLike, method: str = "gradcam", classes: int = 2):
        """Heatmaps of where the network looked for its top `classes` classes (see explain.py)."""
        from .explain import explain

        return explain(self, image, method, classes)[1]

    def explanation_png(self, image: ImageLike) -> bytes:
        """The image as the network saw it with the Grad-CAM map of its top class: PNG bytes."""
        from .explain import explain, overlay_png

        x, maps = explain(self, image, "gradcam", 1)
        return overlay_png(x, maps[0].heatmap, self.spec)

    def evaluate(
        self,
        data_dir: str | Path,
        labels: str | Path | None = None,
        path_column: str | None = None,
        label_column: str | None = None,
    ) -> dict[str, Any]:
        """Accuracy, per-class report and confusion matrix on a folder of class folders
        (or on its test/ or val/ split when it has one), or on the images a labels table names
        (its test rows, else its val rows, else all)."""
        samples = labelled_samples(data_dir, self.classes, labels, path_column, label_column)
        return self.evaluate_samples(samples)

    def evaluate_samples(
        self, samples: Sequence[Sample], preds: Sequence[Prediction] | None = None
    ) -> dict[str, Any]:
        """The evaluation report for labelled samples (`preds`: their predictions, if known)."""
        if preds is None:
            preds = self.predict_files([p for p, _ in samples])
        good = [(s, p) for s, p in zip(samples, preds) if p.probs is not None]
        if samples and not good:
            reasons = "; ".join(f"{p.path}: {p.error}" for p in preds[:3])
            more = ", ..." if len(preds) > 3 else ""
            raise DatasetError(
                f"none of the {len(samples)} image(s) could be read ({reasons}"
                f"{more}); graft verify lists them all"
            )
        targets = [y for (_, y), _ in good]
        predicted = [self.classes.index(next(iter(p.probs))) for _, p in good]
        cm = confusion_matrix(targets, predicted, len(self.classes))
        report = classification_report(cm, self.classes)
        report["most_confused"] = most_confused(cm, self.classes)
        probs, unknown = self.stacked(preds)
        report["calibration"] = self._calibration(probs, targets)
        decisions = self.policy.decide(probs, unknown)
        report["decisions"] = operating_report(decisions, targets, self.classes)
        report["skipped"] = [{"path": p.path, "reason": p.error} for p in preds if p.error]
        return report

    def _calibration(self, probs: torch.Tensor, targets: list[int]) -> dict[str, Any]:
        """ECE (15 bins), NLL, mean confidence and accuracy of the probabilities given, and of the
        raw softmax they came from (`temperature` 1: the same)."""
        labels = torch.tensor(targets, dtype=torch.long)
        return {
            "temperature": self.temperature,
            "calibrated": calibration_scores(probs, labels),
            "raw": calibration_scores(raw_probabilities(probs, self.temperature), labels),
        }


def as_image_list(images: ImageLike | Iterable[ImageLike]) -> list[ImageLike]:
    """One image or any iterable of images (list, tuple, generator) -> a list of images."""
    if isinstance(images, (str, Path, bytes, bytearray, Image.Image, np.ndarray, torch.Tensor)):
        return [images]
    try:
        return list(images)
    except TypeError:
        raise GraftError(
            f"cannot read images from a {type(images).__name__}: pass {ACCEPTED}, or a list of them"
        ) from None


def _array_to_image(a: np.ndarray | torch.Tensor) -> Image.Image:
    shape = tuple(a.shape)
    if isinstance(a, torch.Tensor):
        if a.dim() == 3 and a.shape[0] in (1, 3):
            a = a.detach().cpu()
            a = (a.clamp(0, 1) * 255).round().byte() if a.is_floating_point() else a.byte()
            a = a.permute(1, 2, 0).squeeze(-1).numpy()
        else:
            a = np.empty(0)
    if a.ndim in (2, 3) and 0 in a.shape[:2]:
        raise ImageError(f"<array {shape}>", f"an array of shape {shape} holds no pixels")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4)):
        if a.dtype == np.uint8:
            return Image.fromarray(a)
        raise ImageError(
            f"<array {shape}>",
            f"an array of dtype {a.dtype} is not an 8-bit "
            f"image: pass uint8 (0-255), or a float tensor C x H x W in [0, 1]",
        )
    raise ImageError(
        f"<array {shape}>", f"an array of shape {shape} is not an image: pass {ACCEPTED}"
    )


def _round(u: float | None) -> float | None:
    return None if u is None else round(u, 6)


def check_top_k(top_k: int | None) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(
            f"top_k must be a whole number of 1 or more (or None for all classes), got {top_k!r}"
        )


def _label(image: ImageLike) -> str:
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"<{type(image).__name__} {tuple(image.shape)}>"
    if isinstance(image, Image.Image):
        return f"<PIL image {image.size[0]}x{image.size[1]}>"
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} bytes>"
    return str(image)


class OnnxClassifier(Classifier):
    """An exported `model.onnx` run with ONNX Runtime: the same preprocessing code as the PyTorch
    model (minus the normalisation, which is inside the graph) and the same outputs. Needs the
    `graft[export]` extra.

    >>> clf = OnnxClassifier("runs/demo/model.onnx")  # doctest: +SKIP
    >>> clf.predict("shirt.png", top_k=1)
    [{'tshirt_top': 0.91}]
    """

    def __init__(self, path: str | Path):
        from .onnxfile import read_onnx_meta, session

        self.path = Path(path)
        props = read_onnx_meta(self.path)
        self.meta = ModelMeta(
            backbone=props.get("backbone") or "",
            classes=props["classes"],
            preprocess=props["preprocess"],
            # what the graph divides its logits by: meta.temperature reads it as for a run
            calibration={"method": "temperature", "temperature": props["temperature"]},
        )
        self.session = session(self.path)
        self.classes = list(self.meta.classes)
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.classes):
            raise CheckpointError(
                f"{self.path}: the graph has {outputs} outputs but its metadata "
                f"names {len(self.classes)} classes; re-export it"
            )
        self.spec = self.meta.preprocess
        self.max_pixels = props["max_pixels"] or MAX_PIXELS
        self.temperature = props["temperature"]  # applied inside the graph already
        self.policy = props["policy"]
        self.references, self.unknown_k = None, props["unknown_k"]  # inside the graph
        self.runtime = resolve_runtime("cpu", "fp32")
        self._transform = build_transforms(self.spec, train=False, normalize=False)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", precision: str = "fp32") -> Classifier:
        return cls(path)

    def _forward(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not tensors:
            return torch.zeros(0, len(self.classes)), None
        out = self.session.run(None, {"image": torch.stack(tensors).numpy()})
        unknown = torch.from_numpy(out[1]).float() if len(out) > 1 else None
        return torch.from_numpy(out[0]).float(), unknown

    def features(self, images: Sequence[ImageLike], batch_size: int = 32) -> torch.Tensor:
        raise GraftError("an exported .onnx model gives no features: load the run folder")


def load_classifier(path: str | Path, device: str = "auto") -> Classifier:
    """A run folder (PyTorch) or an exported `.onnx` file (ONNX Runtime), the same interface."""
    if Path(path).suffix.lower() == ".onnx":
        return OnnxClassifier(path)
    return Classifier.load(path, device=device)
