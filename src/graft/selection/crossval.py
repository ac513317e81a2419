"""One candidate scored on folds of the training images: what candidates share (the split, the
folds, the features, the measured forward cost), the cost model the budget runs on, and the runs.

A head on cached features (extract) is trained afresh on every fold, and so are the top blocks of
partial on cached trunk activations (frozen/activations.py: computed once, shared by the folds);
finetune (and partial where the trunk runs live) trains on all folds but the first and is scored
there. Every fold's model trains for a fixed number of epochs and is kept as it ends
(`keep="last"`): not even the epoch is chosen on what is scored.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..core.config import TrainConfig
from ..core.errors import ConfigError, DatasetError, GraftError
from ..core.metrics import wilson_interval
from ..core.runtime import Progress, resolve_runtime, seed_everything
from ..data.splits import DatasetSplit, Sample
from ..frozen.features import FeatureSet, choose_engine, extract_features
from ..models.backbones import Backbone, create_backbone
from ..models.freezing import apply_freezing, count_parameters, epoch_plan, trainable_blocks
from ..models.heads import set_feature_norm
from ..training.head import fit_on_features, start_fitted
from ..training.jobs import check_bad, feature_job, make_criterion, prepare_job, why_trunk_live
from ..training.loop import fit

log = logging.getLogger(__name__)

# seconds per image and epoch, in forward passes at the training precision (lite0 on the demo,
# 2-core CPU: partial 56.6 s and finetune 117.1 s for 10 epochs of 240 images + 60 scored):
# backward through every block about 1.7 forwards, through the last third a sixth of one. Then
# each strategy's estimates are scaled by what its candidates really took on this machine.
_TRAIN_COST = {"finetune": 2.7, "partial": 1.15}
# partial on cached activations, per image and epoch, in forward passes: the top's forward and
# backward (lite0's last 3 blocks: 0.6 s an epoch of 300 demo images, about 0.1 of a forward;
# compare trains the last 4, more). The trunk's views cost a forward each, once.
_CACHED_TOP_COST = 0.25
_REPORT_SECONDS = 8.0  # report.html after --auto's final training: figures, Grad-CAM (demo: 4-5 s)


@dataclass(frozen=True)
class Candidate:
    """One model to try: a backbone, a strategy and the settings that differ between them."""

    backbone: str
    strategy: str
    unfreeze_last: int = 0  # partial: the last N blocks train
    cache_views: int = 0  # views in the cache: extract's extra ones, partial's trunk views

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Candidate:
        return cls(row["backbone"], row["strategy"], row["unfreeze_last"], row["cache_views"])

    @property
    def name(self) -> str:
        what = self.strategy
        if self.strategy == "partial":
            what += f" (last {self.unfreeze_last} blocks)"
        if self.cache_views:
            cached = " cached" if self.strategy == "partial" else ""
            what += f" (+{self.cache_views}{cached} views)"
        return f"{self.backbone} {what}"

    def config(self, base: TrainConfig) -> TrainConfig:
        """`base` (the settings given: every candidate honours them, the strategy's own defaults
        fill the rest) with this candidate's backbone, strategy and cached views, and the last
        epoch kept: the fold it is scored on chooses nothing. A setting the candidate would
        ignore raises ConfigError naming it (the comparison refuses it, never drops it)."""
        return dataclasses.replace(base, **self.settings())

    def settings(self) -> dict[str, Any]:
        """The config fields this candidate sets (config.CHOSEN_PER_CANDIDATE)."""
        return dict(
            backbone=self.backbone,
            strategy=self.strategy,
            unfreeze_last=self.unfreeze_last,
            unfreeze=(),
            cache_views=self.cache_views,
            keep="last",
            patience=0,
        )


class OutOfTime(Exception):
    """A candidate stopped because the budget ran out."""


class Trials:
    """What candidates share: the split, the folds, the backbones made, the features computed,
    the measured cost of a forward pass per backbone."""

    def __init__(
        self,
        base: TrainConfig,
        split: DatasetSplit,
        pool: list[Sample],
        folds: list[list[int]],
        progress: Progress,
    ):
        self.base, self.split, self.pool, self.folds = base, split, pool, folds
        self.progress = progress
        self._forward: dict[tuple[str, bool], float] = {}  # seconds per image, measured
        self._scale: dict[str, float] = {}  # strategy -> how long it really took / estimate
        self._features: dict[tuple[str, int], Any] = {}  # (backbone, views) -> FeatureSet
        self._trunks: set[tuple[str, int]] = set()  # (backbone, last N) with activations cached

    def protocol(self) -> str:
        k, n = len(self.folds), len(self.pool)
        return (
            f"stratified {k}-fold on the {n} training images: extract candidates and "
            f"partial ones on cached activations on all {k} folds, the others on the first "
            f"(an inner validation split of about {n // k} images); each fold's model "
            "trained for a fixed number of epochs and kept as it ended; the val split took "
            "no part"
        )

    # ------------------------------------------------------------ cost

    def forward_seconds(self, name: str, training: bool = False) -> float:
        """Seconds per image of one forward pass at the precision extraction (or training) runs
        in, measured once: the fastest of three batches of 8 after a warm-up (a busy machine
        makes one timing read high, and the estimate then skips what would have fitted)."""
        if (name, training) not in self._forward:
            b = create_backbone(name, None, pretrained=False)
            rt = resolve_runtime(self.base.device, self.base.precision, training=training)
            net = rt.prepare(b.model.features.eval())
            g = torch.Generator().manual_seed(0)  # leaves the global RNG alone
            x = rt.batch(torch.rand(8, 3, b.spec.input_size, b.spec.input_size, generator=g))
            times = []
            with torch.inference_mode(), rt.autocast():
                net(x)
                for _ in range(3):
                    t = time.perf_counter()
                    net(x)
                    times.append(time.perf_counter() - t)
            self._forward[(name, training)] = min(times) / 8
        return self._forward[(name, training)]

    def estimate(self, c: Candidate) -> float:
        """Seconds the candidate will take here: the measured forward cost x the work, scaled by
        how far off the estimates of its strategy were so far."""
        n, k = len(self.pool), len(self.folds)
        if c.strategy == "extract":
            f = self.forward_seconds(c.backbone)
            views = c.cache_views
            todo = 0 if (c.backbone, views) in self._features else n * (1 + views)
            seconds = todo * f * 1.3 + 0.5 * k  # decoding on top of the forward; a head per fold
        elif self.cached(c):
            f = self.forward_seconds(c.backbone, training=True)
            views = c.cache_views
            trunk = 0 if (c.backbone, c.unfreeze_last) in self._trunks else n * (1 + views)
            seconds = trunk * f * 1.3 + k * self._epochs(c) * (n - n // k) * f * _CACHED_TOP_COST
            return (seconds + 2.0 * k) * self._scale.get("partial cached", 1.0)
        else:
            f = self.forward_seconds(c.backbone, training=True)
            seconds = self._epochs(c) * (n - n // k) * f * (_TRAIN_COST[c.strategy] + 0.25) + 2.0
        return seconds * self._scale.get(c.strategy, 1.0)

    def final_estimate(self, c: Candidate) -> float:
        """Seconds to retrain it on all training images, score the val split and write the
        report (about 8 s: its figures and Grad-CAM) afterwards."""
        n, nv = len(self.pool), len(self.split.val)
        if c.strategy == "extract":  # val features, the fp32 scoring, the report
            return nv * self.forward_seconds(c.backbone) * 2.5 + 3.0 + _REPORT_SECONDS
        f = self.forward_seconds(c.backbone, training=True)
        if self.cached(c):  # the training views are cached by now; val's eval views are not
            seconds = self._epochs(c) * n * f * _CACHED_TOP_COST + nv * f * 2.5 + 2.0
            return seconds * self._scale.get("partial cached", 1.0) + _REPORT_SECONDS
        seconds = self._epochs(c) * (n * _TRAIN_COST[c.strategy] + nv) * f + nv * f * 1.5
        return seconds * self._scale.get(c.strategy, 1.0) + _REPORT_SECONDS

    def _epochs(self, c: Candidate) -> int:
        return c.config(self.base).resolve().epochs

    def cached(self, c: Candidate) -> bool:
        """Whether the candidate's settings let it train on cached trunk activations (the job it
        gets says for sure: the cut and the memory are checked on the data)."""
        return c.strategy == "partial" and why_trunk_live(c.config(self.base).resolve()) is None

    # ------------------------------------------------------------ running

    def row(self, c: Candidate, status: str, note: str = "", **values: Any) -> dict[str, Any]:
        cfg = c.config(self.base).resolve()
        return {
            "rank": None,
            "candidate": c.name,
            "backbone": c.backbone,
            "strategy": c.strategy,
            "unfreeze_last": c.unfreeze_last,
            "cache_views": c.cache_views,
            "settings": {
                "head": cfg.head,
                "epochs": cfg.epochs,
                "optimizer": cfg.optimizer,
                "lr": cfg.lr,
                "batch_size": cfg.batch_size,
            },
            "accuracy": None,
            "accuracy_ci95": None,
            "loss": None,
            "scored_images": 0,
            "folds": 0,
            "seconds": 0.0,
            "trainable_params": None,
            "status": status,
            "note": note,
            **values,
        }

    def run(self, c: Candidate, deadline: float) -> dict[str, Any]:
        expected = self.estimate(c)
        row = self._run(c, deadline)
        if row["status"] == "scored" and expected > 5:  # long enough to learn from
            kind = "partial cached" if self.cached(c) else c.strategy
            scale = self._scale.get(kind, 1.0) * row["seconds"] / expected
            self._scale[kind] = min(3.0, max(0.5, scale))  # one slow run is not a trend
        return row

    def _run(self, c: Candidate, deadline: float) -> dict[str, Any]:
        start = time.perf_counter()
        log.debug("candidate %s", c.name)
        try:
            if c.strategy == "extract":
                correct, loss, n, done, trainable = self._run_extract(c, deadline)
            else:
                correct, loss, n, done, trainable = self._run_images(c, deadline)
        except OutOfTime as exc:
            return self.row(
                c,
                "stopped",
                f"the budget ran out ({exc})",
                seconds=round(time.perf_counter() - start, 1),
            )
        except (ConfigError, DatasetError):
            raise  # the data or the settings are wrong for every candidate: say it once
        except GraftError as exc:  # this candidate alone: weights missing, diverged...
            return self.row(c, "failed", str(exc), seconds=round(time.perf_counter() - start, 1))
        lo, hi = wilson_interval(correct, n)
        return self.row(
            c,
            "scored",
            accuracy=correct / n,
            accuracy_ci95=[lo, hi],
            loss=round(loss / n, 6),
            scored_images=n,
            folds=done,
            trainable_params=trainable,
            seconds=round(time.perf_counter() - start, 1),
        )

    def _backbone(self, c: Candidate) -> tuple[Backbone, TrainConfig]:
        cfg = c.config(self.base)
        seed_everything(cfg.seed)  # the same head and order whatever ran before: order-free rows
        b = create_backbone(c.backbone, len(self.split.classes), cfg.pretrained, cfg.weights)
        cfg = cfg.resolve(input_size=b.spec.input_size)
        set_feature_norm(b, cfg.feature_norm)
        return dataclasses.replace(b, spec=b.spec.with_size(cfg.image_size)), cfg

    def _run_extract(self, c: Candidate, deadline: float) -> tuple[int, float, int, int, int]:
        """A fresh head per fold on the shared features of every training image: images right,
        summed loss, images scored, folds done, trainable parameters."""
        backbone, cfg = self._backbone(c)
        fs = self._pool_features(c.backbone, backbone, cfg, cfg.cache_views)
        kept = {s: i for i, s in enumerate(fs.samples)}  # bad files (--skip-bad) left out
        init = copy.deepcopy(backbone.model.head.state_dict())
        correct = n = 0
        loss = 0.0
        for k, fold in enumerate(self.folds):
            if time.perf_counter() > deadline:
                raise OutOfTime(f"after {k} of {len(self.folds)} folds")
            held = {kept[self.pool[i]] for i in fold if self.pool[i] in kept}
            tr = torch.tensor([i for i in range(len(fs.samples)) if i not in held])
            te = torch.tensor(sorted(held))
            if cfg.no_loop:
                head = backbone.model.head
                fitted = fit_on_features(
                    cfg, fs.features[tr], fs.aug[tr], fs.labels[tr], len(self.split.classes), head
                )
                head.load_state_dict(fitted.linear().state_dict())
                criterion = make_criterion(cfg, fs.labels[tr], len(self.split.classes))
                with torch.no_grad():
                    logits = head(fs.features[te])
                correct += int((logits.argmax(1) == fs.labels[te]).sum())
                loss += criterion(logits, fs.labels[te]).item() * len(te)
                n += len(te)
                continue
            backbone.model.head.load_state_dict(init)
            job = feature_job(
                cfg,
                backbone,
                (fs.features[tr], fs.aug[tr], fs.labels[tr]),
                (fs.features[te], fs.labels[te]),
                self.split.classes,
            )
            state = _unless_interrupted(fit(job, epoch_plan(cfg, [], cfg.image_size), cfg))
            correct += round(state.history[-1]["val_acc"] * len(te))
            loss += state.history[-1]["val_loss"] * len(te)
            n += len(te)
        return correct, loss, n, len(self.folds), count_parameters(backbone.model.head)[0]

    def _pool_features(
        self, name: str, backbone: Backbone, cfg: TrainConfig, views: int
    ) -> FeatureSet:
        """The frozen features of every training image (and `views` augmented views each), made
        once per backbone and views and shared by the candidates that need them."""
        key = (name, views)
        if key not in self._features:
            rt = resolve_runtime(cfg.device, cfg.precision)
            digests: dict[str, str] = {}  # hashed once: to choose the engine, then to look up
            engine, _ = choose_engine(
                cfg.engine,
                backbone,
                self.pool,
                rt,
                cfg.precision,
                cfg.cache_dir,
                views,
                cfg.rotation,
                digests=digests,
            )
            fs = extract_features(
                backbone,
                self.pool,
                rt,
                cfg.cache_dir,
                views=views,
                workers=cfg.workers,
                progress=self.progress,
                rotation=cfg.rotation,
                max_pixels=cfg.max_pixels,
                engine=engine,
                digests=digests,
            )
            check_bad(cfg, fs.bad)
            self._features[key] = fs
        return self._features[key]

    def _run_images(self, c: Candidate, deadline: float) -> tuple[int, float, int, int, int]:
        """partial / finetune: train on the other folds, score the fold at the end; every fold
        when the top trains on cached activations (cheap after the first), else the first. With
        --head fit (partial's default) each fold's head starts fitted on the frozen features of
        that fold's training images alone, as `graft train` starts it on all of them (LP-FT)."""
        backbone, cfg = self._backbone(c)
        fs = self._pool_features(c.backbone, backbone, cfg, 0) if cfg.head == "fit" else None
        blocks = trainable_blocks(backbone, cfg.strategy, cfg.unfreeze, cfg.unfreeze_last)
        init = copy.deepcopy(backbone.model.state_dict())
        rt = resolve_runtime(cfg.device, cfg.precision, training=True)
        plan = epoch_plan(cfg, blocks, backbone.spec.input_size)
        correct = n = done = 0
        loss = fold_seconds = 0.0
        for k, held in enumerate(map(set, self.folds)):
            if k and time.perf_counter() + fold_seconds > deadline:
                break  # scored on the folds done: the rows say how many
            started = time.perf_counter()
            backbone.model.load_state_dict(init)
            seed_everything(cfg.seed)
            apply_freezing(backbone, blocks)
            fold = DatasetSplit(
                self.split.root,
                self.split.classes,
                [s for i, s in enumerate(self.pool) if i not in held],
                [self.pool[i] for i in sorted(held)],
                layout=self.split.layout,
            )
            if fs is not None:
                start_fitted(cfg, backbone.model.head, fs, len(self.split.classes), set(fold.train))
            job = prepare_job(cfg, backbone, fold, rt, self.progress)

            def in_time(row: dict[str, Any]) -> None:
                if time.perf_counter() > deadline and row["epoch"] < len(plan):
                    raise OutOfTime(f"after {row['epoch']} of {len(plan)} epochs")

            state = _unless_interrupted(fit(job, plan, cfg, on_epoch=None if k else in_time))
            m = len(job.val_loader.dataset)
            correct, n, done = correct + round(state.history[-1]["val_acc"] * m), n + m, done + 1
            loss += state.history[-1]["val_loss"] * m
            if not (job.trunk is not None and job.trunk.cached):
                break  # the trunk ran live: one fold is what the budget allows
            self._trunks.add((c.backbone, c.unfreeze_last))
            fold_seconds = time.perf_counter() - started
        return correct, loss, n, done, count_parameters(backbone.model)[0]


def _unless_interrupted(state):
    """A fold's training stopped by Ctrl-C (the loop keeps what it has, for `graft train`):
    for a comparison it ends the comparison, which keeps the candidates scored before."""
    if state.stopped == "interrupted":
        raise KeyboardInterrupt
    return state
