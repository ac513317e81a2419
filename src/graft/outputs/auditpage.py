"""audit.html: a folder audit as one self-contained page a person can go through in minutes:
grouped by kind, worst first, each issue with its thumbnails, the given and the suggested class."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from ..core.errors import GraftError
from ..data.images import load_image
from .pages import page, table

THUMB = 112  # pixels, the longer side
SHOWN = 60  # issues per kind on the page; audit.json and fixes.csv hold them all
KINDS = {  # kind -> (heading, what it means)
    "label": (
        "Label issues",
        "Out-of-fold heads (never trained on the image) believe another class: the given label "
        "may be wrong. Worst first (the given class's probability, lowest first).",
    ),
    "duplicate": (
        "Near-duplicates",
        "The same picture, resized, recompressed or lightly cropped. conflict: under two "
        "classes; leak: in train and in val/test (val flatters); redundant: twice in a class.",
    ),
    "outlier": (
        "Outliers",
        "Far from every other image in the folder (beyond Q3 + 3 IQR of the nearest-image "
        "distances): another kind of picture, or a rare one worth more examples.",
    ),
    "unreadable": ("Unreadable files", "Training stops on these (or skips them: --skip-bad)."),
    "file": ("Suspicious files", "Tiny, nearly blank or of an extreme aspect ratio."),
    "balance": ("Class balance", ""),
}


def thumbnail(path: str) -> str:
    """An <img> of the file as a small inline JPEG, or a note when it cannot be read."""
    try:
        im = load_image(path, THUMB)
    except GraftError as exc:
        return f'<span class="muted">{html.escape(str(exc))}</span>'
    im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return f'<img class="thumb" alt="{html.escape(path)}" title="{html.escape(path)}" src="{uri}">'


def _card(issue: dict[str, Any]) -> str:
    given = issue.get("given")
    given = " / ".join(given) if isinstance(given, list) else given
    lines = [f"given: <b>{html.escape(str(given))}</b>"]
    if issue.get("suggested"):
        lines.append(f"suggested: <b>{html.escape(issue['suggested'])}</b>")
    if issue.get("subkind"):
        lines.append(html.escape(issue["subkind"]))
    if issue.get("score") is not None:
        lines.append(f"score {issue['score']:.3f}")
    if issue.get("reason"):
        lines.append(html.escape(issue["reason"]))
    names = "<br>".join(html.escape(p) for p in issue["paths"])
    thumbs = "".join(thumbnail(p) for p in issue["paths"])
    return (
        f'<div class="issue {issue["kind"]}">{thumbs}<div class="what">'
        + " &middot; ".join(lines)
        + f'<div class="muted small">{names}</div></div></div>'
    )


CSS = """<style>.issue{display:flex;gap:.8em;align-items:center;border-bottom:1px solid #eee;
padding:.4em 0}.thumb{width:112px;height:112px;object-fit:contain;background:#f4f4f4}
.what{text-align:left}.small{font-size:.85em}</style>"""


def audit_page(doc: dict[str, Any]) -> str:
    """The page for audit.json's content."""
    by_kind = doc["by_kind"]
    summary = table(
        ["", ""],
        [
            ["images", doc["images"]],
            ["classes", ", ".join(doc["classes"])],
            *[[KINDS.get(k, (k,))[0], n] for k, n in by_kind.items()],
            ["seconds", doc["seconds"]],
        ],
    )
    sections = [("summary", "Summary", CSS + summary)]
    for kind, (heading, note) in KINDS.items():
        mine = [i for i in doc["issues"] if i["kind"] == kind]
        if not mine:
            continue
        more = len(mine) - SHOWN
        body = f'<p class="muted">{html.escape(note)}</p>' if note else ""
        if kind == "balance":
            body += "".join(f"<p>{html.escape(i['reason'])}</p>" for i in mine)
        else:
            body += "".join(_card(i) for i in mine[:SHOWN])
        if more > 0:
            body += f'<p class="muted">and {more} more in audit.json and fixes.csv</p>'
        sections.append((kind, f"{heading} ({len(mine)})", body))
    if len(sections) == 1:
        sections.append(("none", "No issues found", "<p>Nothing to fix.</p>"))
    sections.append(
        (
            "fixing",
            "Fixing",
            "<p>fixes.csv holds one line per file with the suggested action (relabel, drop or "
            "keep): edit it, then <code>graft audit DATA --apply fixes.csv --out NEW</code> "
            "builds a corrected copy to train on. Nothing in the data folder is changed.</p>",
        )
    )
    return page(f"graft audit: {doc['data_dir']}", f"{doc['images']} images", sections)
