"""The model card: `RUN/README.md` in Hugging Face's model-card form (a YAML header with library,
tags and metrics, then intended use, classes, data, training, evaluation and limitations), made
from model.json alone, so every number in it is the saved model's."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import yaml

from ..core.runfolder import CARD
from ..core.runtime import atomic_write_text
from ..models.modelfile import ModelMeta, read_meta


def write_card(run_dir: str | Path) -> Path:
    """Write (or rewrite) RUN/README.md from RUN/model.json; return its path.

    >>> graft.card.write_card("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/README.md')
    """
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    path = run_dir / CARD
    atomic_write_text(path, model_card(meta, run_dir.name))
    return path


def model_card(meta: ModelMeta, name: str) -> str:
    val, test, cfg = meta.val or {}, meta.test, meta.config or {}
    classes, backbone = meta.classes, meta.backbone
    data = Path(str(meta.data_dir or "")).name or "images"
    metrics = [_metric("accuracy", val["accuracy"], "val accuracy", data, "val")] if val else []
    if test:
        metrics.append(_metric("accuracy", test["accuracy"], "test accuracy", data, "test"))
    header = {
        "library_name": "graft",
        "pipeline_tag": "image-classification",
        "tags": ["graft", "image-classification", "transfer-learning", backbone],
        "metrics": ["accuracy"],
        "model-index": [{"name": name, "results": metrics}],
    }
    parts = [
        "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n",
        f"# {_md(name)}: {_md(backbone)} classifier for {len(classes)} classes\n",
        _intended_use(classes),
        _classes(meta, classes),
        _training(meta, cfg),
        _evaluation(
            val, test, cfg.get("keep", "best"), isinstance(best_row(meta).get("refit"), dict)
        ),
        _decisions(meta, val),
        _limitations(meta, classes, val),
        _usage(name),
    ]
    return "\n".join(parts)


def _metric(kind: str, value: float, label: str, data: str, split: str) -> dict[str, Any]:
    return {
        "task": {"type": "image-classification"},
        "dataset": {"name": data, "type": "imagefolder", "split": split},
        "metrics": [{"type": kind, "value": round(float(value), 4), "name": label}],
    }


def _intended_use(classes: list[str]) -> str:
    return (
        "## Intended use\n\nSorts one picture into one of these classes: "
        f"{', '.join(map(_md, classes))}. It was trained by transfer learning from an "
        "ImageNet-pretrained network on the labelled folder below, and is meant for pictures "
        "like those.\n"
    )


def _classes(meta: ModelMeta, classes: list[str]) -> str:
    counts = meta.class_counts or {}
    splits = list(counts)
    rows = [f"| class | {' | '.join(splits)} |", "|---|" + "---:|" * len(splits)]
    rows += [
        f"| {_md(c)} | " + " | ".join(str(counts[s].get(c, 0)) for s in splits) + " |"
        for c in classes
    ]
    skipped = meta.skipped_files or []
    note = f"\n{len(skipped)} unreadable file(s) were left out.\n" if skipped else ""
    table = meta.labels or {}
    source = f"{meta.layout} layout"  # then the table, if the classes came from one
    if isinstance(table.get("file"), str):  # model.json is untrusted: shown only as text
        digest = _md(str(table.get("sha256")))
        source += f"; classes from the table {_md(table['file'])}, sha256 {digest}"
    return (
        f"## Classes and data\n\nFrom {_md(str(meta.data_dir))} ({source}), images per "
        "split:\n\n" + "\n".join(rows) + "\n" + note
    )


def best_row(meta: ModelMeta) -> dict[str, Any]:
    """model.json's row of the kept weights: a dict, whatever a file from elsewhere holds."""
    return meta.best if isinstance(meta.best, dict) else {}


def _training(meta: ModelMeta, cfg: dict[str, Any]) -> str:
    best = best_row(meta)
    blocks, spec = meta.trainable_blocks or [], meta.preprocess
    what = {
        "extract": "the new head only (frozen backbone, cached features)",
        "finetune": "the whole network",
        "partial": f"the head and blocks {', '.join(blocks)}",
    }.get(meta.strategy, "")
    lines = [
        f"- backbone: `{meta.backbone}` (ImageNet weights), input {spec.input_size} px, "
        f"mean {list(spec.mean)}, std {list(spec.std)}",
        f"- strategy: `{meta.strategy}`: trains {what}; "
        f"{meta.trainable_params or 0:,} of {meta.total_params or 0:,} parameters",
        *_training_lines(meta, cfg, best),
        f"- precision {meta.precision}, {meta.wall_seconds} s of training, "
        f"created {meta.created}, graft {(meta.versions or {}).get('graft')}",
    ]
    cal = meta.calibration or {}
    if cal.get("method") == "temperature":
        lines.append(
            f"- probabilities calibrated: logits divided by {cal['temperature']:.3g}, "
            f"fitted on {cal['fitted_on']}"
        )
    elif cal:
        lines.append(f"- probabilities not calibrated: {cal.get('reason')}")
    if meta.tta == "flip":
        lines.append(
            "- test-time augmentation: each image is read as it is and mirrored left to right, "
            "the head reading their features averaged (two forward passes per image)"
        )
    sel = meta.selection
    if sel:
        n = len(sel["candidates"])
        lines.insert(
            0,
            f"- chosen by `graft train --auto` among {n} candidates "
            f"({sel['protocol']}); retrained {sel['retrained']}",
        )
    return "## Training\n\n" + "\n".join(lines) + "\n"


def _evaluation(
    val: dict[str, Any], test: dict[str, Any] | None, keep: str = "best", refit: bool = False
) -> str:
    if not val:
        return "## Evaluation\n\nThis model was saved before graft scored it; run `graft report`.\n"
    out = ["## Evaluation\n"]
    for label, scores in (("validation", val), ("test", test)):
        if not scores:
            continue
        lo, hi = scores["accuracy_ci95"]
        out.append(
            f"On the {scores['n']} {label} images: accuracy **{scores['accuracy']:.4f}** (95% "
            f"Wilson interval {lo:.3f}-{hi:.3f}), balanced accuracy "
            f"{scores['balanced_accuracy']:.4f}.\n"
        )
        out.append("| class | precision | recall | support |\n|---|---:|---:|---:|")
        out += [
            f"| {_md(c)} | {m['precision']:.3f} | {m['recall']:.3f} | {m['support']} |"
            for c, m in scores["per_class"].items()
        ]
        out.append("")
    if keep == "last":
        how = (
            "The validation images took no part in any choice (a fixed number of epochs, the "
            "last kept), so their accuracy is an unbiased estimate"
        )
    else:
        how = (
            "The best epoch was chosen on the validation images, so their accuracy leans optimistic"
        )
    if refit:
        out.append(
            "The validation scores are those of the head fitted on the training images alone, "
            "scored as `graft evaluate` scores a model; the saved head was then fitted again "
            "with the validation images, so `graft evaluate` on them now reads images it "
            "trained on"
            + (
                "; the test scores are the saved head's, on images that took no part in anything."
                if test
                else "."
            )
        )
        return "\n".join(out) + "\n"
    out.append(
        "The saved model is scored exactly as `graft evaluate` scores it. "
        + how
        + ("; the test images took no part in any choice." if test else ".")
    )
    return "\n".join(out) + "\n"


OPERATING_HEADER = ["class", "target", "threshold", "precision", "recall", "review", "caught"]


def operating_rows(decision: dict[str, Any] | None, report: dict[str, Any]) -> list[list[str]]:
    """The operating point per class on a split (`report`: evaluate's "decisions"): target and
    threshold, then precision, recall and the shares sent to review and caught (not decided as
    another class), each with its 95% interval."""
    thresholds = (decision or {}).get("thresholds") or {}
    rows = []
    for name, m in report["per_class"].items():
        t = thresholds.get(name)
        rows.append(
            [
                name,
                f"{t['kind']} {t['target']:g}" if t else "arg-max",
                f"{t['threshold']:.4f}" if t else "-",
                *(share_text(m.get(k)) for k in ("precision", "recall", "review", "caught")),
            ]
        )
    return rows


def share_text(share: dict[str, Any] | None) -> str:
    """'0.950 (0.76-0.99)': a share with its Wilson 95% interval, '-' for none of none."""
    if not isinstance(share, dict) or share.get("value") is None:
        return "-"
    lo, hi = share["ci95"]
    return f"{share['value']:.3f} ({lo:.2f}-{hi:.2f})"


def unknown_text(meta: ModelMeta) -> str:
    """What the unknown score is and how its threshold was set, in one sentence."""
    u = meta.unknown
    if u is None:
        return 'It always answers one of its classes: it has no "none of these".'
    return (
        f'Images unlike every training image are answered "unknown": the distance (1 - cosine '
        f"similarity) to the {_nth(u['k'])} nearest of {u['references']} training images in "
        f"the network's features, above {u['threshold']:.4f}, a level that flags "
        f"{u['flag_rate']:.0%} of held-out training images."
    )


def _nth(k: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def _decisions(meta: ModelMeta, val: dict[str, Any]) -> str:
    d = (val or {}).get("decisions")
    if not d:
        return ""
    rows = operating_rows(meta.decision, d)
    chosen = (meta.decision or {}).get("chosen_on")
    lines = [
        "## Decisions\n",
        unknown_text(meta),
        'Each prediction is a class, "unknown", or "review" (no class claims it, or '
        "several do)"
        + (f"; the thresholds below were chosen on {chosen}." if chosen else ": arg-max.")
        + f" On the {d['n']} validation images: review {share_text(d['review'])}, unknown "
        f"{share_text(d['unknown'])}.\n",
        "| " + " | ".join(OPERATING_HEADER) + " |\n|---|---|---:|---:|---:|---:|---:|",
        *("| " + " | ".join([_md(r[0]), *r[1:]]) + " |" for r in rows),
        "",
    ]
    return "\n".join(lines)


def _limitations(meta: ModelMeta, classes: list[str], val: dict[str, Any]) -> str:
    weakest = min(
        (val.get("per_class") or {}).items(), key=lambda kv: kv[1]["recall"], default=None
    )
    none_of_these = (
        f'- It always answers one of its {len(classes)} classes: it has no "none of these". '
        "A picture of something else still gets a class, often with high confidence."
        if meta.unknown is None
        else '- Its "unknown" is a distance to the training images: a picture of something '
        "else that looks like a class can still get that class, and a few usual pictures are "
        f"flagged ({meta.unknown['flag_rate']:.0%} of held-out training images)."
    )
    items = [
        none_of_these,
        f"- {val.get('n', 0)} validation images give an interval, not a promise: read the 95% "
        "interval above before trusting the second decimal.",
        "- It learned from the folder above: other cameras, lighting, framing or image sizes "
        "can lower its accuracy.",
    ]
    if weakest:
        items.append(
            f"- Weakest class on validation: {_md(weakest[0])} (recall {weakest[1]['recall']:.2f})."
        )
    return "## Limitations\n\n" + "\n".join(items) + "\n"


def _usage(name: str) -> str:
    return (
        "## How to use\n\n```bash\n"
        f"graft predict {name} IMAGE...            # class probabilities\n"
        f"graft serve {name}                       # a web page and an HTTP API\n"
        f"graft export {name}                      # model.onnx, checked against PyTorch\n"
        "```\n\n```python\nimport graft\n"
        f'graft.load("{name}").predict("image.jpg", top_k=3)\n```\n'
    )


_MARKDOWN = str.maketrans({ch: "\\" + ch for ch in "\\`*_{}[]()#+!|~"})


def _md(text: str) -> str:
    """A name as Markdown text: HTML escaped (a renderer that passes HTML must not run a class
    named `<img onerror=...>`), Markdown's own characters escaped (a `|` would break a table),
    and on one line."""
    return html.escape(" ".join(str(text).split()), quote=True).translate(_MARKDOWN)


def _training_lines(meta: ModelMeta, cfg: dict[str, Any], best: dict[str, Any]) -> list[str]:
    """How the weights were made: the fitted head's L2 and how it was chosen, or the epochs."""
    if best.get("head") == "fit":
        how = (
            f"chosen by {best.get('folds')}-fold cross-validation on the training images"
            if best.get("folds")
            else "the default (too few images per class to cross-validate)"
        )
        refit = best.get("refit")
        again = (
            f"; then fitted again on {number(refit.get('images'))} images (training and "
            f"validation) at L2 {number(refit.get('l2'))}, and that head saved"
            if isinstance(refit, dict)
            else ""
        )
        return [
            f"- head: softmax regression fitted by L-BFGS, L2 {number(best.get('l2'))} {how}; "
            f"the val split chose nothing{again}; seed {cfg.get('seed')}"
        ]
    return [
        f"- {cfg.get('epochs')} epochs planned, {cfg.get('keep', 'best')} epoch kept: "
        f"{best.get('epoch')}" + (f" (stopped: {meta.stopped})" if meta.stopped else ""),
        f"- optimizer {cfg.get('optimizer')}, lr {cfg.get('lr')}, batch {cfg.get('batch_size')}, "
        f"schedule {cfg.get('schedule')}, weight decay {cfg.get('weight_decay')}, "
        f"seed {cfg.get('seed')}",
    ]


def number(value: Any) -> str:
    """A number from model.json as text (`%g`), or what is there as it is: a file from
    elsewhere may hold anything, and showing it must not fail."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}"
    return repr(value)
