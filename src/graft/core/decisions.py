"""Decisions: what to do with a prediction. A class, "unknown" (none of these) or "review".

Two numbers per image feed a decision: its calibrated class probabilities and its unknown score,
how unlike the training images it is: one minus the cosine similarity to its k-th nearest training
image in the network's own feature space (the vector the head reads), L2-normalised first (Sun et
al. 2022, "Out-of-distribution detection with deep nearest neighbors"). Chosen over the softmax
(the probabilities of an input from nowhere are as sure as any: that is the problem) and over
Mahalanobis (one covariance per class needs more images per class than a small folder has), and
measured in bench/decisions.py. The threshold flags FLAG_RATE of held-out training images: each
training image's distance to the others (leave one out), the same distance a new image from the
same folders has to all of them.

The rule, per image:
1. unknown score above its threshold: "unknown";
2. each class claims the image: a class with a recall target when its probability reaches its
   threshold; one with a precision target when it is the top class and reaches its threshold;
   any other class when it is the top class (the plain arg-max, the default);
3. exactly one class claims it: that class; none, or several: "review".
A recall target is a promise that, of a class's images, that share at least is claimed by the
class: decided as it or sent to review, never silently given another class. A precision target
is a promise that the images decided as the class are that class at least that often.

>>> import torch
>>> policy = Policy(classes=("a", "b"), thresholds={"a": Threshold("precision", 0.9, 0.8)})
>>> policy.decide(torch.tensor([[0.95, 0.05], [0.7, 0.3], [0.2, 0.8]]))
['a', 'review', 'b']
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, did_you_mean
from .metrics import wilson_interval

UNKNOWN = "unknown"
REVIEW = "review"
KINDS = ("recall", "precision")
FLAG_RATE = 0.05  # of in-distribution images flagged unknown: the threshold's one setting
MAX_REFERENCES = 10_000  # training features kept for the unknown score (fp16: 25 MB at 1,280-d)
MIN_PRECISION_SUPPORT = 5  # decided images a precision threshold must rest on, at least
_TARGET = re.compile(r"^(?P<cls>.+):(?P<kind>\w+)=(?P<value>[^=]+)$")


@dataclass(frozen=True)
class Target:
    """`CLASS:recall=0.95` or `CLASS:precision=0.99`, as --target takes it."""

    cls: str
    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.cls}:{self.kind}={self.value:g}"


def parse_target(text: str, classes: Sequence[str] | None = None) -> Target:
    """A target from its text; `classes` given, the class must be one of them."""
    m = _TARGET.match(text.strip())
    if not m:
        raise ConfigError(
            f"--target {text!r}: write CLASS:recall=X or CLASS:precision=X, e.g. risked:recall=0.95"
        )
    cls, kind, raw = m["cls"], m["kind"], m["value"]
    if kind not in KINDS:
        raise ConfigError(f"--target {text!r}: {kind!r} is not recall or precision")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise ConfigError(f"--target {text!r}: the {kind} must be a number in (0, 1], got {raw!r}")
    if classes is not None and cls not in classes:
        raise ConfigError(
            f"--target {text!r}: there is no class {cls!r}{did_you_mean(cls, classes)}; "
            f"the classes are {', '.join(classes)}"
        )
    return Target(cls, kind, value)


def parse_targets(texts: Sequence[str], classes: Sequence[str] | None = None) -> list[Target]:
    """Several targets; one per class at most."""
    targets = [parse_target(t, classes) for t in texts]
    seen: set[str] = set()
    for t in targets:
        if t.cls in seen:
            raise ConfigError(f"--target names {t.cls!r} twice: give each class one target")
        seen.add(t.cls)
    return targets


@dataclass(frozen=True)
class Threshold:
    kind: str  # recall or precision
    target: float
    threshold: float  # on the class's calibrated probability


@dataclass(frozen=True)
class Policy:
    """Per-class thresholds and the unknown threshold: how probabilities become a decision."""

    classes: tuple[str, ...]
    thresholds: Mapping[str, Threshold] = field(default_factory=dict)
    unknown_threshold: float | None = None  # None: the model has no unknown score

    def decide(self, probs: torch.Tensor, unknown: torch.Tensor | None = None) -> list[str]:
        """Decisions for probabilities (N, C) and unknown scores (N,)."""
        probs = probs.float()
        if probs.numel() == 0:
            return []
        top = probs.argmax(1)
        claims = torch.zeros_like(probs, dtype=torch.bool)
        for c, name in enumerate(self.classes):
            t = self.thresholds.get(name)
            if t is None:
                claims[:, c] = top == c
            elif t.kind == "recall":
                claims[:, c] = probs[:, c] >= t.threshold
            else:
                claims[:, c] = (top == c) & (probs[:, c] >= t.threshold)
        count = claims.sum(1)
        which = claims.float().argmax(1)
        out = [self.classes[int(w)] if n == 1 else REVIEW for w, n in zip(which, count)]
        if unknown is not None and self.unknown_threshold is not None:
            far = (unknown > self.unknown_threshold).tolist()
            out = [UNKNOWN if f else d for d, f in zip(out, far)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            name: {"kind": t.kind, "target": t.target, "threshold": t.threshold}
            for name, t in self.thresholds.items()
        }


def read_thresholds(d: Any, classes: Sequence[str]) -> dict[str, Threshold]:
    """Thresholds from model.json or ONNX metadata (untrusted): ValueError naming what is wrong."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError("decision.thresholds must be a mapping of class to threshold")
    out = {}
    for name, t in d.items():
        if name not in classes:
            raise ValueError(f"decision.thresholds names {name!r}, which is not a class")
        if not isinstance(t, dict) or t.get("kind") not in KINDS:
            raise ValueError(f"decision.thresholds.{name}.kind must be recall or precision")
        values = [t.get("target"), t.get("threshold")]
        if not all(_number(v) and 0.0 <= v <= 1.0 for v in values):
            raise ValueError(
                f"decision.thresholds.{name}: target and threshold must be numbers from 0 to 1"
            )
        out[name] = Threshold(t["kind"], float(t["target"]), float(t["threshold"]))
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# what a model file (model.json, ONNX metadata) may carry for the unknown score: a distance of
# 1 - cosine lies in [0, 2]; k far above what default_k gives (50), still bounded
UNKNOWN_K_READ = (1, 1000)
UNKNOWN_THRESHOLD_READ = (0.0, 2.0)


def valid_unknown_k(k: Any) -> bool:
    low, high = UNKNOWN_K_READ
    return isinstance(k, int) and not isinstance(k, bool) and low <= k <= high


def valid_unknown_threshold(t: Any) -> bool:
    low, high = UNKNOWN_THRESHOLD_READ
    return _number(t) and low <= t <= high


# --- the unknown score -------------------------------------------------------------------------


def normalise(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=1)


def default_k(references: int) -> int:
    """The neighbour whose distance is the score: the 1st for a small folder, growing with the
    reference set as Sun et al.'s k = 50 for 50,000 CIFAR images (1 per 1,000)."""
    return max(1, min(50, round(references / 1000)))


def knn_distance(
    queries: torch.Tensor, references: torch.Tensor, k: int, leave_one_out: bool = False
) -> torch.Tensor:
    """1 - cosine similarity to the k-th nearest reference, for each query (both L2-normalised).
    `leave_one_out`: the queries are the references, each one's own row left out."""
    queries, references = queries.float(), references.float()
    k = min(k, len(references) - int(leave_one_out))
    if k < 1:
        return torch.full((len(queries),), math.inf)
    out = []
    for start in range(0, len(queries), 1024):  # 1024 x 10,000 similarities at a time: 40 MB
        sims = queries[start : start + 1024] @ references.T
        if leave_one_out:
            rows = torch.arange(len(sims))
            sims[rows, rows + start] = -math.inf
        out.append(1.0 - sims.topk(k, dim=1).values[:, -1])
    return torch.cat(out) if out else torch.zeros(0)


def pick_references(n: int, limit: int = MAX_REFERENCES, seed: int = 0) -> list[int]:
    """Indices of at most `limit` of `n` reference images: a seeded random subset (each class
    keeps about its share)."""
    if n <= limit:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    keep = order[:limit]
    return sorted(keep.tolist())


def fit_unknown(references: torch.Tensor, flag_rate: float = FLAG_RATE) -> dict[str, Any]:
    """k and the threshold flagging `flag_rate` of held-out images, from the references'
    leave-one-out distances. Needs at least two references."""
    k = default_k(len(references))
    held_out = knn_distance(references, references, k, leave_one_out=True)
    threshold = float(torch.quantile(held_out, 1.0 - flag_rate))
    return {
        "method": "knn",
        "k": k,
        "threshold": round(threshold, 6),
        "references": len(references),
        "flag_rate": flag_rate,
    }


# --- choosing thresholds -----------------------------------------------------------------------


def choose_threshold(probs: torch.Tensor, labels: torch.Tensor, c: int, target: Target) -> float:
    """The threshold on class c's probability that meets `target` on held-out scores (N, C),
    or ConfigError saying what they can reach.

    recall X: the lowest of the top X of the class's own scores, with the split-conformal
    correction (the ceil(X (n + 1))-th highest), so that a new image of the class reaches it with
    probability X at least. precision X: the lowest threshold at which the images decided as
    the class are the class X of the time, with MIN_PRECISION_SUPPORT images or more."""
    probs, labels = probs.float(), labels.long()
    own = probs[labels == c, c].sort(descending=True).values
    n = len(own)
    if target.kind == "recall":
        rank = math.ceil(target.value * (n + 1))
        if rank > n:
            most = f"{n / (n + 1):.3f}"
            need = (
                f"{target.value:g} needs {math.ceil(target.value / (1 - target.value))} or more"
                if target.value < 1
                else "1 needs infinitely many"
            )
            raise ConfigError(
                f"--target {target}: {n} held-out image(s) of {target.cls!r} can promise a recall "
                f"of {most} at most ({need}); lower the target or add images of the class"
            )
        return float(own[rank - 1])
    decided = probs.argmax(1) == c
    scores, order = probs[decided, c].sort(descending=True)
    right = (labels[decided][order] == c).float().cumsum(0)
    count = torch.arange(1, len(scores) + 1, dtype=torch.float32)
    precision = right / count
    ok = (precision >= target.value - 1e-9) & (count >= MIN_PRECISION_SUPPORT)
    # a threshold between tied scores would not separate them: only the last of a run counts
    last_of_tie = torch.ones_like(ok)
    if len(scores) > 1:
        last_of_tie[:-1] = scores[:-1] != scores[1:]
    ok &= last_of_tie
    if not ok.any():
        enough = count >= MIN_PRECISION_SUPPORT
        best = float(precision[enough].max()) if enough.any() else float("nan")
        raise ConfigError(
            f"--target {target}: on the held-out scores, no threshold reaches a precision of "
            f"{target.value:g} for {target.cls!r} with {MIN_PRECISION_SUPPORT} or more images "
            f"(the most is {best:.3f}); lower the target"
        )
    return float(scores[int(ok.nonzero().max())])


def choose_thresholds(
    probs: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], targets: Sequence[Target]
) -> dict[str, Threshold]:
    return {
        t.cls: Threshold(
            t.kind, t.value, round(choose_threshold(probs, labels, classes.index(t.cls), t), 6)
        )
        for t in targets
    }


def operating_report(
    decisions: Sequence[str], labels: Sequence[int], classes: Sequence[str]
) -> dict[str, Any]:
    """Per class, at the decisions given: precision (of the images decided as it), recall
    (decided as it, of its images), the shares of its images sent to review and flagged
    unknown, and caught (not decided as another class: decided as it, review or unknown),
    each with its Wilson 95% interval; and the overall review and unknown shares."""
    n = len(labels)
    per_class = {}
    for c, name in enumerate(classes):
        mine = [d for d, y in zip(decisions, labels) if y == c]
        decided = [y for d, y in zip(decisions, labels) if d == name]
        tp = sum(y == c for y in decided)
        per_class[name] = {
            "precision": _share(tp, len(decided)),
            "recall": _share(tp, len(mine)),
            "review": _share(sum(d == REVIEW for d in mine), len(mine)),
            # what a recall target promises: never silently given another class
            "caught": _share(sum(d in (name, REVIEW, UNKNOWN) for d in mine), len(mine)),
            "unknown": _share(sum(d == UNKNOWN for d in mine), len(mine)),
            "support": len(mine),
        }
    return {
        "n": n,
        "review": _share(sum(d == REVIEW for d in decisions), n),
        "unknown": _share(sum(d == UNKNOWN for d in decisions), n),
        "per_class": per_class,
    }


def _share(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(k, n)
    return {"value": round(k / n, 6) if n else None, "ci95": [round(lo, 4), round(hi, 4)], "n": n}
