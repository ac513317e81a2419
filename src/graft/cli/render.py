"""Presentation at the edge: what the `graft` commands print (text, JSON, CSV), progress bars.

JSON and CSV are written as UTF-8 text, never `\\u`-escaped: a file name in Cyrillic stays
readable to a person and to grep.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import typer


def out(text: str = "") -> None:
    typer.echo(text)


def as_json(value: Any) -> None:
    out(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def progress(it: Iterable, desc: str, total: int) -> Iterable:
    """A bar with ETA on a terminal; nothing on a pipe (the per-epoch lines say enough)."""
    if not sys.stderr.isatty():
        return it
    from tqdm import tqdm

    return tqdm(it, desc=f"{desc:>8}", total=total, leave=False, dynamic_ncols=True)


def epoch_line(row: dict[str, Any]) -> None:
    out(
        f"epoch {row['epoch']:>3}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}"
        f"  |  val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}  |  lr {row['lr']:.2e}"
        f"  {row['seconds']:.1f}s"
    )
    recall = row.get("val_recall") or {}
    if 1 < len(recall) <= 8:
        out("           val recall  " + "  ".join(f"{c} {r:.2f}" for c, r in recall.items()))


def run_summary(run: Any) -> None:
    """The end of `graft train`: best epoch with its interval, test score, what was skipped."""
    lo, hi = run.val_ci95
    kept = "last" if run.config is not None and run.config.keep == "last" else "best"
    if run.best.get("head") == "fit":
        how = f"{run.best['folds']}-fold CV" if run.best["folds"] else "default"
        kept = f"head fitted (L2 {run.best['l2']:g}, {how})"
        if run.best.get("refit"):
            kept += f", saved refitted with val ({run.best['refit']['images']} images); before"
    else:
        kept = f"{kept} epoch {run.best['epoch']}"
    out(
        f"{kept}: val acc {run.val_accuracy:.4f} (95% CI {lo:.3f}-"
        f"{hi:.3f}, n={run.val_images}), val loss {run.best['val_loss']:.4f}  "
        f"({run.trainable_params:,} of {run.total_params:,} parameters trained, "
        f"{run.wall_seconds:.1f}s)"
    )
    if run.test:
        lo, hi = run.test["accuracy_ci95"]
        out(f"test acc {run.test['accuracy']:.4f} (95% CI {lo:.3f}-{hi:.3f}, n={run.test['n']})")
    if run.skipped:
        out(f"skipped {len(run.skipped)} unreadable file(s)")
    if run.stopped:
        out(f"stopped early: {run.stopped}")
    out(f"saved {run.run_dir}")


def compare_row(row: dict[str, Any]) -> None:
    """One candidate as it finishes (or is skipped), on stderr like the epoch lines."""
    if row["status"] == "scored":
        lo, hi = row["accuracy_ci95"]
        what = f"fold acc {row['accuracy']:.4f} ({lo:.3f}-{hi:.3f}, n={row['scored_images']})"
    else:
        what = f"{row['status']}: {row['note']}"
    typer.echo(f"  {row['candidate']}: {what}, {row['seconds']:.1f}s", err=True)


def comparison(c: dict[str, Any]) -> None:
    """The comparison table, best first, and how it was obtained."""
    from ..outputs.pages import COMPARE_HEADER, comparison_rows, fmt

    rows = [[fmt(v) for v in r] for r in comparison_rows(c)]
    header = COMPARE_HEADER[:-1]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  status")
    for r in rows:
        out("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
    out(f"{c['protocol']}; {c['wall_s']:.0f} s of a {c['budget_s']:.0f} s budget")
    out(f"chosen: {c['chosen'] or 'none'}")


def predictions(results: Sequence[Any], fmt: str) -> None:
    """One row per file: `text` (tab-separated: the decision and the probabilities), `json`, or
    `csv` (path,rank,class,probability,error,decision,unknown_score: one row per class shown)."""
    from ..workflows.predict import CSV_HEADER, as_record, csv_lines

    if fmt == "json":
        as_json([as_record(r) for r in results])
    elif fmt == "csv":
        out(CSV_HEADER)
        for r in results:
            for line in csv_lines(r):
                out(line)
    else:
        for r in results:
            out(f"{_one_field(r.path)}\t{decision_text(r)}")


def decision_text(r: Any) -> str:
    """`bag 0.91, shirt 0.05` when the decision is the top class; `unknown (closest: bag
    0.41, ...)`; `review: risked 0.55, approved 0.40`; `risked: approved 0.60, risked 0.35` when
    a class's threshold claims an image that another class tops."""
    if r.error:
        return f"error: {r.error}"
    shown = ", ".join(f"{c} {p:.2f}" for c, p in r.probs.items())
    if r.decision is None or r.decision == next(iter(r.probs)):
        return shown
    if r.decision == "unknown":
        return f"unknown (closest: {shown})"
    return f"{r.decision}: {shown}"


def _one_field(text: str) -> str:
    """A file name as one tab-separated field on one line: control characters (a tab or a
    newline in the name) written as escapes, as `ls -b` does; --json keeps the name as it is."""
    if all(ch.isprintable() or ch == " " for ch in text):
        return text
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def evaluation(report: dict[str, Any]) -> None:
    from ..outputs.card import share_text
    from ..outputs.report import calibration_line

    lo, hi = report["accuracy_ci95"]
    out(f"accuracy {report['accuracy']:.4f}  (95% CI {lo:.3f}-{hi:.3f}, n={report['n']})")
    if report.get("calibration"):
        out(f"calibration: {calibration_line(report['calibration'])}")
    out(f"{'class':<20} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name, m in report["per_class"].items():
        out(
            f"{name:<20} {m['precision']:>9.3f} {m['recall']:>9.3f} {m['f1']:>9.3f} "
            f"{m['support']:>8}"
        )
    out("\nconfusion matrix (rows: true, columns: predicted)")
    classes = report["classes"]
    width = max(6, *(len(c) for c in classes)) + 1
    out(" " * width + "".join(f"{c[: width - 1]:>{width}}" for c in classes))
    for name, row in zip(classes, report["confusion_matrix"]):
        out(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    if report.get("decisions"):
        d = report["decisions"]
        out(f"\ndecisions: review {share_text(d['review'])}, unknown {share_text(d['unknown'])}")
    for s in report["skipped"]:
        out(f"skipped {s['path']}: {s['reason']}")


def operating_point(decision: dict[str, Any] | None, val: dict[str, Any] | None) -> None:
    """Per class: its target and threshold, then precision, recall and the shares sent to
    review and caught on the val split, with 95% intervals."""
    from ..outputs.card import OPERATING_HEADER, operating_rows, share_text

    decision = decision or {}
    unknown = decision.get("unknown")
    if unknown:
        out(f"unknown: {unknown['method']} k={unknown['k']}, threshold {unknown['threshold']:.4f}")
    else:
        out("unknown: no unknown score in this model")
    if decision.get("chosen_on") and decision.get("thresholds"):
        out(f"thresholds chosen on {decision['chosen_on']}")
    if not val:
        return
    out(
        f"on the val split (n={val['n']}): review {share_text(val['review'])}, unknown "
        f"{share_text(val['unknown'])}; caught: not decided as another class"
    )
    rows = operating_rows(decision, val)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(OPERATING_HEADER)]
    for r in [OPERATING_HEADER, *rows]:
        out("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def verification(split: Any, bad: Sequence[Any], large: Sequence[Any], fmt: str) -> None:
    counts = split.counts()
    if fmt == "json":
        as_json(
            {
                "classes": split.classes,
                "counts": counts,
                "layout": split.layout,
                "bad": [{"path": b.path, "reason": b.reason} for b in bad],
                "large": [{"path": b.path, "note": b.reason} for b in large],
            }
        )
        return
    for name, per_class in counts.items():
        out(
            f"{name}: {sum(per_class.values())} images  "
            + ", ".join(f"{c} {n}" for c, n in per_class.items())
        )
    for b in large:
        out(f"large: {b.path}: {b.reason}")
    for b in bad:
        out(f"bad: {b.path}: {b.reason}")
    out(f"{len(bad)} bad file(s)" if bad else "all images decode")


def export_result(r: Any) -> None:
    out(
        f"{r.path}: parity on {r.images} {r.source} image(s): max |p_onnx - p_torch| = "
        f"{r.max_abs_diff:.2e}, top-1 agreement {r.top1_agreement:.0%}"
    )


def backbone_table(infos: Sequence[Any]) -> None:
    out(f"{'name':<22} {'source':<12} {'params':>12} {'input':>6}  weights offline")
    for i in infos:
        offline = "yes" if i.offline else "no (downloads on first use)"
        out(f"{i.name:<22} {i.source:<12} {i.params:>12,} {i.input_size:>6}  {offline}")
    out("any timm model: timm:<name>  (weights download on first use, or --weights PATH)")
