"""The `graft` commands that train: `train` (one model, or with --auto the best of a comparison)
and `compare` (the comparison alone). Registered on the app in main.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from ..core.config import CHOSEN_PER_CANDIDATE
from . import render
from .options import settings_options

log = logging.getLogger("graft")


@settings_options()
def train(
    data_dir: Annotated[
        Path | None, typer.Argument(help="Folder of class folders, or with train/ and val/.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML file of settings; options override it.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue an interrupted run (DATA_DIR: where its images are now)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the run already in --out.")
    ] = False,
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
    **settings: Any,
) -> None:
    """Train a classifier and save it in a run folder (--auto: the best of a comparison)."""
    from ..core.config import make_config

    given = {k: v for k, v in settings.items() if v is not None}
    # a bad value ends here, in a blink, before the seconds that loading PyTorch takes
    cfg = make_config(data_dir, config, **given) if resume is None and not auto else None
    from ..core.dist import from_env
    from ..workflows.train import train as run_train

    main_rank = from_env().is_main  # under torchrun, rank 0 alone prints
    if not main_rank:
        log.setLevel(logging.WARNING)
    show = dict(progress=render.progress, on_epoch=render.epoch_line if main_rank else None)
    if auto:
        show.update(
            auto=True,
            budget=budget,
            backbones=_list(backbones),
            strategies=_list(strategies),
            folds=folds,
            on_row=render.compare_row,
        )
    if resume is not None:
        if config is not None or overwrite or set(given) - {"skip_bad"}:
            raise typer.BadParameter(
                "--resume reuses the run's config.yaml: it takes only DATA_DIR (where the "
                "images are now) and --skip-bad"
            )
        run = run_train(data_dir, resume=resume, **given, **show)
    elif auto:
        run = run_train(data_dir, config_file=config, overwrite=overwrite, **given, **show)
    else:
        run = run_train(cfg, overwrite=overwrite, **show)
    if not main_rank:
        return
    if auto:
        render.comparison(run.selection)
    render.run_summary(run)
    if run.stopped == "interrupted":  # saved, but scripts must not take it for success
        typer.echo(f"interrupted; resume with: graft train --resume {run.run_dir}", err=True)
        raise typer.Exit(130)


@settings_options(exclude=(*CHOSEN_PER_CANDIDATE, "out", "report", "target", "log", "tracking_uri"))
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
    **settings: Any,
) -> None:
    """Score backbones x strategies on folds of the training images within a time budget.

    Cheapest first; prints the table best first and writes compare.json and compare.html. The
    training settings given are used by every candidate (and shown in the table).
    """
    from ..core.runfolder import COMPARE_HTML, COMPARE_JSON, default_run_dir
    from ..core.runtime import sigterm_as_interrupt
    from ..outputs.pages import write_comparison
    from ..selection.compare import compare as run_compare

    with sigterm_as_interrupt():  # SIGTERM stops like Ctrl-C: the rows so far are kept
        rows = run_compare(
            str(data_dir),
            budget=budget,
            backbones=_list(backbones),
            strategies=_list(strategies),
            folds=folds,
            progress=render.progress,
            on_row=None if as_json else render.compare_row,
            **settings,  # None = unset: make_config drops it
        )
    folder, table = out or default_run_dir("compare"), rows.to_dict()
    write_comparison(folder, table)
    if as_json:
        render.as_json(table)
    else:
        render.comparison(table)
        render.out(f"saved {Path(folder) / COMPARE_HTML}")
    if rows.interrupted:
        typer.echo(
            f"interrupted: the {len(rows)} candidate(s) finished by then are in "
            f"{Path(folder) / COMPARE_JSON}",
            err=True,
        )
        raise typer.Exit(130)


def _list(value: str | None) -> list[str] | None:
    """Comma-separated names; empty items are kept for the library to refuse (`--backbones ,`)."""
    return None if value is None else [v.strip() for v in value.split(",")]
