"""The run report: figures (PNG), every number (report.json) and one self-contained report.html.

Built from the run folder alone plus the images its split lists (`data_dir` overrides where they
are). Images are embedded as data URIs: the page opens offline, anywhere, with no external URL.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from . import figures as draw
from .card import write_card
from .errors import DatasetError, GraftError
from .predict import Classifier
from .runfolder import (
    CONFUSION,
    CURVES,
    EXPLANATIONS,
    FIGURES,
    PREDICTIONS,
    REPORT_HTML,
    REPORT_JSON,
    SAMPLES,
    SPLIT,
    TOP_LOSSES,
    read_metrics,
)
from .runtime import atomic_path, atomic_write_text
from .splits import load_split

log = logging.getLogger(__name__)

__all__ = ["FIGURES", "build_report"]
DPI = 100


def build_report(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    explain_images: int = 4,
    val_predictions: list | None = None,
) -> dict[str, Any]:
    """Write the figures, report.json and report.html into `run_dir`; return report.json's data.

    >>> graft.report("runs/demo")["evaluation"]["accuracy"]  # doctest: +SKIP
    0.958
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    clf = Classifier.load(run_dir)
    meta = clf.meta
    split = load_split(run_dir / SPLIT, data_dir)
    if split.classes != clf.classes:
        raise DatasetError(f"{run_dir}/split lists other classes than the model; re-train")
    root, val, train = Path(split.root), split.val, split.train
    history = read_metrics(run_dir)
    # training passes the predictions it made for model.json: the same numbers, computed once
    preds = val_predictions or clf.predict_files([p for p, _ in val])
    ok = [(s, p) for s, p in zip(val, preds) if p.probs is not None]
    probs = torch.tensor([[p.probs[c] for c in clf.classes] for _, p in ok])
    targets = torch.tensor([y for (_, y), _ in ok])
    evaluation = clf.evaluate_samples(val, preds)  # what `graft evaluate` gives on this split
    losses = -torch.log(probs[torch.arange(len(ok)), targets].clamp_min(1e-12))
    order = losses.argsort(descending=True).tolist()
    wrong = [i for i in order if probs[i].argmax() != targets[i]]
    top_losses = [{"path": ok[i][0][0], "true": clf.classes[int(targets[i])],
                   "predicted": clf.classes[int(probs[i].argmax())],
                   "confidence": float(probs[i].max()), "loss": float(losses[i])}
                  for i in wrong[:8]]  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    figures: dict[str, Any] = {}
    _save(run_dir, CURVES, draw.curves(history), figures)
    _save(run_dir, CONFUSION, draw.confusion(evaluation, clf.classes), figures)
    _save(run_dir, SAMPLES, draw.samples(clf, train), figures)
    shown = [(ok[i][0][0], int(targets[i]), probs[i]) for i in draw.spread(range(len(ok)), 16)]
    _save(run_dir, PREDICTIONS, draw.predictions(clf, shown, "Validation predictions"), figures)
    lossy = [(ok[i][0][0], int(targets[i]), probs[i]) for i in wrong[:8]]
    _save(run_dir, TOP_LOSSES, draw.predictions(clf, lossy, "Top losses"), figures)
    explanations_note = None
    try:
        picks = draw.spread(shown, explain_images)
        _save(run_dir, EXPLANATIONS, draw.explanations(clf, picks), figures)
    except GraftError as exc:
        explanations_note = str(exc)
        log.warning("no explanations in the report: %s", exc)

    report = {
        "run": _summary(meta, run_dir, root), "history": history, "evaluation": evaluation,
        "most_confused": evaluation["most_confused"], "top_losses": top_losses,
        "figures": figures, "explanations_note": explanations_note,
        "build_seconds": round(time.perf_counter() - start, 2),
    }  # fmt: skip
    atomic_write_text(run_dir / REPORT_JSON, json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(run_dir / REPORT_HTML, _html(report, run_dir))
    write_card(run_dir)  # the card follows the model.json it is made from
    log.info("report written to %s in %.1fs", run_dir / REPORT_HTML, report["build_seconds"])
    return report


def _summary(meta: dict[str, Any], run_dir: Path, root: Path) -> dict[str, Any]:
    keys = (
        "backbone",
        "strategy",
        "trainable_params",
        "total_params",
        "precision",
        "wall_seconds",
        "best",
        "test",
        "class_counts",
        "stopped",
        "skipped_files",
    )
    return {"run_dir": str(run_dir), "data_dir": str(root), "classes": meta["classes"],
            **{k: meta.get(k) for k in keys}}  # fmt: skip


def _save(run_dir: Path, name: str, fig, figures: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(run_dir / name) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    w, h = fig.get_size_inches() * DPI
    figures[name] = [int(round(w)), int(round(h))]
    plt.close(fig)


# ---------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}h1{margin-bottom:0}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid
#ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{
text-align:left}img{max-width:100%;border:1px solid #eee}section{margin:2em 0}.muted{color:#777}"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>"
                   for r in rows)  # fmt: skip
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _img(run_dir: Path, name: str) -> str:
    if not (run_dir / name).is_file():
        return '<p class="muted">not available</p>'
    data = base64.b64encode((run_dir / name).read_bytes()).decode()
    return f'<img alt="{name}" src="data:image/png;base64,{data}">'


def _html(r: dict[str, Any], run_dir: Path) -> str:
    run, ev = r["run"], r["evaluation"]
    best = run.get("best") or {}
    lo, hi = ev["accuracy_ci95"]
    counts = run.get("class_counts") or {}
    summary = [
        ["data folder", run["data_dir"]],
        ["backbone", run["backbone"]],
        ["strategy", run["strategy"]],
        [
            "trainable / total parameters",
            f"{run['trainable_params'] or 0:,} / {run['total_params'] or 0:,}",
        ],
        ["precision", run["precision"]],
        ["wall time (s)", run["wall_seconds"]],
        ["best epoch (chosen on val loss/accuracy)", best.get("epoch")],
        ["val accuracy, 95% CI", f"{ev['accuracy']:.4f} ({lo:.3f}-{hi:.3f}, n={ev['n']})"],
    ]
    if run.get("test"):
        t = run["test"]
        summary.append(["test accuracy (once, at the end)",
                        f"{t['accuracy']:.4f} (n={t['n']})"])  # fmt: skip
    class_rows = [[c, *[counts.get(s, {}).get(c, 0) for s in counts]] for c in run["classes"]]
    per_class = [[c, m["precision"], m["recall"], m["f1"], m["support"]]
                 for c, m in ev["per_class"].items()]  # fmt: skip
    confused = [[a, b, n] for a, b, n in r["most_confused"]] or [["none", "", ""]]
    losses = [[Path(t["path"]).name, t["true"], t["predicted"], t["confidence"], t["loss"]]
              for t in r["top_losses"]] or [["none", "", "", "", ""]]  # fmt: skip
    note = r.get("explanations_note")
    sections = [
        ("summary", "Run summary", _table(["", ""], summary)
         + _table(["class", *counts.keys()], class_rows)),
        ("curves", "Training curves", _img(run_dir, CURVES)),
        ("confusion", "Confusion matrix", _img(run_dir, CONFUSION)),
        ("per-class", "Per-class metrics",
         _table(["class", "precision", "recall", "f1", "support"], per_class)),
        ("samples", "Training samples", _img(run_dir, SAMPLES)),
        ("predictions", "Validation predictions", _img(run_dir, PREDICTIONS)),
        ("top-losses", "Top losses (most confidently wrong)",
         _img(run_dir, TOP_LOSSES)
         + _table(["image", "true", "predicted", "confidence", "loss"], losses)),
        ("most-confused", "Most confused classes",
         _table(["true", "predicted as", "images"], confused)),
        ("explanations", "Explanations",
         f'<p class="muted">{html.escape(note)}</p>' if note
         else _img(run_dir, EXPLANATIONS)),
    ]  # fmt: skip
    body = "".join(f'<section id="{sid}"><h2>{title}</h2>{content}</section>'
                   for sid, title, content in sections)  # fmt: skip
    title = html.escape(f"graft report: {run['backbone']} on {Path(run['data_dir']).name}")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_CSS}</style></head><body><h1>{title}</h1>"
        f"<p class='muted'>{html.escape(str(run['run_dir']))}</p>{body}</body></html>\n"
    )
