"""The `graft` commands about data and backbones: verify, audit, suggest, backbones, datasets fetch.
Plain functions with typer annotations, registered on the app in main.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..core.constants import AUDIT_BACKBONE
from . import options, render


def audit(
    data_dir: Annotated[
        Path, typer.Argument(help="Data folder (class folders, or train/val/test).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for audit.json, audit.html, fixes.csv (or --apply's copy)."),
    ] = None,
    apply: Annotated[
        Path | None,
        typer.Option(
            "--apply", help="fixes.csv (edited): build a corrected copy of DATA in --out."
        ),
    ] = None,
    backbone: Annotated[
        str,
        typer.Option(
            help="Backbones whose features compare the images, joined by '+': labels are judged "
            "on all of them, near-duplicates and outliers found in the first one's."
        ),
    ] = AUDIT_BACKBONE,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Feature cache (default: training's).")
    ] = None,
    device: Annotated[str, typer.Option()] = "auto",
    labels: options.Labels = None,
    path_column: options.PathColumn = None,
    label_column: options.LabelColumn = None,
) -> None:
    """Find wrong labels, near-duplicates, outliers, bad files and imbalance before training
    (the data folder is only read); with --apply, build the corrected copy."""
    from ..core.runfolder import AUDIT_HTML
    from ..workflows.audit import apply_fixes
    from ..workflows.audit import audit as run_audit

    if apply is not None:
        if out is None:
            raise typer.BadParameter("--apply needs --out: the new folder for the corrected copy")
        counts = apply_fixes(data_dir, apply, out, labels, path_column, label_column)
        render.out(
            f"{out}: {counts.get('written', 0)} images ({counts.get('relabelled', 0)} relabelled), "
            f"{counts.get('dropped', 0)} dropped; {data_dir} unchanged"
        )
        return
    result = run_audit(
        data_dir,
        out or "audit",
        backbone=backbone,
        cache_dir=cache_dir,
        device=device,
        progress=render.progress,
        labels=labels,
        path_column=path_column,
        label_column=label_column,
    )
    kinds = result.by_kind()
    render.out(
        f"{result.images} images: "
        + (", ".join(f"{n} {k}" for k, n in kinds.items()) if kinds else "no issues")
        + f" ({result.seconds:.1f}s)"
    )
    render.out(f"{result.out_dir / AUDIT_HTML}  (fixes.csv beside it: edit, then --apply)")


def suggest(
    run_dir: Annotated[Path, typer.Argument(help="Run folder from graft train.")],
    unlabeled: Annotated[Path, typer.Argument(help="Folder of unlabelled images.")],
    n: Annotated[int, typer.Option("-n", min=1, help="How many to suggest.")] = 50,
    out: Annotated[Path, typer.Option(help="Folder for suggest.csv and suggest.html.")] = Path(
        "suggestions"
    ),
    method: Annotated[
        str, typer.Option(help="typical (TypiClust), farthest (core-set) or uncertain (margin).")
    ] = "typical",
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Which unlabelled images to label next (default: typical images of what no label covers)."""
    from ..workflows.suggest import SUGGEST_HTML
    from ..workflows.suggest import suggest as run_suggest

    rows = run_suggest(run_dir, unlabeled, n, out, device, method=method)
    for r in rows:
        render.out(f"{r['rank']}\t{r['path']}\t{r['model_guess']} {r['probability']:.2f}")
    render.out(f"{out / SUGGEST_HTML}")


def verify(
    data_dir: Annotated[Path, typer.Argument(help="Data folder to check.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            min=1, help="Refuse images decoding to more pixels (default: Pillow's limit)."
        ),
    ] = None,
) -> None:
    """Check a data folder's layout and decode every image; list each bad file and why."""
    from ..core.constants import MAX_PIXELS
    from ..core.runtime import default_workers
    from ..data.discovery import verify as verify_data

    split, bad, large = verify_data(data_dir, default_workers() + 1, max_pixels or MAX_PIXELS)
    render.verification(split, bad, large, "json" if as_json else "text")
    if bad:
        raise typer.Exit(1)


def backbones(
    name: Annotated[str | None, typer.Argument(help="Show one backbone.")] = None,
    blocks: Annotated[
        bool, typer.Option("--blocks", help="List block names for --unfreeze.")
    ] = False,
) -> None:
    """List the backbones (parameters, input size, weights offline) or one backbone's blocks."""
    from ..models.backbones import create_backbone, list_backbones

    if name is not None:
        bb = create_backbone(name, num_classes=2, pretrained=False)
        render.out(
            f"{bb.name}: input {bb.spec.input_size}px, mean {bb.spec.mean}, std {bb.spec.std}"
        )
        if blocks:
            render.out("blocks (first to last), for --unfreeze:")
            for b in bb.blocks:
                n = sum(p.numel() for p in bb.block(b).parameters())
                render.out(f"  {b:<24} {n:>12,} params")
        return
    render.backbone_table(list_backbones())


def datasets_fetch(
    name: Annotated[str, typer.Argument(help="hymenoptera")],
    dest: Annotated[Path, typer.Argument(help="Folder to unpack into.")] = Path("data"),
    url: Annotated[str | None, typer.Option(help="Download from this URL instead.")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of the zip.")] = None,
) -> None:
    """Download and unpack a public example dataset."""
    from ..data.fetch import fetch_dataset

    bar = None

    def progress(done: int, total: int | None) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(
                total=total, unit="B", unit_scale=True, desc=name, disable=not sys.stderr.isatty()
            )
        bar.update(done - bar.n)

    fetched = fetch_dataset(name, dest, url=url, sha256=sha256, progress=progress)
    if bar is not None:
        bar.close()
    render.out(f"{fetched.path}  ({fetched.bytes:,} bytes, sha256 {fetched.sha256})")
