"""The `graft` commands that train: `train` (one model, or with --auto the best of a comparison)
and `compare` (the comparison alone). Registered on the app in cli.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from . import render

log = logging.getLogger("graft")


def train(
    data_dir: Annotated[
        Path | None, typer.Argument(help="Folder of class folders, or with train/ and val/.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML file of options; flags override it.")
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="Backbone name (graft backbones) or timm:<name>.")
    ] = None,
    strategy: Annotated[str | None, typer.Option(help="extract | finetune | partial")] = None,
    unfreeze: Annotated[
        str | None, typer.Option(help="partial: blocks to train, e.g. layer3,layer4")
    ] = None,
    unfreeze_last: Annotated[
        int | None, typer.Option(help="partial: train the last N blocks")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Local weights file for the backbone.")
    ] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd | adam | adamw")] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    momentum: Annotated[float | None, typer.Option()] = None,
    weight_decay: Annotated[float | None, typer.Option()] = None,
    schedule: Annotated[str | None, typer.Option(help="step | cosine | none")] = None,
    step_size: Annotated[int | None, typer.Option()] = None,
    gamma: Annotated[float | None, typer.Option()] = None,
    label_smoothing: Annotated[float | None, typer.Option()] = None,
    warmup_epochs: Annotated[
        int | None, typer.Option(help="finetune: head-only epochs first")
    ] = None,
    backbone_lr_mult: Annotated[float | None, typer.Option()] = None,
    progressive: Annotated[
        bool | None,
        typer.Option("--progressive/--no-progressive", help="finetune: first half at ~70% size"),
    ] = None,
    patience: Annotated[int | None, typer.Option(help="Early stopping; 0 = off.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    image_size: Annotated[int | None, typer.Option()] = None,
    rotation: Annotated[float | None, typer.Option(help="Random rotation in degrees.")] = None,
    val_fraction: Annotated[float | None, typer.Option()] = None,
    workers: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | mps")] = None,
    precision: Annotated[str | None, typer.Option(help="auto | fp32 | bf16 | fp16")] = None,
    engine: Annotated[
        str | None, typer.Option(help="Frozen extractor: torch | onnxruntime (CPU, faster).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache folder.")] = None,
    cache_views: Annotated[
        int | None,
        typer.Option(help="Augmented views per image in the cache (extract: 0, partial: 4)."),
    ] = None,
    memory_gb: Annotated[
        float | None, typer.Option(help="RAM for decoded images or activations (default 2).")
    ] = None,
    max_pixels: Annotated[
        int | None,
        typer.Option(help="Refuse images decoding to more pixels (default: Pillow's limit)."),
    ] = None,
    skip_bad: Annotated[
        bool | None, typer.Option("--skip-bad", help="Train without unreadable files.")
    ] = None,
    dedupe: Annotated[
        bool | None, typer.Option("--dedupe", help="Drop val/test images identical to train ones.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue an interrupted run (DATA_DIR: where its images are now)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the run already in --out.")
    ] = False,
    report: Annotated[
        bool | None, typer.Option("--report/--no-report", help="Write report.html at the end.")
    ] = None,
    balance: Annotated[str | None, typer.Option(help="none | weights | sampler")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default runs/<time>-<backbone>).")
    ] = None,
    keep: Annotated[
        str | None, typer.Option(help="best: the best val epoch | last: unbiased val accuracy")
    ] = None,
    auto: Annotated[
        bool, typer.Option("--auto", help="Compare backbones and strategies first; train the best.")
    ] = False,
    budget: Annotated[str, typer.Option(help="--auto: time for it all, e.g. 300s, 5m.")] = "5m",
    backbones: Annotated[
        str | None, typer.Option(help="--auto: backbones to try, comma-separated.")
    ] = None,
    strategies: Annotated[
        str | None, typer.Option(help="--auto: strategies to try, e.g. extract,partial.")
    ] = None,
    folds: Annotated[int, typer.Option(min=2, help="--auto: cross-validation folds.")] = 5,
) -> None:
    """Train a classifier and save it in a run folder (--auto: the best of a comparison)."""
    from ..core.config import make_config
    from ..core.dist import from_env
    from ..workflows.train import train as run_train

    options = dict(
        backbone=backbone, strategy=strategy, unfreeze=unfreeze, unfreeze_last=unfreeze_last,
        weights=_str(weights), pretrained=pretrained, epochs=epochs, batch_size=batch_size,
        optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
        schedule=schedule, step_size=step_size, gamma=gamma, label_smoothing=label_smoothing,
        warmup_epochs=warmup_epochs, backbone_lr_mult=backbone_lr_mult, progressive=progressive,
        patience=patience, seed=seed, image_size=image_size, rotation=rotation,
        val_fraction=val_fraction, workers=workers, device=device, precision=precision,
        engine=engine,
        cache_dir=_str(cache_dir), cache_views=cache_views, skip_bad=skip_bad, dedupe=dedupe,
        max_pixels=max_pixels, memory_gb=memory_gb,
        balance=balance, out=_str(out), report=report, keep=keep,
    )  # fmt: skip
    given = {k: v for k, v in options.items() if v is not None}
    main_rank = from_env().is_main  # under torchrun, rank 0 alone prints
    if not main_rank:
        log.setLevel(logging.WARNING)
    show = dict(progress=render.progress, on_epoch=render.epoch_line if main_rank else None)
    if auto:
        if resume is not None or {"backbone", "strategy", "unfreeze", "unfreeze_last"} & set(given):
            raise typer.BadParameter(
                "--auto chooses the backbone and the strategy: limit the choice with "
                "--backbones and --strategies, not with --backbone/--strategy/--unfreeze; "
                "not with --resume"
            )
        show.update(auto=True, budget=budget, backbones=_list(backbones),
                    strategies=_list(strategies), folds=folds,
                    on_row=render.compare_row)  # fmt: skip
    if resume is not None:
        if config is not None or overwrite or set(given) - {"skip_bad"}:
            raise typer.BadParameter(
                "--resume reuses the run's config.yaml: it takes only DATA_DIR (where the "
                "images are now) and --skip-bad"
            )
        run = run_train(data_dir, resume=resume, **given, **show)
    else:
        run = run_train(make_config(data_dir, config, **given), overwrite=overwrite, **show)
    if not main_rank:
        return
    if auto:
        render.comparison(run.selection)
    render.run_summary(run)
    if run.stopped == "interrupted":  # saved, but scripts must not take it for success
        typer.echo(f"interrupted; resume with: graft train --resume {run.run_dir}", err=True)
        raise typer.Exit(130)


def compare(
    data_dir: Annotated[Path, typer.Argument(help="Folder of class folders, or train/ and val/.")],
    budget: Annotated[str, typer.Option(help="Time for the whole grid, e.g. 300s, 5m, 1h.")] = "5m",
    backbones: Annotated[
        str | None,
        typer.Option(help="Comma-separated (default: those with weights on this machine)."),
    ] = None,
    strategies: Annotated[
        str | None, typer.Option(help="Comma-separated: extract, partial, finetune (default all).")
    ] = None,
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds.")] = 5,
    out: Annotated[
        Path | None, typer.Option(help="Folder for compare.json and compare.html.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The rows as JSON on stdout.")] = False,
    seed: Annotated[int | None, typer.Option()] = None,
    val_fraction: Annotated[float | None, typer.Option()] = None,
    workers: Annotated[int | None, typer.Option(min=0)] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | mps")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache folder.")] = None,
    skip_bad: Annotated[
        bool | None, typer.Option("--skip-bad", help="Leave unreadable files out.")
    ] = None,
) -> None:
    """Score backbones x strategies on folds of the training images within a time budget.

    Cheapest first; prints the table best first and writes compare.json and compare.html.
    """
    from ..core.runfolder import COMPARE_HTML, default_run_dir
    from ..outputs.pages import write_comparison
    from ..selection.compare import compare as run_compare

    options = dict(seed=seed, val_fraction=val_fraction, workers=workers, device=device,
                   cache_dir=_str(cache_dir), skip_bad=skip_bad)  # fmt: skip
    rows = run_compare(
        str(data_dir), budget=budget, backbones=_list(backbones), strategies=_list(strategies),
        folds=folds, progress=render.progress, on_row=None if as_json else render.compare_row,
        **options,  # None = unset: make_config drops it
    )  # fmt: skip
    folder, table = out or default_run_dir("compare"), rows.to_dict()
    write_comparison(folder, table)
    if as_json:
        render.as_json(table)
        return
    render.comparison(table)
    render.out(f"saved {Path(folder) / COMPARE_HTML}")


def _list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
