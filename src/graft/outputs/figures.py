"""The report's figures (matplotlib): training curves, confusion matrices, image grids of
samples and predictions, Grad-CAM rows. Each function returns a figure; report.py saves them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..data.images import load_image
from ..data.transforms import build_transforms, denormalize
from ..inference.classifier import Classifier


def spread(items, k: int) -> list:
    """At most `k` items evenly spaced through `items`: every class of a class-sorted split,
    not only the first."""
    items = list(items)
    return items[:: max(1, len(items) // max(1, k))][:k]


def curves(history: list[dict[str, float]]):
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ep = [r["epoch"] for r in history]
    for key, ax in (("loss", a), ("acc", b)):
        ax.plot(ep, [r[f"train_{key}"] for r in history], label=f"train {key}")
        ax.plot(ep, [r[f"val_{key}"] for r in history], label=f"val {key}")
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    a.set_title("loss")
    b.set_title("accuracy")
    fig.tight_layout()
    return fig


def regularisation(path: list[dict[str, float]]):
    """A fitted head's curves: out-of-fold loss and accuracy against the L2 strength tried,
    the one chosen marked (the lowest loss)."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    l2 = [r["l2"] for r in path]
    best = min(path, key=lambda r: r["cv_loss"])["l2"]
    for key, ax, title in (
        ("cv_loss", a, "out-of-fold loss"),
        ("cv_acc", b, "out-of-fold accuracy"),
    ):
        ax.plot(l2, [r[key] for r in path], marker=".")
        ax.axvline(best, color="tab:red", alpha=0.5, label=f"chosen: L2 {best:g}")
        ax.set_xscale("log")
        ax.set_xlabel("L2 strength")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def accuracy_vs_time(rows: list[dict[str, Any]]):
    """graft compare: each scored candidate's fold accuracy (with its 95% interval) against its
    wall time, one colour per strategy."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"extract": "tab:blue", "partial": "tab:orange", "finetune": "tab:red"}
    for r in (r for r in rows if r["status"] == "scored"):
        lo, hi = r["accuracy_ci95"]
        err = [[max(0.0, r["accuracy"] - lo)], [max(0.0, hi - r["accuracy"])]]  # float rounding
        ax.errorbar(
            r["seconds"],
            r["accuracy"],
            yerr=err,
            fmt="o",
            color=colours.get(r["strategy"], "gray"),
            capsize=3,
        )
        ax.annotate(
            r["candidate"],
            (r["seconds"], r["accuracy"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("wall seconds")
    ax.set_ylabel("fold accuracy (95% interval)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion(evaluation: dict[str, Any], classes: list[str]):
    import matplotlib.pyplot as plt

    cm = np.array(evaluation["confusion_matrix"], dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(classes) + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size))
    for ax, data, title, fmt in (
        (axes[0], cm, "counts", "{:.0f}"),
        (axes[1], norm, "row-normalised (recall)", "{:.2f}"),
    ):
        ax.imshow(data, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        peak = data.max() or 1
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    fmt.format(data[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if data[i, j] > peak / 2 else "black",
                )
    fig.tight_layout()
    return fig


def reliability(probs: torch.Tensor, targets: torch.Tensor, temperature: float):
    """Accuracy against confidence in equal-width bins, for the raw softmax and the calibrated
    probabilities: a calibrated model's bars sit on the diagonal. Bars are as wide as their bin;
    the count of images in each is written above it."""
    import matplotlib.pyplot as plt

    from ..core.calibration import ECE_BINS, raw_probabilities, scores

    bins = ECE_BINS  # the bins the ECE in the titles is computed on
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    edges = np.linspace(0, 1, bins + 1)
    for ax, p, title in (
        (axes[0], raw_probabilities(probs, temperature), "raw softmax"),
        (axes[1], probs, f"calibrated (temperature {temperature:.3g})"),
    ):
        conf, pred = p.max(1)
        right = (pred == targets).float()
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = (conf > lo) & (conf <= hi)
            if inside.any():
                acc = float(right[inside].mean())
                ax.bar(lo, acc, width=hi - lo, align="edge", color="#4c78a8", edgecolor="white")
                ax.text((lo + hi) / 2, acc + 0.01, str(int(inside.sum())), ha="center", fontsize=7)
        ax.plot([0, 1], [0, 1], color="#e45756", linestyle="--", linewidth=1)
        s = scores(p, targets)
        ax.set_title(f"{title}\nECE {s['ece']:.3f}, NLL {s['nll']:.3f}", fontsize=9)
        ax.set_xlabel("confidence (top probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.08)
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    return fig


def grid(n: int, cols: int = 4, cell: float = 2.4):
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * (cell + 0.3)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)


def samples(clf: Classifier, train: list[tuple[str, int]]):
    """Training images as the network sees them (augmented), de-normalised correctly."""
    tf = build_transforms(clf.spec, train=True)
    picks = spread(train, 16)
    fig, axes = grid(len(picks))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for ax, (path, y) in zip(axes, picks):
            x = tf(load_image(path, clf.spec.resize_size, max_pixels=clf.max_pixels))
            ax.imshow(denormalize(x, clf.spec).permute(1, 2, 0).numpy())
            ax.set_title(clf.classes[y], fontsize=9)
    fig.suptitle("Augmented training samples")
    _fit_grid(fig, title_lines=1)
    return fig


def predictions(clf: Classifier, items: list, title: str):
    tf = build_transforms(clf.spec, train=False)
    fig, axes = grid(max(1, len(items)))
    for ax, (path, y, p) in zip(axes, items):
        x = tf(load_image(path, clf.spec.resize_size, max_pixels=clf.max_pixels))
        ax.imshow(denormalize(x, clf.spec).permute(1, 2, 0).numpy())
        k = int(p.argmax())
        right = k == y
        ax.set_title(
            f"{clf.classes[k]} {float(p[k]):.2f}\ntrue: {clf.classes[y]}",
            fontsize=8,
            color="black" if right else "red",
        )
        if not right:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_color("red")
                s.set_linewidth(3)
    if not items:
        axes[0].text(0.5, 0.5, "none", ha="center")
    fig.suptitle(title)
    _fit_grid(fig, title_lines=2)
    return fig


def explanations(clf: Classifier, items: list):
    import matplotlib.pyplot as plt

    from ..inference.explain import draw_explanations, explain

    rows = max(1, len(items))
    fig, axes = plt.subplots(rows, 3, figsize=(8, 2.8 * rows), squeeze=False)
    for row, (path, y, _) in zip(axes, items):
        x, maps = explain(clf, path, "gradcam", 2)
        rgb = denormalize(x, clf.spec).permute(1, 2, 0).numpy()
        draw_explanations(row, rgb, maps, "gradcam", f"true: {clf.classes[y]}")
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Grad-CAM: where the network looked for its top-2 classes")
    _fit_grid(fig, title_lines=1)
    return fig


def _fit_grid(fig, title_lines: int) -> None:
    """Margins for a grid of images, set rather than measured: tight_layout draws every text
    once to measure it (0.1-0.2 s a grid here). Room for the figure's
    title above and `title_lines` lines of each image's 8-9 pt title."""
    w, h = fig.get_size_inches()
    rows = len({round(ax.get_position().y0, 4) for ax in fig.axes})
    title = 0.19 * title_lines + 0.1  # inches above each image
    head = 0.4  # inches for the figure's title
    if fig._suptitle is not None:
        fig._suptitle.set_y(1 - 0.08 / h)
        fig._suptitle.set_verticalalignment("top")
    cell = (h - head) / rows
    fig.subplots_adjust(
        left=0.02,
        right=0.98,
        bottom=0.02,
        top=1 - (head + title) / h,
        wspace=0.08,
        hspace=title / max(cell - title, 0.1),
    )
