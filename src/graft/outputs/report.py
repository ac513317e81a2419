"""The run report: figures (PNG), every number (report.json) and one self-contained report.html.

Built from the run folder alone plus the images its split lists (`data_dir` overrides where they
are). Images are embedded as data URIs: the page opens offline, anywhere, with no external URL.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..core.errors import DatasetError, GraftError
from ..core.runfolder import (
    AUDIT_DIR,
    AUDIT_HTML,
    AUDIT_JSON,
    COMPARE_JSON,
    CONFUSION,
    CURVES,
    EXPLANATIONS,
    FIGURES,
    PREDICTIONS,
    RELIABILITY,
    REPORT_HTML,
    REPORT_JSON,
    SAMPLES,
    SCORES,
    SPLIT,
    TOP_LOSSES,
    read_metrics,
)
from ..core.runtime import atomic_path, atomic_write_text
from ..data.splits import load_split
from ..inference.classifier import Classifier, Prediction
from ..models.modelfile import ModelMeta, read_meta, read_scores
from . import figures as draw
from .card import (
    OPERATING_HEADER,
    best_row,
    number,
    operating_rows,
    share_text,
    unknown_text,
    write_card,
)
from .pages import DPI, comparison_section, page, png_tag, table

log = logging.getLogger(__name__)

__all__ = ["FIGURES", "build_report"]


def build_report(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    explain_images: int = 4,
    val_predictions: list | None = None,
    classifier: Classifier | None = None,
    audit: str | Path | None = None,
) -> dict[str, Any]:
    """Write the figures, report.json and report.html into `run_dir`; return report.json's data.
    Training passes the model it has just saved (`classifier`) and its val predictions: nothing is
    loaded or predicted twice. `audit`: a `graft audit` folder (or its audit.json) whose issues
    the top losses are marked with; by default ./audit, when it audited this run's data folder.

    >>> graft.report("runs/demo")["evaluation"]["accuracy"]  # doctest: +SKIP
    0.958
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    clf = classifier or Classifier.load(run_dir)
    meta = read_meta(run_dir) if classifier is not None else clf.meta
    split = load_split(run_dir / SPLIT, data_dir)
    if split.classes != clf.classes:
        raise DatasetError(f"{run_dir}/split lists other classes than the model; re-train")
    root, val, train = Path(split.root), split.val, split.train
    history = read_metrics(run_dir)
    # training passes the predictions it made for model.json: the same numbers, computed once;
    # a head refitted with val kept those of the head before (the saved one has seen val)
    kept = None if val_predictions else _kept_val_predictions(run_dir, clf, meta, val)
    preds = val_predictions or kept or clf.predict_files([p for p, _ in val])
    ok = [(s, p) for s, p in zip(val, preds) if p.probs is not None]
    probs = clf.stacked(preds)[0]
    targets = torch.tensor([y for (_, y), _ in ok])
    evaluation = clf.evaluate_samples(val, preds)  # what `graft evaluate` gives on this split
    losses = -torch.log(probs[torch.arange(len(ok)), targets].clamp_min(1e-12))
    order = losses.argsort(descending=True).tolist()
    wrong = [i for i in order if probs[i].argmax() != targets[i]]
    top_losses = [
        {
            "path": ok[i][0][0],
            "true": clf.classes[int(targets[i])],
            "predicted": clf.classes[int(probs[i].argmax())],
            "confidence": float(probs[i].max()),
            "loss": float(losses[i]),
        }
        for i in wrong[:8]
    ]
    audited = _audit(audit, root)
    if audited is not None:
        for t in top_losses:
            t["audit"] = audited["flagged"].get(_key(t["path"]))

    import matplotlib

    matplotlib.use("Agg")
    figures: dict[str, Any] = {}
    path = _cv_path(meta.best)
    curves = draw.regularisation(path) if path and not history else draw.curves(history)
    _save(run_dir, CURVES, curves, figures)
    _save(run_dir, CONFUSION, draw.confusion(evaluation, clf.classes), figures)
    _save(run_dir, SAMPLES, draw.samples(clf, train), figures)
    shown = [(ok[i][0][0], int(targets[i]), probs[i]) for i in draw.spread(range(len(ok)), 16)]
    _save(run_dir, PREDICTIONS, draw.predictions(clf, shown, "Validation predictions"), figures)
    lossy = [(ok[i][0][0], int(targets[i]), probs[i]) for i in wrong[:8]]
    _save(run_dir, TOP_LOSSES, draw.predictions(clf, lossy, "Top losses"), figures)
    _save(run_dir, RELIABILITY, draw.reliability(probs, targets, clf.temperature), figures)
    explanations_note = None
    try:
        picks = draw.spread(shown, explain_images)
        _save(run_dir, EXPLANATIONS, draw.explanations(clf, picks), figures)
    except GraftError as exc:
        explanations_note = str(exc)
        log.warning("no explanations in the report: %s", exc)

    report = {
        "run": _summary(meta, run_dir, root),
        "history": history,
        "evaluation": evaluation,
        "most_confused": evaluation["most_confused"],
        "top_losses": top_losses,
        "audit": audited and {k: v for k, v in audited.items() if k != "flagged"},
        "figures": figures,
        "explanations_note": explanations_note,
        "how_good": _how_good(meta, evaluation, run_dir, afresh=not (val_predictions or kept)),
        "decision": meta.decision,
        "unknown_text": unknown_text(meta),
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write_text(run_dir / REPORT_JSON, json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(run_dir / REPORT_HTML, _html(report, run_dir))
    write_card(run_dir)  # the card follows the model.json it is made from
    log.debug("report written to %s in %.1fs", run_dir / REPORT_HTML, report["build_seconds"])
    return report


def _audit(given: str | Path | None, root: Path) -> dict[str, Any] | None:
    """What the report needs of an audit: where it is, how many issues of each kind, and each
    flagged file's issue in a few words ({resolved path: text}, a label issue first). The one
    given must be readable; the default one (./audit) counts only if it audited `root`."""
    where = Path(given) if given is not None else Path(AUDIT_DIR)
    path = where if where.suffix == ".json" else where / AUDIT_JSON
    if not path.is_file():
        if given is None:
            return None
        raise GraftError(f"--audit {given}: no {AUDIT_JSON} there (graft audit DATA --out DIR)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        issues = [i for i in doc["issues"] if isinstance(i, dict)]
        audited_root = Path(str(doc["data_dir"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        if given is None:
            log.warning("%s is not a readable audit (%s): the report does not link it", path, exc)
            return None
        raise GraftError(f"--audit {given}: {path} is not graft audit's output ({exc})") from None
    if given is None and _key(audited_root) != _key(root):
        return None  # an audit of another folder
    flagged: dict[str, str] = {}
    for issue in sorted(issues, key=lambda i: i.get("kind") != "label"):
        text = _issue_text(issue)
        paths = issue.get("paths")
        for p in paths if isinstance(paths, list) else []:
            flagged.setdefault(_key(p), text)
    page = path.with_name(AUDIT_HTML)
    return {
        "path": str(path),
        "page": str(page) if page.is_file() else None,
        "data_dir": str(audited_root),
        "by_kind": doc.get("by_kind") if isinstance(doc.get("by_kind"), dict) else {},
        "flagged": flagged,
    }


def _issue_text(issue: dict[str, Any]) -> str:
    kind = str(issue.get("kind"))
    if kind == "label":
        score = issue.get("score")
        given = f", the given class {score:.2f} out of fold" if isinstance(score, float) else ""
        return f"label issue: suggested {issue.get('suggested')}{given}"
    detail = issue.get("subkind") or issue.get("reason")
    return f"{kind}: {detail}" if detail else kind


def _key(path: str | Path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError, ValueError, TypeError):  # audit.json is read, not trusted
        return str(path)


def _kept_val_predictions(
    run_dir: Path, clf: Classifier, meta: ModelMeta, val: list
) -> list[Prediction] | None:
    """A run whose saved head was fitted again with the val images (--refit): val's predictions
    as training made them, before that refit, from the scores it kept (scores.safetensors), so
    the report gives model.json's numbers; decided by the model's policy as it is now. None for
    another run, or when the scores do not match the val split (then val is predicted afresh,
    and the report says those numbers are in-sample)."""
    if not best_row(meta).get("refit"):
        return None
    try:
        scores = read_scores(run_dir, len(clf.classes))
    except GraftError as exc:
        log.warning("val predicted afresh by the refitted head: %s", exc)
        return None
    probs = scores["val_probs"]
    unread = {str(p) for p in meta.skipped_files or []}
    paths = [str(path) for path, _ in val]
    readable = sum(p not in unread for p in paths)
    if readable != len(probs):
        log.warning(
            "val predicted afresh: %s holds %d val scores for %d images",
            SCORES,
            len(probs),
            readable,
        )
        return None
    rows = iter(probs)  # `results` reads a tensor as a readable image, a string as its reason
    decoded = ["unreadable when the model trained" if p in unread else next(rows) for p in paths]
    return clf.results(paths, decoded, probs, scores.get("val_unknown"))


def _how_good(
    meta: ModelMeta, ev: dict[str, Any], run_dir: Path, afresh: bool = True
) -> dict[str, Any]:
    """How the val number was obtained, and so how far to trust it; the comparison if one ran.
    `afresh`: the val images predicted by the saved model now (not training's predictions)."""
    cfg = meta.config or {}
    keep = cfg.get("keep", "best")
    best = best_row(meta)
    if best.get("refit") and afresh:
        how = (
            "in-sample: the saved head was fitted again with these val images (--refit), so "
            "they score images it trained on; model.json's val numbers, of the head fitted "
            "without them, are the estimate"
        )
    elif best.get("head") == "fit":
        how = (
            "unbiased: the val images took no part in any choice (the head fitted, its L2 "
            "chosen by cross-validation on the training images"
            + (", the model too" if meta.selection else "")
            + ")"
            + (
                "; these are that head's predictions, kept from before the saved head was "
                "fitted again with the val images (--refit)"
                if best.get("refit")
                else ""
            )
        )
    elif keep == "last":
        how = (
            "unbiased: the val images took no part in any choice (a fixed number of epochs, "
            "the last one kept"
            + (
                ", the model chosen by cross-validation on the training images"
                if meta.selection
                else ""
            )
            + ")"
        )
    else:
        how = (
            "optimistic: the epoch kept is the one that scored best on these same val images; "
            "train with --keep last or --auto, or evaluate on a test/ folder, for an unbiased "
            "number"
        )
    comparison = None
    if (run_dir / COMPARE_JSON).is_file():
        comparison = json.loads((run_dir / COMPARE_JSON).read_text(encoding="utf-8"))
    return {
        "accuracy": ev["accuracy"],
        "accuracy_ci95": ev["accuracy_ci95"],
        "n": ev["n"],
        "how": how,
        "test": meta.test,
        "comparison": comparison,
    }


def _summary(meta: ModelMeta, run_dir: Path, root: Path) -> dict[str, Any]:
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
    return {
        "run_dir": str(run_dir),
        "data_dir": str(root),
        "classes": meta.classes,
        "keep": (meta.config or {}).get("keep", "best"),
        **{k: getattr(meta, k) for k in keys},
    }


def _save(run_dir: Path, name: str, fig, figures: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(run_dir / name) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    w, h = fig.get_size_inches() * DPI
    figures[name] = [int(round(w)), int(round(h))]
    plt.close(fig)


# ---------------------------------------------------------------- HTML


def _img(run_dir: Path, name: str) -> str:
    if not (run_dir / name).is_file():
        return '<p class="muted">not available</p>'
    return png_tag((run_dir / name).read_bytes(), name)


def _audit_html(r: dict[str, Any], run_dir: Path) -> str:
    """Below the top losses: the audit they were checked against, or how to make one."""
    audit = r.get("audit")
    if not audit:
        return (
            f'<p class="muted">Wrong labels, near-duplicates and outliers in the data folder: '
            f"<code>graft audit {html.escape(r['run']['data_dir'])}</code>, then "
            "<code>graft report RUN</code> marks the top losses it lists.</p>"
        )
    flagged = sum(bool(t.get("audit")) for t in r["top_losses"])
    kinds = ", ".join(f"{n} {k}" for k, n in audit["by_kind"].items()) or "no issues"
    where = html.escape(audit["path"])
    if audit.get("page"):
        href = html.escape(os.path.relpath(audit["page"], run_dir))
        where = f'<a href="{href}">{html.escape(audit["page"])}</a>'
    return (
        f"<p>{flagged} of these {len(r['top_losses'])} are in the audit of the data folder "
        f"({where}: {html.escape(kinds)}). A top loss the audit also flags is more likely a wrong "
        "label than a model error.</p>"
    )


def _how_good_html(h: dict[str, Any]) -> str:
    lo, hi = h["accuracy_ci95"]
    text = (
        f"<p>Accuracy on the {h['n']} val images: <b>{h['accuracy']:.4f}</b>, 95% interval "
        f"{lo:.3f}-{hi:.3f} (Wilson): new images like these should score in that range. "
        f"This number is {html.escape(h['how'])}.</p>"
    )
    if h.get("test"):
        t = h["test"]
        tlo, thi = t["accuracy_ci95"]
        text += (
            f"<p>On the test/ folder, scored once at the end: {t['accuracy']:.4f} "
            f"({tlo:.3f}-{thi:.3f}, n={t['n']}).</p>"
        )
    if h.get("comparison"):
        text += "<h3>The comparison that chose this model</h3>" + comparison_section(
            h["comparison"]
        )
    return text


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
        _kept_row(run, best),
        ["val accuracy, 95% CI", f"{ev['accuracy']:.4f} ({lo:.3f}-{hi:.3f}, n={ev['n']})"],
    ]
    if ev.get("calibration"):
        summary.append(["calibration on val", calibration_line(ev["calibration"])])
    if run.get("test"):
        t = run["test"]
        summary.append(["test accuracy (once, at the end)", f"{t['accuracy']:.4f} (n={t['n']})"])
    class_rows = [[c, *[counts.get(s, {}).get(c, 0) for s in counts]] for c in run["classes"]]
    per_class = [
        [c, m["precision"], m["recall"], m["f1"], m["support"]] for c, m in ev["per_class"].items()
    ]
    confused = [[a, b, n] for a, b, n in r["most_confused"]] or [["none", "", ""]]
    audit = r.get("audit")
    loss_header = ["image", "true", "predicted", "confidence", "loss"]
    loss_header += ["audit"] if audit else []
    losses = [
        [Path(t["path"]).name, t["true"], t["predicted"], t["confidence"], t["loss"]]
        + ([t.get("audit") or ""] if audit else [])
        for t in r["top_losses"]
    ] or [["none"] + [""] * (len(loss_header) - 1)]
    note = r.get("explanations_note")
    sections = [
        ("how-good", "How good is it really", _how_good_html(r["how_good"])),
        (
            "summary",
            "Run summary",
            table(["", ""], summary) + table(["class", *counts.keys()], class_rows),
        ),
        ("curves", "Training curves", _img(run_dir, CURVES)),
        ("confusion", "Confusion matrix", _img(run_dir, CONFUSION)),
        (
            "per-class",
            "Per-class metrics",
            table(["class", "precision", "recall", "f1", "support"], per_class),
        ),
        ("samples", "Training samples", _img(run_dir, SAMPLES)),
        ("predictions", "Validation predictions", _img(run_dir, PREDICTIONS)),
        (
            "top-losses",
            "Top losses (most confidently wrong)",
            _img(run_dir, TOP_LOSSES) + table(loss_header, losses) + _audit_html(r, run_dir),
        ),
        (
            "calibration",
            "Calibration: can the probabilities be taken at their word?",
            _img(run_dir, RELIABILITY)
            + (
                f"<p>{html.escape(calibration_line(ev['calibration']))}</p>"
                if ev.get("calibration")
                else ""
            ),
        ),
        (
            "decisions",
            "Decisions: a class, unknown or review",
            _decisions_html(r["unknown_text"], r["decision"], ev.get("decisions")),
        ),
        (
            "most-confused",
            "Most confused classes",
            table(["true", "predicted as", "images"], confused),
        ),
        (
            "explanations",
            "Explanations",
            f'<p class="muted">{html.escape(note)}</p>' if note else _img(run_dir, EXPLANATIONS),
        ),
    ]
    title = f"graft report: {run['backbone']} on {Path(run['data_dir']).name}"
    return page(title, str(run["run_dir"]), sections)


def _decisions_html(unknown: str, decision: dict[str, Any] | None, d: dict[str, Any] | None) -> str:
    if not d:
        return '<p class="muted">no decisions in this model (trained before graft had them)</p>'
    chosen = (decision or {}).get("chosen_on")
    return (
        f"<p>{html.escape(unknown)}</p>"
        f"<p>On the {d['n']} validation images: review {share_text(d['review'])}, unknown "
        f"{share_text(d['unknown'])}"
        + (f"; thresholds chosen on {html.escape(chosen)}" if chosen else "; arg-max")
        + ". Caught: not decided as another class (decided as it, review or unknown).</p>"
        + table(OPERATING_HEADER, operating_rows(decision, d))
    )


def calibration_line(c: dict[str, Any]) -> str:
    """'ECE 0.021 (raw 0.048), NLL 0.213 (raw 0.240), confidence 0.93 at accuracy 0.95, T 1.31'"""
    cal, raw = c["calibrated"], c["raw"]
    if c["temperature"] == 1.0:
        return (
            f"ECE {cal['ece']:.3f}, NLL {cal['nll']:.3f}, confidence {cal['confidence']:.2f} "
            f"at accuracy {cal['accuracy']:.2f} (uncalibrated)"
        )
    return (
        f"ECE {cal['ece']:.3f} (raw {raw['ece']:.3f}), NLL {cal['nll']:.3f} (raw "
        f"{raw['nll']:.3f}), confidence {cal['confidence']:.2f} (raw {raw['confidence']:.2f}) "
        f"at accuracy {cal['accuracy']:.2f}; temperature {c['temperature']:.3g}"
    )


def _kept_row(run: dict[str, Any], best: dict[str, Any]) -> list[str]:
    if best.get("head") == "fit":
        how = f"{best.get('folds')}-fold cross-validation" if best.get("folds") else "default"
        return ["head", f"fitted by L-BFGS, L2 {number(best.get('l2'))} ({how} on train)"]
    keep = run.get("keep") or "best"
    return [
        "epoch kept",
        f"{best.get('epoch')} ({keep}"
        + (" on val accuracy)" if keep == "best" else ", fixed epochs)"),
    ]


def _cv_path(best: dict[str, Any] | None) -> list[dict[str, float]] | None:
    """A fitted head's cross-validation path from model.json, if it is one (a file from
    elsewhere may hold anything there: then no path is drawn)."""
    path = (best or {}).get("path") if isinstance(best, dict) else None
    keys = ("l2", "cv_loss", "cv_acc")
    ok = isinstance(path, list) and all(
        isinstance(r, dict)
        and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for k in keys)
        and r["l2"] > 0
        for r in path
    )
    return path if ok and path else None
