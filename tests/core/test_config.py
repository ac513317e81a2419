"""Config: defaults resolved per strategy, YAML loading, unknown keys and bad values refused."""

from __future__ import annotations

import pytest

from graft.core.config import dump_yaml, make_config
from graft.core.errors import ConfigError


def test_defaults_resolved_per_strategy():
    extract = make_config("d").resolve()
    assert (extract.strategy, extract.head, extract.optimizer, extract.epochs) == (
        "extract",
        "fit",
        None,
        None,
    )
    looped = make_config("d", epochs=5).resolve()  # an epoch setting asks for the epoch loop
    assert (looped.head, looped.optimizer, looped.schedule, looped.lr) == (
        "epochs",
        "adamw",
        "cosine",
        3e-3,
    )
    assert make_config("d", head="epochs").resolve().epochs == 60
    lpft = make_config("d", strategy="finetune", head="fit").resolve()  # starts from a fitted head
    assert (lpft.head, lpft.epochs, lpft.optimizer) == ("fit", 10, "sgd")
    ft = make_config("d", strategy="finetune").resolve()
    assert (ft.optimizer, ft.momentum, ft.schedule, ft.step_size, ft.gamma) == (
        "sgd",
        0.9,
        "step",
        7,
        0.1,
    )
    assert make_config("d", strategy="finetune", lr=0.01).resolve().lr == 0.01
    # the fitted head reads power-normalised features; the epoch loop and the trunks as they are
    assert extract.feature_norm == "root4"
    assert (looped.feature_norm, lpft.feature_norm, ft.feature_norm) == ("none",) * 3
    assert make_config("d", head="epochs", feature_norm="power").resolve().feature_norm == "power"
    # flip TTA comes with the fitted head; anywhere else only when asked for
    assert extract.tta == "flip"
    assert (looped.tta, lpft.tta, ft.tta) == ("none",) * 3
    assert make_config("d", strategy="finetune", tta="flip").resolve().tta == "flip"
    assert make_config("d", tta="none").resolve().tta == "none"
    with pytest.raises(ConfigError, match="unknown tta 'rotate'"):
        make_config("d", tta="rotate")


def test_power_features_refused_where_the_trunk_trains():
    with pytest.raises(ConfigError) as err:
        make_config("d", strategy="partial", unfreeze_last=1, feature_norm="power")
    assert str(err.value) == (
        "--feature-norm power is extract's: --strategy partial trains the blocks through the "
        "head, and a root's slope at zero is infinite; drop it or use --strategy extract"
    )
    with pytest.raises(ConfigError, match="unknown feature_norm 'cube'"):
        make_config("d", feature_norm="cube")


def test_yaml_overridden_by_flags_and_round_trip(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "data_dir: data\nepochs: 3\nlr: 0.5\nunfreeze: [layer4]\nstrategy: partial\n"
    )
    cfg = make_config(None, tmp_path / "c.yaml", epochs=7)
    assert (cfg.data_dir, cfg.epochs, cfg.lr, cfg.unfreeze) == ("data", 7, 0.5, ("layer4",))
    (tmp_path / "saved.yaml").write_text(dump_yaml(cfg))
    assert make_config(None, tmp_path / "saved.yaml") == cfg


def test_unknown_key_gets_a_suggestion(tmp_path):
    (tmp_path / "c.yaml").write_text("data_dir: d\nlearning_rate: 0.1\nepoch: 3\n")
    with pytest.raises(ConfigError) as err:
        make_config(None, tmp_path / "c.yaml")
    assert "unknown config key 'learning_rate'" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean: epochs"):
        make_config("d", epoch=3)


def test_wrong_types_and_values(tmp_path):
    (tmp_path / "c.yaml").write_text("data_dir: d\nepochs: many\n")
    with pytest.raises(ConfigError, match="'epochs' .* must be int"):
        make_config(None, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="val_fraction must be between 0 and 1"):
        make_config("d", val_fraction=1.5)
    with pytest.raises(ConfigError, match="unknown schedule 'cosin' \\(did you mean: cosine\\?\\)"):
        make_config("d", schedule="cosin")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"warmup_epochs": 2}, "--warmup-epochs is ignored with --strategy extract"),
        ({"progressive": True}, "--progressive is ignored with --strategy extract"),
        (
            {"rotation": 15.0},
            "--rotation is ignored with --strategy extract unless the cache "
            "holds augmented views: add --cache-views N",
        ),
    ],
)
def test_settings_extract_would_ignore_are_refused(options, message):
    with pytest.raises(ConfigError) as err:
        make_config("d", **options)
    assert message in str(err.value)
    make_config("d", strategy="finetune", **options)  # they do apply there
    if "rotation" in options:
        assert make_config("d", cache_views=2, **options).rotation == 15.0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lr": float("inf")}, "lr must be a finite number above 0"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"label_smoothing": 5.0}, "label_smoothing must be a finite number in [0, 1)"),
        ({"momentum": -1.0}, "momentum must be a finite number in [0, 1)"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite number at least 0"),
        ({"cache_views": -1}, "cache_views must be 0 or more"),
        ({"seed": 10**20}, "seed must be between 0 and 2**63-1"),
        ({"image_size": 100000}, "image_size 100000 is over 1024 pixels"),
    ],
)
def test_values_out_of_range_are_refused(options, message):
    with pytest.raises(ConfigError) as err:
        make_config("d", **options)
    assert message in str(err.value)


def test_resolve_fills_every_value_that_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = make_config("d", backbone="resnet18").resolve(input_size=224)
    assert cfg.image_size == 224 and cfg.workers is not None and cfg.workers >= 0
    assert cfg.cache_dir == str(tmp_path / "cache")
    assert cfg.out.startswith("runs/") and cfg.out.endswith("-resnet18")
    assert cfg.resolve(input_size=299) == cfg  # idempotent: a resolved config stays as it is


def test_non_utf8_config_file_is_a_config_error(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"data_dir: d\nepochs: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        make_config(None, tmp_path / "c.yaml")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"optimizer": "adam", "momentum": 0.5}, "--momentum is ignored with --optimizer adam"),
        ({"momentum": 0.5}, "--momentum is ignored with --optimizer adamw"),  # extract's default
        (
            {"schedule": "cosine", "step_size": 3, "strategy": "finetune"},
            "--step-size is ignored with --schedule cosine",
        ),
        ({"schedule": "none", "gamma": 0.5}, "--gamma is ignored with --schedule none"),
        (
            {"engine": "onnxruntime", "strategy": "finetune"},
            "--engine onnxruntime is ignored with --strategy finetune",
        ),
        (
            {"engine": "onnxruntime", "strategy": "partial", "unfreeze_last": 2},
            "--engine onnxruntime is ignored with --strategy partial",
        ),
        (
            {"backbone_lr_mult": 0.5, "strategy": "finetune"},
            "--backbone-lr-mult is ignored without --warmup-epochs",
        ),
        ({"backbone_lr_mult": 0.5}, "--backbone-lr-mult is ignored with --strategy extract"),
        ({"memory_gb": 8.0}, "--memory-gb is ignored with --strategy extract"),
        (
            {"head": "fit", "epochs": 5},
            "--epochs is ignored with --head fit (the head is solved to convergence, its L2 "
            "chosen by cross-validation: no epochs, learning rate or optimizer): drop it or use "
            "--head epochs",
        ),
        ({"head": "fit", "lr": 0.1, "patience": 3}, "--lr, --patience are ignored with --head"),
        ({"head": "fit", "balance": "sampler"}, "use --balance weights"),
        (
            {"refit": True, "strategy": "partial", "unfreeze_last": 2},
            "--refit is ignored with --strategy partial (it fits extract's head again, val "
            "images included, in a second; a head trained for epochs, or blocks that train, "
            "would need their whole training again): drop it or use --strategy extract --head fit",
        ),
        ({"refit": True, "epochs": 5}, "--refit is ignored with --head epochs"),
        (
            {"backbone": "efficientnet_lite0+efficientnet_lite2", "strategy": "finetune"},
            "concatenates the features of frozen networks: it trains with --strategy extract",
        ),
    ],
)
def test_settings_the_run_would_ignore_are_refused(options, message):
    with pytest.raises(ConfigError) as err:
        make_config("d", **options)
    assert message in str(err.value)


def test_inert_settings_resolve_to_none_and_their_defaults_pass():
    """A saved config shows only what ran; configs saved before hold the defaults: accepted."""
    cfg = make_config("d", momentum=0.9, step_size=7, gamma=0.1, memory_gb=2.0).resolve()
    assert (cfg.momentum, cfg.step_size, cfg.gamma, cfg.memory_gb) == (None, None, None, None)
    ft = make_config("d", strategy="finetune", warmup_epochs=2, backbone_lr_mult=0.5).resolve()
    assert (ft.momentum, ft.backbone_lr_mult, ft.memory_gb) == (0.9, 0.5, 2.0)
    assert make_config("d", strategy="finetune", optimizer="adam").resolve().momentum is None
    with pytest.raises(ConfigError, match=r"rotation must be a finite number in \[0, 180\]"):
        make_config("d", rotation=float("nan"), cache_views=2)


def test_partial_and_finetune_start_from_the_fitted_head_by_default():
    """LP-FT is partial's and finetune's default (docs/QUALITY.md, stops 43 and 45); --head epochs
    asks for the random head trained with the blocks."""
    partial = dict(strategy="partial", unfreeze_last=2)
    assert make_config("d", **partial).resolve().head == "fit"
    assert make_config("d", **partial, head="epochs").resolve().head == "epochs"
    assert make_config("d", strategy="finetune").resolve().head == "fit"
    assert make_config("d", strategy="finetune", head="epochs").resolve().head == "epochs"
    cfg = make_config("d", **partial, epochs=3, lr=0.01).resolve()
    assert (cfg.head, cfg.epochs, cfg.lr) == ("fit", 3, 0.01)  # its epochs still run


def test_refit_is_the_fitted_heads_setting():
    """Off unless asked for, with extract's fitted head; None (nothing it could do) elsewhere."""
    assert make_config("d").resolve().refit is False
    assert make_config("d", refit=True).resolve().refit is True
    assert make_config("d", head="epochs").resolve().refit is None
    assert make_config("d", strategy="finetune").resolve().refit is None
    assert make_config("d", strategy="finetune", refit=False).resolve().refit is False
