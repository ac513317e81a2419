"""Training configuration: one frozen dataclass, defaults with their reasons, YAML in and out."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .constants import MAX_IMAGE_SIZE, MAX_PIXELS, MEMORY_GB
from .errors import ConfigError, did_you_mean
from .runfolder import default_run_dir
from .runtime import default_cache_dir, default_workers

STRATEGIES = ("extract", "finetune", "partial")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("step", "cosine", "none")
BALANCE = ("none", "weights", "sampler")
KEEP = ("best", "last")
ENGINES = ("torch", "onnxruntime")  # the frozen extractor's (engines.py)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. `None` means "the strategy's default" (see
    `resolve()`), so a saved config always shows the values that were really used."""

    data_dir: str
    backbone: str = "efficientnet_lite0"  # embedded weights: works offline on any machine
    pretrained: bool = True
    weights: str | None = None  # local state dict (safetensors or torch file) instead of a download
    strategy: str = "extract"  # cheapest, and within a few points of fine-tuning on small data
    unfreeze: tuple[str, ...] = ()  # block names for strategy=partial
    unfreeze_last: int = 0  # or: the last N blocks for strategy=partial
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float = 0.9  # the tutorial's SGD momentum
    weight_decay: float | None = None
    schedule: str | None = None
    step_size: int = 7  # the tutorial's StepLR(step_size=7, gamma=0.1)
    gamma: float = 0.1
    label_smoothing: float = 0.0
    warmup_epochs: int = 0  # finetune: train the head alone this many epochs first
    backbone_lr_mult: float = 0.1  # finetune/partial: backbone LR = lr * this, after warm-up
    # finetune/partial: first half of the epochs at ~70% size. Off: on the demo it cost 4 points
    # of val accuracy (0.917 vs 0.958) for 7% less time (348 vs 375 s, docs/PERFORMANCE.md)
    progressive: bool = False
    patience: int = 0  # early stopping after this many epochs without improvement; 0 = off
    # best: the epoch with the best val accuracy (the tutorial's way; it flatters a small val
    # split). last: the final epoch, so val chooses nothing and its accuracy is unbiased
    keep: str = "best"
    seed: int = 0
    image_size: int | None = None  # None: the backbone's pretrained input size
    rotation: float = 0.0  # train augmentation: random rotation up to this many degrees
    val_fraction: float = 0.2  # flat layout: share of each class held out for validation
    workers: int | None = None  # None: cores - 1, at most 8
    device: str = "auto"
    precision: str = "auto"
    engine: str = "torch"  # frozen extractor; onnxruntime: faster on a CPU, opt-in (engines.py)
    cache_dir: str | None = None  # feature cache; None: ~/.cache/graft (or $GRAFT_CACHE_DIR)
    # augmented views per training image held in the cache. extract: extra training views.
    # partial: K > 0 trains the top blocks on K cached views of the trunk's activations, one per
    # image per epoch; 0 (default) runs the trunk live on fresh augmentations, which scored
    # higher on unseen images on 3 of 4 sets (docs/QUALITY.md)
    cache_views: int = 0
    memory_gb: float = MEMORY_GB  # decoded images or cached activations kept in RAM; past it, disk
    skip_bad: bool = False  # train without unreadable files instead of stopping
    max_pixels: int = MAX_PIXELS  # decoded pixels per image; Pillow's own refusal level
    dedupe: bool = False  # drop validation/test images that are also in train
    balance: str = "none"  # imbalanced classes: loss weights or a balanced sampler
    out: str | None = None  # run folder; None: runs/<timestamp>-<backbone>
    report: bool = True  # write report.html at the end of training

    def __post_init__(self) -> None:
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("balance", self.balance, BALANCE)
        _check_choice("keep", self.keep, KEEP)
        _check_choice("engine", self.engine, ENGINES)
        if self.keep == "last" and self.patience:
            raise ConfigError("--patience lets the val split choose when to stop, and --keep last "
                              "means it chooses nothing: use one of them")  # fmt: skip
        if self.optimizer is not None:
            _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.schedule is not None:
            _check_choice("schedule", self.schedule, SCHEDULES)
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
        for name in ("warmup_epochs", "patience", "cache_views", "unfreeze_last", "rotation"):
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
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be between 0 and 2**63-1, got {self.seed}")
        if self.image_size is not None and self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError(
                f"image_size {self.image_size} is over {MAX_IMAGE_SIZE} pixels; "
                "the network's input is its pretrained size (224-260) or near it"
            )
        self._refuse_ignored()

    def _refuse_ignored(self) -> None:
        """Settings that would have no effect are refused, never silently dropped."""
        if self.strategy == "finetune" and self.cache_views:
            raise ConfigError("--cache-views is ignored with --strategy finetune (every block "
                              "trains, so nothing below them can be cached); use it with "
                              "extract or partial")  # fmt: skip
        if self.strategy != "extract":
            return
        if self.warmup_epochs:
            raise ConfigError("--warmup-epochs is ignored with --strategy extract (only the head "
                              "trains); use it with finetune or partial")  # fmt: skip
        if self.progressive:
            raise ConfigError(
                "--progressive is ignored with --strategy extract (features are "
                "computed once, at full size); use it with finetune or partial"
            )
        if self.rotation and not self.cache_views:
            raise ConfigError("--rotation is ignored with --strategy extract unless the cache "
                              "holds augmented views: add --cache-views N (e.g. 4)")  # fmt: skip

    def resolve(self, input_size: int | None = None) -> TrainConfig:
        """Fill every `None` with the value that really runs, so the saved config reproduces
        the run: the strategy's defaults, the workers, the feature cache folder, the run folder,
        and (given the backbone's pretrained `input_size`) the image size.

        extract trains a linear head on cached features: AdamW, many cheap epochs.
        finetune/partial keep the tutorial's SGD(0.9) + StepLR(7, 0.1), with a batch of 16 and the
        LR scaled linearly from the tutorial's 1e-3 at batch 4 (bench/train_step.py measured
        batch 4 faster per image on a 2-core CPU: an open question, docs/PERFORMANCE.md).
        """
        if self.strategy == "extract":
            defaults = dict(epochs=60, batch_size=64, optimizer="adamw", lr=3e-3,
                            weight_decay=1e-2, schedule="cosine")  # fmt: skip
        else:
            defaults = dict(epochs=10, batch_size=16, optimizer="sgd", lr=4e-3,
                            weight_decay=1e-4, schedule="step")  # fmt: skip
        defaults.update(workers=default_workers(), cache_dir=str(default_cache_dir()),
                        out=str(default_run_dir(self.backbone)), image_size=input_size)  # fmt: skip
        updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["unfreeze"] = list(self.unfreeze)
        return d


def _check_range(name: str, value: float | None, low: float, high: float, low_open: bool = False,
                 high_open: bool = False) -> None:  # fmt: skip
    """A finite number inside [low, high] (open ends as asked); None means "default"."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lb, rb = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(f"{name} must be a finite number in {lb}{low:g}, {high:g}{rb}, "
                          f"got {value}")  # fmt: skip


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"unknown {name} {value!r}{did_you_mean(value, choices)}; choose one of "
            f"{', '.join(choices)}"
        )


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
    if isinstance(values.get("unfreeze"), str):
        values["unfreeze"] = tuple(b.strip() for b in values["unfreeze"].split(",") if b.strip())
    elif values.get("unfreeze") is not None:
        values["unfreeze"] = tuple(values["unfreeze"])
    _check_types(values, config_file)
    return TrainConfig(**values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): save it "
                          "as UTF-8") from exc  # fmt: skip
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
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            where = f" in {source}" if source else ""
            raise ConfigError(f"config key {key!r}{where} must be {expected}, got {value!r}")
