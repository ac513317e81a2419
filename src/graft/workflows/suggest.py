"""`graft suggest`: which unlabelled images to label next, so that each label helps most.

A trained run's features of the unlabelled images and of its training images, then TypiClust
(core/cleaning.typical_and_diverse): typical images from the regions of the feature space no
label covers yet. At the budgets a folder like graft's has (tens to hundreds of labels), diverse
and typical beats the most uncertain images (Hacohen et al. 2022), which are often outliers or
duplicates of each other; measured in bench/suggest.py. Writes OUT/suggest.csv (rank, path, the
model's guess to label faster) and OUT/suggest.html (thumbnails in that order).
"""

from __future__ import annotations

import csv
import html
import io
import logging
from pathlib import Path
from typing import Any

from ..core.cleaning import farthest_first, typical_and_diverse
from ..core.errors import ConfigError, DatasetError
from ..core.runfolder import SPLIT
from ..core.runtime import atomic_write_text
from ..data.discovery import expand_inputs
from ..data.splits import load_split
from ..inference.classifier import Classifier
from ..outputs.auditpage import CSS, thumbnail
from ..outputs.pages import page

log = logging.getLogger(__name__)

SUGGEST_CSV, SUGGEST_HTML = "suggest.csv", "suggest.html"
METHODS = ("typical", "farthest", "uncertain")
_WHY = {  # what the page says each method picked
    "typical": "typical images of regions no training image covers yet (TypiClust)",
    "farthest": "each the farthest from every training image and earlier pick (core-set)",
    "uncertain": "those the model is least sure of (the smallest margin of its top two classes)",
}


def suggest(
    run_dir: str | Path,
    unlabeled: str | Path,
    n: int = 50,
    out: str | Path = "suggestions",
    device: str = "auto",
    seed: int = 0,
    method: str = "typical",
) -> list[dict[str, Any]]:
    """The `n` unlabelled images to label first, best first; writes OUT/suggest.csv and
    OUT/suggest.html.

    >>> graft.suggest("runs/demo", "inbox/", n=50)[0]["path"]  # doctest: +SKIP
    'inbox/IMG_0412.jpg'
    """
    if n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}")
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    clf = Classifier.load(run_dir, device=device)
    labelled = clf.references
    if labelled is None:
        labelled = _training_features(clf, Path(run_dir))
    paths = expand_inputs([unlabeled])
    feats, probs, kept, bad = clf.features_files(paths)
    for b in bad:
        log.warning("skipped %s: %s", b.path, b.error)
    if not kept:
        raise DatasetError(f"no readable image in {unlabeled}")
    if method == "typical":
        picks = typical_and_diverse(feats, labelled, n, seed)
    elif method == "farthest":
        picks = farthest_first(feats, labelled, n)
    else:  # the smallest margin between the model's two most likely classes
        top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
        picks = (top2[:, 0] - top2[:, -1]).argsort()[:n].tolist()
    rows = []
    for rank, i in enumerate(picks, 1):
        p, c = probs[i].max(0)
        rows.append(
            {
                "rank": rank,
                "path": str(paths[kept[i]]),
                "model_guess": clf.classes[int(c)],
                "probability": round(float(p), 4),
            }
        )
    _write(Path(out), rows, str(unlabeled), len(kept), method)
    return rows


def _training_features(clf: Classifier, run_dir: Path):
    """The features of the images a run was trained on, from the files its split lists: for a
    model that keeps none (trained on fewer than 10 images: no unknown score, so no reference
    features; or by a graft older than the unknown score)."""
    try:
        train = [p for p, _ in load_split(run_dir / SPLIT).train]
    except DatasetError as exc:
        raise DatasetError(
            f"{run_dir} keeps no features of its training images and they cannot be read "
            f"({exc}); suggest needs to know what is labelled already"
        ) from None
    feats, _, _, bad = clf.features_files(train)
    if not len(feats):
        raise DatasetError(
            f"{run_dir} keeps no features of its training images and none of the {len(train)} "
            f"it lists can be read (e.g. {bad[0].path}: {bad[0].error}); suggest needs to know "
            "what is labelled already: put them back or train again"
        )
    for b in bad:  # skipped when it trained too (--skip-bad), or damaged since
        log.warning("training image %s unreadable: not counted as labelled (%s)", b.path, b.error)
    log.info("features of the run's %d training images: what is labelled already", len(train))
    return feats


def _write(out: Path, rows: list[dict[str, Any]], source: str, pool: int, method: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["rank", "path", "model_guess", "probability"])
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / SUGGEST_CSV, buf.getvalue())
    cards = "".join(
        f'<div class="issue">{thumbnail(r["path"])}<div class="what">#{r["rank"]} '
        f"{html.escape(r['path'])}<br>the model's guess: {html.escape(r['model_guess'])} "
        f"{r['probability']:.2f}</div></div>"
        for r in rows
    )
    note = (
        f"<p>The {len(rows)} of {pool} unlabelled images to label first: {_WHY[method]}. "
        "suggest.csv holds the same list.</p>"
    )
    atomic_write_text(
        out / SUGGEST_HTML,
        page(
            f"graft suggest: {source}",
            f"{pool} images",
            [("picks", "Label these first", CSS + note + cards)],
        ),
    )
