"""Config: defaults resolved per strategy, YAML loading, unknown keys and bad values refused."""

from __future__ import annotations

import pytest

from graft.config import dump_yaml, make_config
from graft.errors import ConfigError


def test_defaults_resolved_per_strategy():
    extract = make_config("d").resolve()
    assert (extract.strategy, extract.optimizer, extract.schedule) == ("extract", "adamw", "cosine")
    ft = make_config("d", strategy="finetune").resolve()
    assert (ft.optimizer, ft.momentum, ft.schedule, ft.step_size, ft.gamma) == (
        "sgd",
        0.9,
        "step",
        7,
        0.1,
    )
    assert make_config("d", strategy="finetune", lr=0.01).resolve().lr == 0.01


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
