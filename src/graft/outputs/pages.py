"""Self-contained HTML pages: the pieces report.html and compare.html share (style, tables,
embedded PNGs), and the comparison's files (compare.json, compare.html with its plot)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from ..core.runfolder import COMPARE_HTML, COMPARE_JSON
from ..core.runtime import atomic_write_text

DPI = 100

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}h1{margin-bottom:0}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid
#ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{
text-align:left}img{max-width:100%;border:1px solid #eee}section{margin:2em 0}.muted{color:#777}"""


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def png_tag(data: bytes, alt: str) -> str:
    data_uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return f'<img alt="{html.escape(alt)}" src="{data_uri}">'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """A whole page: `sections` are (id, heading, inner HTML)."""
    body = "".join(
        f'<section id="{sid}"><h2>{heading}</h2>{content}</section>'
        for sid, heading, content in sections
    )
    title = html.escape(title)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{CSS}</style></head><body><h1>{title}</h1>"
        f"<p class='muted'>{html.escape(subtitle)}</p>{body}</body></html>\n"
    )


# ---------------------------------------------------------------- the comparison

COMPARE_HEADER = [
    "rank",
    "candidate",
    "fold accuracy",
    "95% interval",
    "fold loss",
    "scored",
    "folds",
    "seconds",
    "trainable params",
    "epochs",
    "status",
]


def comparison_rows(comparison: dict[str, Any]) -> list[list[Any]]:
    """The table of `graft compare`, one list per candidate, best first."""
    out = []
    for r in comparison["rows"]:
        ci = r.get("accuracy_ci95")
        status = r["status"] + (f": {r['note']}" if r.get("note") else "")
        out.append(
            [
                r.get("rank") or "-",
                r["candidate"],
                r.get("accuracy"),
                f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "",
                r.get("loss"),  # older compare.json files have none
                r.get("scored_images"),
                f"{r.get('folds', 0)}/{comparison['folds']}",
                f"{r.get('seconds', 0):.1f}",
                r.get("trainable_params"),
                r["settings"]["epochs"],
                status,
            ]
        )
    return out


def comparison_section(comparison: dict[str, Any]) -> str:
    """The table and how it was made, for compare.html and the report."""
    chosen = comparison.get("chosen") or "none (no candidate finished in time)"
    return (
        f"<p>Chosen: <b>{html.escape(chosen)}</b>. {html.escape(comparison['protocol'])}. "
        f"Budget {comparison['budget_s']:.0f} s, used {comparison['wall_s']:.0f} s. Ranked by "
        "the low end of the fold accuracy's 95% interval (a candidate scored on fewer images "
        "must be right more often), then the fold loss; the winner's fold scores are the best over "
        "candidates, so they flatter it: they rank, they are not the model's accuracy.</p>"
        + table(COMPARE_HEADER, comparison_rows(comparison))
    )


def write_comparison(folder: str | Path, comparison: dict[str, Any]) -> None:
    """compare.json (every row) and compare.html (the table and accuracy against time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import accuracy_vs_time

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / COMPARE_JSON, json.dumps(comparison, indent=2) + "\n")
    fig = accuracy_vs_time(comparison["rows"])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    sections = [
        ("table", "Candidates, best first", comparison_section(comparison)),
        ("plot", "Accuracy against time", png_tag(buf.getvalue(), "accuracy vs time")),
    ]
    title = f"graft compare: {Path(comparison['data_dir']).name}"
    atomic_write_text(folder / COMPARE_HTML, page(title, comparison["data_dir"], sections))
