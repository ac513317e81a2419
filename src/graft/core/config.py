"""Training configuration: one frozen dataclass, defaults with their reasons, YAML in and out."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .constants import BACKBONE_SEPARATOR, MAX_IMAGE_SIZE, MAX_PIXELS, MEMORY_GB
from .errors import ConfigError, did_you_mean
from .runfolder import default_run_dir
from .runtime import DEVICES, PRECISIONS, default_cache_dir, default_workers

STRATEGIES = ("extract", "finetune", "partial")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("step", "cosine", "none")
BALANCE = ("none", "weights", "sampler")
KEEP = ("best", "last")
HEADS = ("fit", "epochs")  # extract's head: core/linear.py, or the epoch loop
# what the head reads: models/heads.NormedLinear (a fourth or a square root), or as is
FEATURE_NORMS = ("root4", "power", "none")
TTAS = ("flip", "none")  # test-time augmentation: models/heads.view_features
# what trains the head for a number of epochs: given with extract, they ask for --head epochs
EPOCH_SETTINGS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "step_size",
    "gamma",
)
TRACKERS = ("mlflow", "tensorboard")  # outputs/tracking.py
ENGINES = ("auto", "torch", "onnxruntime")  # the frozen extractor's (frozen/features.py)
# what a comparison (graft compare, train --auto) sets per candidate: refused when given there
CHOSEN_PER_CANDIDATE = (
    "backbone",
    "strategy",
    "unfreeze",
    "unfreeze_last",
    "cache_views",
    "keep",
    "patience",
)


def _setting(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A config field with its help text (the CLI's options are generated from it, cli/options.py)
    and, for a closed set of values, its choices."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. `None` means "the strategy's default" (see
    `resolve()`), or for a setting the run does not use, that it is not used: a saved config
    shows the values that really ran. A setting that would have no effect is refused."""

    data_dir: str = dataclasses.field(
        metadata={"help": "Folder of class folders, or with train/ and val/.", "choices": ()}
    )
    # a table beside the images: Hugging Face's metadata.csv, Kaggle's train.csv (data/table.py)
    labels: str | None = _setting(
        None,
        "A CSV naming each image's class (and optionally its split): paths relative to the "
        "data folder; the folder's class folders are then not used.",
    )
    path_column: str | None = _setting(
        None, "--labels: the file column [default: file_name, filename, file, path, image, id...]."
    )
    label_column: str | None = _setting(
        None, "--labels: the class column [default: label, class, category or target]."
    )
    # embedded weights: works offline on any machine
    backbone: str = _setting(
        "efficientnet_lite0", "Backbone name (graft backbones) or timm:<name>."
    )
    pretrained: bool = _setting(True, "Start from the backbone's pretrained weights.")
    weights: str | None = _setting(
        None, "Local weights file (safetensors or torch) for the backbone."
    )
    # extract: cheapest, and within a few points of fine-tuning on small data
    strategy: str = _setting(
        "extract",
        "What trains: the head on frozen features, everything, or the last blocks.",
        STRATEGIES,
    )
    # fit: a convex problem solved, its L2 chosen by cross-validation on the training images;
    # epochs: the loop below (docs/QUALITY.md compares them)
    head: str | None = _setting(
        None,
        "extract: the head fitted by L-BFGS with its L2 chosen by cross-validation (fit), or "
        "trained for --epochs (epochs) [default: fit; epochs when an epoch setting such as "
        "--epochs or --lr is given]. finetune/partial: fit starts them from that fitted head "
        "(LP-FT), epochs from a random one [default: fit].",
        HEADS,
    )
    # power (square root): +1.3 points on unseen images over the features as they are, better on
    # five of seven folders; root4 (fourth root): +0.6 more on those seven and +0.5 on four
    # others, better on five of the eleven, worse on two by half a point or less
    # (docs/QUALITY.md); partial and finetune train through the head, where a root's slope at
    # zero is infinite
    feature_norm: str | None = _setting(
        None,
        "extract: what the head reads: each backbone's pooled features raised to the power 1/4 "
        "(root4) or 1/2 (power), sign kept, and scaled to unit length, or as they are (none) "
        "[default: root4 with the fitted head, none with --head epochs].",
        FEATURE_NORMS,
    )
    # flip: +0.8 points on unseen images with the fitted head on power features, better on all
    # seven folders of bench/levers.py (docs/QUALITY.md); it costs a second forward pass
    tta: str | None = _setting(
        None,
        "Test-time augmentation of the saved model: the features of each image averaged with "
        "its mirror image's (flip; a second forward pass in predict, evaluate, serve and export), "
        "or none [default: flip with extract's fitted head, none otherwise].",
        TTAS,
    )
    # off: +0.39 points on unseen images over 33 runs (eleven folders, three seeds), better on
    # seven folders but 1.45 worse on fm6, and the printed interval held 28 times, not 30
    # (docs/QUALITY.md, stop 46); --auto's winner refits (workflows/train.py, AUTO_REFIT); the
    # fitted head's alone: a network that trains would need its whole training again
    refit: bool | None = _setting(
        None,
        "extract's fitted head: once the val split has scored it, fit it again on the training "
        "and val images together (the L2 strength cross-validation chose, scaled to the images) "
        "and save that head; the accuracy printed stays the one of the head fitted without val, "
        "and `graft evaluate` on the val images then reads images the head trained on "
        "[default: off; on for the fitted head --auto chooses].",
    )
    unfreeze: tuple[str, ...] = _setting(
        (), "partial: blocks to train, comma-separated (graft backbones NAME --blocks)."
    )
    unfreeze_last: int = _setting(0, "partial: train the last N blocks.")
    epochs: int | None = _setting(None, "Epochs (default: extract 60, finetune/partial 10).")
    batch_size: int | None = _setting(
        None, "Images per step, per process [default: extract 64, finetune/partial 16]."
    )
    optimizer: str | None = _setting(
        None, "(default: extract adamw, finetune/partial sgd).", OPTIMIZERS
    )
    lr: float | None = _setting(
        None, "Learning rate [default: extract 3e-3, finetune/partial 4e-3]."
    )
    momentum: float | None = _setting(None, "sgd: momentum (default: 0.9, the tutorial's).")
    weight_decay: float | None = _setting(None, "(default: extract 1e-2, finetune/partial 1e-4).")
    schedule: str | None = _setting(
        None, "Learning-rate schedule [default: extract cosine, finetune/partial step].", SCHEDULES
    )
    # the tutorial's StepLR(step_size=7, gamma=0.1)
    step_size: int | None = _setting(None, "step schedule: epochs between drops (default: 7).")
    gamma: float | None = _setting(None, "step schedule: factor at each drop (default: 0.1).")
    label_smoothing: float = _setting(0.0, "Label smoothing of the loss.")
    warmup_epochs: int = _setting(
        0, "finetune/partial: train the head alone this many epochs first."
    )
    backbone_lr_mult: float | None = _setting(
        None, "finetune/partial after --warmup-epochs: backbone LR = lr x this (default: 0.1)."
    )
    # Off: on the demo it cost 4 points of val accuracy (0.917 vs 0.958) for 7% less time (348 vs
    # 375 s, docs/PERFORMANCE.md)
    progressive: bool = _setting(False, "finetune/partial: first half of the epochs at ~70% size.")
    patience: int = _setting(0, "Stop after this many epochs without improvement; 0 = off.")
    # best: the tutorial's way; it flatters a small val split. last: val chooses nothing
    keep: str = _setting(
        "best",
        "Model kept: the best val epoch, or the last (its val accuracy is then unbiased).",
        KEEP,
    )
    seed: int = _setting(0, "Seed of the split, the data order and the augmentations.")
    image_size: int | None = _setting(None, "Network input side (default: the backbone's).")
    rotation: float = _setting(
        0.0, "Training augmentation: random rotation up to this many degrees."
    )
    val_fraction: float = _setting(0.2, "Flat folder: share of each class held out for val.")
    workers: int | None = _setting(None, "Data loading processes (default: cores - 1, at most 8).")
    device: str = _setting("auto", "Where to run (auto: cuda, then mps, then cpu).", DEVICES)
    precision: str = _setting(
        "auto", "auto: bf16/fp16 where the hardware is fast at it.", PRECISIONS
    )
    # auto: whichever finishes the extraction sooner (frozen/features.choose_engine)
    engine: str = _setting(
        "auto",
        "extract: what runs the frozen extractor (auto: ONNX Runtime on a CPU when the images to "
        "extract pay for its one-time export, else PyTorch; the choice and why in model.json).",
        ENGINES,
    )
    cache_dir: str | None = _setting(
        None, "Feature cache folder [default: ~/.cache/graft or $GRAFT_CACHE_DIR]."
    )
    # partial: 0 runs the trunk live on fresh augmentations, which scored higher on unseen
    # images on 3 of 4 sets than K cached views (docs/QUALITY.md)
    cache_views: int = _setting(
        0,
        "Augmented views per image in the cache: extract's extra "
        "training views; partial: train the top on K cached views of "
        "the trunk (0 = live).",
    )
    memory_gb: float | None = _setting(
        None,
        f"finetune/partial: GB of decoded images or cached "
        f"activations kept in RAM (default: {MEMORY_GB:g}).",
    )
    skip_bad: bool = _setting(False, "Train without unreadable files instead of stopping.")
    max_pixels: int = _setting(
        MAX_PIXELS, "Refuse images decoding to more pixels [default: Pillow's limit]."
    )
    dedupe: bool = _setting(False, "Drop val/test images identical to training ones.")
    balance: str = _setting(
        "none", "Imbalanced classes: loss weights or a balanced sampler.", BALANCE
    )
    # the plain arg-max unless asked: a threshold only means something to whoever acts on it
    target: tuple[str, ...] = _setting(
        (),
        "Operating point of a class: CLASS:recall=X or CLASS:precision=X (repeatable); images "
        "no class claims, or several do, are decided 'review'.",
    )
    out: str | None = _setting(None, "Run folder (default: runs/<time>-<backbone>).")
    report: bool = _setting(True, "Write report.html at the end of training.")
    # nothing by default: a tracker is the user's choice (and an optional install)
    log: tuple[str, ...] = _setting(
        (),
        "Log the run to experiment trackers as it trains (repeatable, or a,b); a tracker that "
        "fails costs a warning, never the run.",
        TRACKERS,
    )
    tracking_uri: str | None = _setting(
        None, "--log mlflow: the tracking URI [default: $MLFLOW_TRACKING_URI, else MLflow's]."
    )

    def __post_init__(self) -> None:
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("balance", self.balance, BALANCE)
        _check_choice("keep", self.keep, KEEP)
        _check_choice("engine", self.engine, ENGINES)
        if self.head is not None:
            _check_choice("head", self.head, HEADS)
        if self.feature_norm is not None:
            _check_choice("feature_norm", self.feature_norm, FEATURE_NORMS)
        if self.tta is not None:
            _check_choice("tta", self.tta, TTAS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("device", self.device, DEVICES)
        if self.keep == "last" and self.patience:
            raise ConfigError(
                "--patience lets the val split choose when to stop, and --keep last "
                "means it chooses nothing: use one of them"
            )
        if self.optimizer is not None:
            _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.schedule is not None:
            _check_choice("schedule", self.schedule, SCHEDULES)
        if BACKBONE_SEPARATOR in self.backbone and self.strategy != "extract":
            raise ConfigError(
                f"backbone {self.backbone!r} concatenates the features of frozen networks: it "
                f"trains with --strategy extract only, not {self.strategy}"
            )
        if self.strategy == "partial" and not (self.unfreeze or self.unfreeze_last):
            raise ConfigError(
                "strategy 'partial' needs the blocks to train: --unfreeze layer3,layer4 or "
                "--unfreeze-last N (list them with: graft backbones NAME --blocks)"
            )
        if self.strategy != "partial" and (self.unfreeze or self.unfreeze_last):
            raise ConfigError("--unfreeze/--unfreeze-last need --strategy partial")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("epochs", "batch_size", "image_size", "step_size", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        for name in ("warmup_epochs", "patience", "cache_views", "unfreeze_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be 0 or more, got {self.workers}")
        _check_range("lr", self.lr, 0.0, math.inf, low_open=True)
        _check_range("weight_decay", self.weight_decay, 0.0, math.inf)
        _check_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        _check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        _check_range("gamma", self.gamma, 0.0, 1.0, low_open=True)
        _check_range("backbone_lr_mult", self.backbone_lr_mult, 0.0, math.inf)
        _check_range("memory_gb", self.memory_gb, 0.0, math.inf)
        _check_range("rotation", self.rotation, 0.0, 180.0)  # degrees either way
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be between 0 and 2**63-1, got {self.seed}")
        if self.image_size is not None and self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError(
                f"image_size {self.image_size} is over {MAX_IMAGE_SIZE} pixels; "
                "the network's input is its pretrained size (224-260) or near it"
            )
        from .decisions import parse_targets  # imports torch: not at `graft --help`

        parse_targets(self.target)  # the syntax now; the class names once the data is read
        for name in self.log:
            _check_choice("tracker", name, TRACKERS)
        if len(set(self.log)) != len(self.log):
            raise ConfigError(f"--log names a tracker twice: {', '.join(self.log)}")
        if self.tracking_uri and "mlflow" not in self.log:
            raise ConfigError("--tracking-uri is MLflow's: add --log mlflow, or drop it")
        if self.labels is None and (self.path_column or self.label_column):
            flag = "--path-column" if self.path_column else "--label-column"
            raise ConfigError(f"{flag} names a column of a labels table: add --labels FILE.csv")
        self._refuse_ignored()

    def _refuse_ignored(self) -> None:
        """Settings that would have no effect are refused, never silently dropped. A value equal
        to the setting's default is let through: it changes nothing either way, and configs saved
        before a setting became conditional hold it (momentum 0.9 beside adamw)."""
        defaults = _strategy_defaults(self.strategy)
        optimizer = self.optimizer or defaults["optimizer"]
        schedule = self.schedule or defaults["schedule"]
        given = {
            k: getattr(self, k)
            for k in _LEGACY_DEFAULTS
            if getattr(self, k) not in (None, _LEGACY_DEFAULTS[k])
        }
        if "momentum" in given and optimizer != "sgd":
            raise ConfigError(
                f"--momentum is ignored with --optimizer {optimizer} (momentum is "
                "SGD's; adam and adamw keep their own moments): drop it or use "
                "--optimizer sgd"
            )
        for name in ("step_size", "gamma"):
            if name in given and schedule != "step":
                raise ConfigError(
                    f"--{_flag(name)} is ignored with --schedule {schedule} (it "
                    "shapes the step schedule): drop it or use --schedule step"
                )
        if self.engine == "onnxruntime" and self.strategy != "extract":
            raise ConfigError(
                f"--engine {self.engine} is ignored with --strategy "
                f"{self.strategy} (the engine runs extract's frozen extractor; "
                "the blocks that train run in PyTorch): drop it or use --strategy "
                "extract"
            )
        if self.strategy == "finetune" and self.cache_views:
            raise ConfigError(
                "--cache-views is ignored with --strategy finetune (every block "
                "trains, so nothing below them can be cached); use it with "
                "extract or partial"
            )
        self._refuse_ignored_by_head()
        if self.refit and not (self.strategy == "extract" and self.resolved_head() == "fit"):
            what = "--head epochs" if self.strategy == "extract" else f"--strategy {self.strategy}"
            raise ConfigError(
                f"--refit is ignored with {what} (it fits extract's head again, val images "
                "included, in a second; a head trained for epochs, or blocks that train, would "
                "need their whole training again): drop it or use --strategy extract --head fit"
            )
        if self.strategy != "extract" and self.feature_norm not in (None, "none"):
            raise ConfigError(
                f"--feature-norm {self.feature_norm} is extract's: --strategy {self.strategy} "
                "trains the blocks through the head, and a root's slope at zero is infinite; "
                "drop it or use --strategy extract"
            )
        if self.strategy != "extract":
            if "backbone_lr_mult" in given and not self.warmup_epochs:
                raise ConfigError(
                    "--backbone-lr-mult is ignored without --warmup-epochs (the "
                    "backbone trains at lr from the start): add --warmup-epochs N "
                    "or drop it"
                )
            return
        for name in ("warmup_epochs", "progressive", "backbone_lr_mult", "memory_gb"):
            if getattr(self, name) and (name in given or name not in _LEGACY_DEFAULTS):
                raise ConfigError(
                    f"--{_flag(name)} is ignored with --strategy extract "
                    f"({_EXTRACT_IGNORES[name]}); use it with finetune or partial"
                )
        if self.rotation and not self.cache_views:
            raise ConfigError(
                "--rotation is ignored with --strategy extract unless the cache "
                "holds augmented views: add --cache-views N (e.g. 4)"
            )

    def _refuse_ignored_by_head(self) -> None:
        if not self.no_loop:
            return
        given = [name for name in EPOCH_SETTINGS if getattr(self, name) is not None]
        if self.patience:
            given.append("patience")
        if given:
            flags = ", ".join(f"--{_flag(name)}" for name in given)
            raise ConfigError(
                f"{flags} {'is' if len(given) == 1 else 'are'} ignored with --head fit (the "
                "head is solved to convergence, its L2 chosen by cross-validation: no epochs, "
                "learning rate or optimizer): drop "
                f"{'it' if len(given) == 1 else 'them'} or use --head epochs"
            )
        if self.balance == "sampler":
            raise ConfigError(
                "--balance sampler is ignored with --head fit (the fitted head sees every "
                "image at once; nothing is sampled): use --balance weights"
            )

    @property
    def no_loop(self) -> bool:
        """extract with a fitted head: solved in one go, no epoch runs (resolved configs)."""
        return self.head == "fit" and self.strategy == "extract"

    def resolved_head(self) -> str:
        """extract's head as it runs: the one given, else epochs when an epoch setting (or
        --patience, or --balance sampler) is given, else fit. finetune and partial: "fit" when
        their head starts fitted on the frozen features (LP-FT), "epochs" when it starts at random
        and trains with the blocks: fit by default (on unseen images, partial +5.8 points on
        eleven folders, better on ten: docs/QUALITY.md, stop 43; finetune +12.3 on nine, better
        on eight: stop 45)."""
        if self.strategy != "extract":
            return self.head or "fit"
        if self.head is not None:
            return self.head
        loop = any(getattr(self, name) is not None for name in EPOCH_SETTINGS)
        return "epochs" if loop or self.patience or self.balance == "sampler" else "fit"

    def resolve(self, input_size: int | None = None) -> TrainConfig:
        """Fill every `None` with the value that really runs, so the saved config reproduces
        the run: the strategy's defaults, the workers, the feature cache folder, the run folder,
        and (given the backbone's pretrained `input_size`) the image size. A setting this run does
        not use is None (momentum beside adamw, step_size beside cosine, memory_gb for extract).

        extract trains a linear head on cached features: AdamW, many cheap epochs.
        finetune/partial keep the tutorial's SGD(0.9) + StepLR(7, 0.1), with a batch of 16 and the
        LR scaled linearly from the tutorial's 1e-3 at batch 4 (bench/train_step.py measured
        batch 4 faster per image on a 2-core CPU: an open question, docs/PERFORMANCE.md).
        """
        head = self.resolved_head()
        fitted = head == "fit" and self.strategy == "extract"  # no epoch loop at all
        defaults = {} if fitted else _strategy_defaults(self.strategy)
        defaults.update(
            head=head,
            feature_norm="root4" if fitted else "none",
            tta="flip" if fitted else "none",
            refit=False if fitted else None,
            workers=default_workers(),
            cache_dir=str(default_cache_dir()),
            out=str(default_run_dir(self.backbone)),
            image_size=input_size,
        )
        updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.strategy != "extract" and self.engine == "auto":
            updates["engine"] = "torch"  # what runs: the blocks that train are PyTorch's
        cfg = dataclasses.replace(self, **updates)
        if fitted:
            unused = (*EPOCH_SETTINGS, "backbone_lr_mult", "memory_gb")
            return dataclasses.replace(cfg, **dict.fromkeys(unused))
        used = {
            "momentum": cfg.optimizer == "sgd",
            "step_size": cfg.schedule == "step",
            "gamma": cfg.schedule == "step",
            "backbone_lr_mult": cfg.strategy != "extract" and cfg.warmup_epochs > 0,
            "memory_gb": cfg.strategy != "extract",
        }
        values = {
            k: (getattr(cfg, k) if getattr(cfg, k) is not None else _LEGACY_DEFAULTS[k])
            if use
            else None
            for k, use in used.items()
        }
        return dataclasses.replace(cfg, **values)

    def discover_options(self) -> dict[str, Any]:
        """How `data.discovery.discover` finds this run's images and classes."""
        return dict(
            val_fraction=self.val_fraction,
            seed=self.seed,
            labels=self.labels,
            path_column=self.path_column,
            label_column=self.label_column,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["unfreeze"], d["target"] = list(self.unfreeze), list(self.target)
        d["log"] = list(self.log)
        return d


def _check_range(
    name: str,
    value: float | None,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite number inside [low, high] (open ends as asked); None means "default"."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok and math.isinf(high):
        above = "above" if low_open else "at least"
        raise ConfigError(f"{name} must be a finite number {above} {low:g}, got {value}")
    if not ok:
        lb, rb = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(
            f"{name} must be a finite number in {lb}{low:g}, {high:g}{rb}, got {value}"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"unknown {name} {value!r}{did_you_mean(value, choices)}; choose one of "
            f"{', '.join(choices)}"
        )


# what a setting defaults to where it applies; before graft 0.2 every saved config held these
_LEGACY_DEFAULTS = {
    "momentum": 0.9,
    "step_size": 7,
    "gamma": 0.1,
    "backbone_lr_mult": 0.1,
    "memory_gb": MEMORY_GB,
}
_EXTRACT_IGNORES = {
    "warmup_epochs": "only the head trains",
    "progressive": "features are computed once, at full size",
    "backbone_lr_mult": "the backbone does not train",
    "memory_gb": "features take little memory; the budget is for decoded images and activations",
}


def _strategy_defaults(strategy: str) -> dict[str, Any]:
    if strategy == "extract":
        return dict(
            epochs=60,
            batch_size=64,
            optimizer="adamw",
            lr=3e-3,
            weight_decay=1e-2,
            schedule="cosine",
        )
    return dict(
        epochs=10, batch_size=16, optimizer="sgd", lr=4e-3, weight_decay=1e-4, schedule="step"
    )


def _flag(name: str) -> str:
    return name.replace("_", "-")


def make_config(
    data_dir: str | Path | None = None, config_file: str | Path | None = None, **options: Any
) -> TrainConfig:
    """Build a config from an optional YAML file, overridden by keyword options (None = unset).

    >>> make_config("data", strategy="finetune").strategy
    'finetune'
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_yaml(config_file))
    values.update({k: v for k, v in options.items() if v is not None})
    if data_dir is not None:
        values["data_dir"] = str(data_dir)
    known = {f.name for f in fields(TrainConfig)}
    for key in values:
        if key not in known:
            where = f" in {config_file}" if config_file else ""
            raise ConfigError(f"unknown config key {key!r}{where}{did_you_mean(key, known)}")
    if "data_dir" not in values:
        raise ConfigError("no data folder given: pass DATA_DIR or set data_dir in the config file")
    for name in ("unfreeze", "target", "log"):  # a list (YAML, repeated option) or comma-separated
        value = values.get(name)
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            values[name] = tuple(b.strip() for v in value for b in v.split(",") if b.strip())
    _check_types(values, config_file)
    return TrainConfig(**values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def _check_types(values: dict[str, Any], source: Any) -> None:
    """Reject values of the wrong type with the key named (YAML gives strings, ints, floats...)."""
    for key, value in values.items():
        expected = str(_FIELD_TYPES[key])
        if value is None:
            continue
        ok = True
        if expected.startswith("bool"):
            ok = isinstance(value, bool)
        elif expected.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                values[key] = float(value)
        elif expected.startswith("str"):
            ok = isinstance(value, (str, Path))
            if ok:
                values[key] = str(value)
        elif expected.startswith("tuple"):
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            if ok:
                values[key] = tuple(value)
        if not ok:
            where = f" in {source}" if source else ""
            raise ConfigError(f"config key {key!r}{where} must be {expected}, got {value!r}")
