"""`graft audit`: a folder's problems found before training, and a corrected copy built from the
fixes a person approved. The user's folder is only ever read.

One pass: the frozen backbones' features of every image (the same cache training uses, so an
audit then a training extract the features once), then seconds of arithmetic on them
(core/cleaning.py): label issues by confident learning on out-of-fold linear heads (on the
features of every backbone named, joined: by default the three embedded ones, AUDIT_BACKBONE),
near-duplicates (within a class: redundant; across classes: a conflict; across splits: leakage
that flatters val) and outliers (far from every other image) in the first backbone's features
(their thresholds were set on lite0's), unusable or suspicious files, class balance. Written to
OUT: audit.json, audit.html (thumbnails, worst first) and fixes.csv, the suggestions prefilled
for a person to edit.

Fixing is a separate, explicit step: `apply_fixes` (`graft audit DATA --apply fixes.csv --out
NEW`) builds a corrected copy of the folder (hard links where the file system allows, copies
otherwise) that can be trained on and compared with the original; chosen over excluding files at
training time because a relabelled image must move to another class folder, and because the
copy can be diffed, kept and trained by any tool, graft or not. A folder labelled by a table
(`labels=`) gets the same copy with the images where they were and a corrected table,
OUT/metadata.csv (Hugging Face's `file_name`, `label`, and `split` if the table had one).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..core.cleaning import (
    THUMB_CROPS,
    THUMB_SIDE,
    judged_probabilities,
    label_issues,
    near_duplicates,
    outlier_scores,
    thumbnails,
)
from ..core.constants import AUDIT_BACKBONE
from ..core.decisions import normalise
from ..core.errors import ConfigError, DatasetError, GraftError
from ..core.runfolder import AUDIT_DIR, AUDIT_HTML, AUDIT_JSON, FIXES_CSV
from ..core.runtime import Progress, atomic_write_text, no_progress, resolve_runtime
from ..data.discovery import discover, image_index
from ..data.images import load_image
from ..data.table import read_table
from ..frozen.features import FeatureSet, extract_features
from ..models.backbones import create_backbone
from ..models.concat import parts
from ..outputs.auditpage import audit_page

log = logging.getLogger(__name__)

TABLE_CSV = "metadata.csv"  # the corrected table of a folder labelled by one
FIX_FIELDS = ["path", "action", "to", "kind", "given", "score"]
ACTIONS = ("relabel", "drop", "keep")
TINY_SHARE = 4  # a shorter side under a quarter of the folder's usual one: a thumbnail slipped in
ASPECT = 5.0  # longer side over shorter: a banner or a strip, not a photo of one thing
BLANK = 3.0  # standard deviation of the grey levels (0-255): a nearly uniform picture
RELABEL_SURE = 0.8  # the suggested class's out-of-fold probability that prefills "relabel"
IMBALANCE = 3.0  # largest class over smallest: worth saying


@dataclass
class Audit:
    out_dir: Path
    classes: list[str]
    images: int
    issues: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    backbone: str = AUDIT_BACKBONE

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(i["kind"] for i in self.issues))


def audit(
    data_dir: str | Path,
    out: str | Path = AUDIT_DIR,
    backbone: str = AUDIT_BACKBONE,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: Progress = no_progress,
    labels: str | Path | None = None,
    path_column: str | None = None,
    label_column: str | None = None,
) -> Audit:
    """Find a folder's label issues, near-duplicates, outliers, bad files and imbalance; write
    OUT/audit.json, audit.html and fixes.csv. Nothing in `data_dir` is written. `backbone`: one
    name, or several joined by '+' (each extracted and cached on its own, as training caches
    it): labels are judged on all their features together, near-duplicates and outliers found
    in the first one's.

    >>> graft.audit("data/moderation", out="audit").by_kind()  # doctest: +SKIP
    {'label': 12, 'duplicate': 3, 'outlier': 4}
    """
    start = time.perf_counter()
    out = Path(out)
    split = discover(
        data_dir, seed=seed, labels=labels, path_column=path_column, label_column=label_column
    )
    _check_out(out, Path(split.root))
    # every image once, with the split it is in ("" for a flat folder: one pool)
    tagged = [
        (p, y, "" if split.layout == "flat" else name)
        for name, samples in split.splits().items()
        for p, y in samples
    ]
    samples = [(p, y) for p, y, _ in tagged]
    where = {p: s for p, _, s in tagged}
    runtime = resolve_runtime(device, "auto")
    fs, judge, bad = _features(backbone, len(split.classes), samples, runtime, cache_dir, progress)
    feats, labels = normalise(fs.features), fs.labels
    paths = [p for p, _ in fs.samples]
    classes = split.classes
    issues: list[dict[str, Any]] = []
    for b in bad:
        issues.append(_issue("unreadable", [b.path], _given(b.path, samples, classes), b.reason))
    found_in_files, thumbs = _file_issues(fs.samples, classes)
    issues += found_in_files
    counts = torch.bincount(labels, minlength=len(classes))
    if len(labels) < 2 or int(counts.min()) < 2:  # no fold can hold an image of every class out
        log.warning("label issues need two readable images of every class: not looked for")
        probs = torch.zeros(len(labels), len(classes))
        found = []
    else:
        probs, l2 = judged_probabilities(judge, labels, len(classes), seed)
        log.info("label issues: judged by out-of-fold heads at L2 %g on %s", l2, backbone)
        found = label_issues(probs, labels)
    for i, k, conf in found:
        issues.append(
            {
                **_issue("label", [paths[i]], classes[labels[i]]),
                "suggested": classes[k],
                "score": conf,
                "split": where[paths[i]],
                "suggested_probability": round(float(probs[i, k]), 6),
            }
        )
    if len(feats):
        issues += _duplicates(feats, thumbs, labels, paths, where, classes, probs)
    distance, fence = outlier_scores(feats)
    for i in distance.argsort(descending=True).tolist():
        if distance[i] <= fence:
            break
        issues.append(
            {**_issue("outlier", [paths[i]], classes[labels[i]]), "score": _r(distance[i])}
        )
    issues += _balance(split.counts())
    result = Audit(out, classes, len(samples), issues, split.counts(), backbone=backbone)
    result.seconds = round(time.perf_counter() - start, 2)
    _write(result, split.root)
    log.info("audit of %d images: %s (%.1fs)", len(samples), result.by_kind(), result.seconds)
    return result


def _features(
    backbone: str, classes: int, samples: list, runtime, cache_dir, progress: Progress
) -> tuple[FeatureSet, torch.Tensor, list]:
    """The first backbone's features of the images every named backbone read, their features
    joined (each L2-normalised, so each network weighs alike) for judging labels, and the files
    some backbone could not read (a file changed between passes counts as unreadable)."""
    names = parts(backbone)
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError(
            f"backbone {backbone!r}: one backbone, or different ones joined by '+' "
            f"(the audit's default: {AUDIT_BACKBONE})"
        )
    digests: dict[str, str] = {}  # each file hashed once, for every network's cache
    sets = [
        extract_features(
            create_backbone(n, classes),
            samples,
            runtime,
            cache_dir,
            progress=progress,
            digests=digests,
        )
        for n in names
    ]
    bad = {b.path: b for fs in reversed(sets) for b in fs.bad}
    keep = [(p, y) for p, y in sets[0].samples if p not in bad]
    rows = [{p: i for i, (p, _) in enumerate(fs.samples)} for fs in sets]
    picked = [torch.tensor([r[p] for p, _ in keep], dtype=torch.long) for r in rows]
    first = sets[0]
    fs = FeatureSet(first.features[picked[0]], first.aug[picked[0]], first.labels[picked[0]], keep)
    judge = torch.cat([normalise(s.features[i]) for s, i in zip(sets, picked)], 1)
    order = {p: i for i, (p, _) in enumerate(samples)}
    return fs, judge, sorted(bad.values(), key=lambda b: order.get(b.path, len(order)))


def _r(x: Any) -> float:
    return round(float(x), 6)


def _issue(kind: str, paths: list[str], given: Any, reason: str | None = None) -> dict[str, Any]:
    out = {"kind": kind, "paths": paths, "given": given, "suggested": None, "score": None}
    if reason is not None:
        out["reason"] = reason
    return out


def _given(path: str, samples: list, classes: list[str]) -> str | None:
    return next((classes[y] for p, y in samples if p == path), None)


def _file_issues(samples: list, classes: list[str]) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Tiny (beside the folder's usual size), nearly blank and extreme-aspect pictures: readable,
    but suspicious; and each sample's thumbnails for the near-duplicate check, from the same
    decode (zeros for a file that does not decode: it matches nothing)."""
    sizes, out = {}, []
    thumbs = torch.zeros(len(samples), len(THUMB_CROPS) + 1, THUMB_SIDE**2, dtype=torch.uint8)
    for path, _ in samples:
        try:
            with Image.open(path) as im:
                sizes[path] = im.size
        except OSError:
            continue  # unreadable ones are reported as such
    usual = sorted(min(s) for s in sizes.values())[len(sizes) // 2] if sizes else 0
    for n, (path, y) in enumerate(samples):
        if path not in sizes:
            continue
        w, h = sizes[path]
        try:
            picture = load_image(path, 64)
        except GraftError:
            continue
        thumbs[n] = thumbnails(picture)
        small = picture.convert("L")
        std = float(np.asarray(small, dtype=np.float32).std())
        found = []
        if min(w, h) < usual / TINY_SHARE:
            found.append(
                ("tiny", f"{w}x{h} pixels, the folder's usual shorter side {usual}", min(w, h))
            )
        if max(w, h) / max(1, min(w, h)) > ASPECT:
            found.append(("aspect", f"{w}x{h}: aspect {max(w, h) / min(w, h):.1f}", w / h))
        if std < BLANK:
            found.append(("blank", f"nearly uniform (grey-level std {std:.1f})", std))
        for sub, reason, score in found:
            out.append(
                {**_issue("file", [path], classes[y], reason), "subkind": sub, "score": _r(score)}
            )
    return out, thumbs


def _duplicates(feats, thumbs, labels, paths, where, classes, probs) -> list[dict[str, Any]]:
    out = []
    for i, j, sim in near_duplicates(feats, thumbs):
        a, b = paths[i], paths[j]
        if where[a] != where[b]:
            sub = "leak"  # the same picture in train and val: val flatters
        elif labels[i] != labels[j]:
            sub = "conflict"  # the same picture under two classes: one label is wrong
        else:
            sub = "redundant"
        issue = _issue("duplicate", [a, b], [classes[labels[i]], classes[labels[j]]])
        issue.update(subkind=sub, score=sim, splits=[where[a], where[b]])
        issue["feature_similarity"] = _r(feats[i] @ feats[j])
        if sub == "conflict":  # the label the out-of-fold heads believe less
            weak = i if probs[i, labels[i]] < probs[j, labels[j]] else j
            issue["suggested_drop"] = paths[weak]
        out.append(issue)
    return out


def _balance(counts: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    total = Counter()
    for per_class in counts.values():
        total.update(per_class)
    if not total:
        return []
    big, small = max(total.values()), min(total.values())
    ratio = big / max(1, small)
    if ratio < IMBALANCE:
        return []
    least = min(total, key=total.get)
    return [
        {
            **_issue("balance", [], None),
            "score": round(ratio, 2),
            "reason": f"the largest class has {ratio:.1f}x the images of the smallest ({least}: "
            f"{small}); train with --balance weights or sampler, and read per-class recall, "
            "not accuracy",
            "counts": dict(total),
        }
    ]


def _check_out(out: Path, root: Path) -> None:
    o, r = out.resolve(), root.resolve()
    if o == r or r in o.parents:
        raise ConfigError(f"--out {out} is inside the data folder {root}: put the audit elsewhere")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if out.is_dir():
        theirs = [
            p.name for p in out.iterdir() if p.name not in (AUDIT_JSON, AUDIT_HTML, FIXES_CSV)
        ]
        if theirs:
            raise ConfigError(
                f"--out {out} holds other files ({', '.join(sorted(theirs)[:3])}); an audit "
                "writes only into a new or empty folder or over an audit: choose another --out"
            )


def _write(result: Audit, root: str) -> None:
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731 - paths in fixes.csv: relative to DATA
    doc = {
        "data_dir": root,
        "classes": result.classes,
        "images": result.images,
        "counts": result.counts,
        "backbone": result.backbone,
        "by_kind": result.by_kind(),
        "seconds": result.seconds,
        "issues": result.issues,
    }
    atomic_write_text(out / AUDIT_JSON, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(FIX_FIELDS)
    for row in fix_rows(result.issues):
        w.writerow([rel(row[0]), *row[1:]])
    atomic_write_text(out / FIXES_CSV, buf.getvalue())
    atomic_write_text(out / AUDIT_HTML, audit_page(doc))


def fix_rows(issues: list[dict[str, Any]]) -> list[list[Any]]:
    """The prefilled fixes, one row per file: relabel to a sure suggestion, drop an unreadable or
    blank file and the val/test copy of a training image; keep, to be looked at, the rest: the
    unsure label issues (dropping the 66 of them on bench/audit.py's digits, 39% of them really
    moved, cost 7 points), the second of a redundant pair, the weaker label of a conflict,
    outliers and other suspicious files."""
    rows: dict[str, list[Any]] = {}

    def add(path, action, to, kind, given, score):
        if path not in rows or rows[path][1] == "keep":
            rows[path] = [
                path,
                action,
                to or "",
                kind,
                given or "",
                score if score is not None else "",
            ]

    for i in issues:
        kind, ps = i["kind"], i["paths"]
        if kind == "label":  # relabel where the heads are sure; the rest for a person
            sure = i["suggested_probability"] >= RELABEL_SURE
            action = "relabel" if sure else "keep"
            add(ps[0], action, i["suggested"], kind, i["given"], i["score"])
        elif kind == "unreadable":
            add(ps[0], "drop", None, kind, i["given"], None)
        elif kind == "file":
            add(
                ps[0],
                "drop" if i["subkind"] == "blank" else "keep",
                None,
                f"file:{i['subkind']}",
                i["given"],
                i["score"],
            )
        elif kind == "outlier":
            add(ps[0], "keep", None, kind, i["given"], i["score"])
        elif kind == "duplicate":
            # only the val/test copy of a training image is dropped by default (it flatters val);
            # a pair in one split may be two pictures that look alike to the network (digits
            # at 8x8: bench/audit.py dropped 106 of 310 that way, and 14 points of accuracy)
            sub = i["subkind"]
            if sub == "leak":
                victim = ps[1] if i["splits"][0] == "train" else ps[0]
                action = "drop"
            else:
                victim = i.get("suggested_drop") or ps[1]
                action = "keep"
            given = i["given"][ps.index(victim)]
            add(victim, action, None, f"duplicate:{sub}", given, i["score"])
    return list(rows.values())


def apply_fixes(
    data_dir: str | Path,
    fixes: str | Path,
    out: str | Path,
    labels: str | Path | None = None,
    path_column: str | None = None,
    label_column: str | None = None,
) -> dict[str, int]:
    """A corrected copy of `data_dir` in `out`: every image linked (or copied) to the same place,
    relabelled ones into their new class folder (or, for a folder labelled by a table, with
    their new class in OUT/metadata.csv), dropped ones left out. Every line of `fixes` is checked
    before anything is written; nothing in `data_dir` changes."""
    root, out = Path(data_dir).resolve(), Path(out)
    o = out.resolve()
    if o == root or root in o.parents:
        raise ConfigError(
            f"--out {out} is inside the data folder {data_dir}: put the copy elsewhere"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder: name a new folder")
    if labels is not None:
        table = read_table(labels, root, image_index(root), path_column, label_column)
        rows = {os.path.normpath(r.path): (r.label, r.split) for r in table.rows}
    else:
        split = discover(data_dir)
        rows = {os.path.normpath(p): (split.classes[y], None) for p, y in split.samples()}
    classes = sorted({c for c, _ in rows.values()})
    plan = _read_fixes(Path(fixes), root, {p: c for p, (c, _) in rows.items()}, classes)
    counts: Counter = Counter()
    table_rows = []
    for path in sorted(rows):
        action, to = plan.get(path, ("keep", None))
        if action == "drop":
            counts["dropped"] += 1
            continue
        parts = list(Path(path).relative_to(root).parts)
        label, split_name = rows[path]
        if action == "relabel":
            counts["relabelled"] += 1
            label = to
            if labels is None:
                parts[-2] = to
        target = _free(out.joinpath(*parts)) if labels is None else out.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
        counts["written"] += 1
        table_rows.append([Path(*parts).as_posix(), label, split_name])
    if labels is not None:
        _write_table(out / TABLE_CSV, table_rows, with_split=table.split_column is not None)
    return dict(counts)


def _write_table(path: Path, rows: list[list], with_split: bool) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file_name", "label", "split"] if with_split else ["file_name", "label"])
    writer.writerows(r if with_split else r[:2] for r in rows)
    atomic_write_text(path, buf.getvalue())


def _read_fixes(path: Path, root: Path, known: dict[str, str], classes: list[str]) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"path", "action"} <= set(reader.fieldnames):
        raise ConfigError(f"{path}: the first line must name the columns path,action,to")
    plan = {}
    for n, row in enumerate(reader, start=2):
        where = f"{path} line {n}"
        rel = row.get("path") or ""
        action, to = (row.get("action") or "").strip(), (row.get("to") or "").strip()
        full = os.path.normpath(os.path.join(root, rel))
        if Path(rel).is_absolute() or os.path.commonpath([full, str(root)]) != str(root):
            raise ConfigError(f"{where}: {rel!r} is outside the data folder {root}")
        if full not in known:
            raise DatasetError(f"{where}: {rel!r} is not an image of {root} (moved or deleted?)")
        if action not in ACTIONS:
            raise ConfigError(f"{where}: action {action!r} is not one of {', '.join(ACTIONS)}")
        if action == "relabel" and to not in classes:
            raise ConfigError(
                f"{where}: relabel to {to!r}, which is not a class; the classes are "
                f"{', '.join(classes)}"
            )
        plan[full] = (action, to or None)
    return plan


def _free(target: Path) -> Path:
    """`target`, or `name-2.ext`, `name-3.ext`... when a relabelled image meets one of the same
    name in its new class folder."""
    n, free = 1, target
    while free.exists():
        n += 1
        free = target.with_name(f"{target.stem}-{n}{target.suffix}")
    return free
