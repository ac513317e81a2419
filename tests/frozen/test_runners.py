"""The ONNX Runtime extraction engine: the same features as PyTorch fp32 (to the fp16 they are
stored in), exported once, a damaged export re-exported, a failing one falling back to PyTorch,
and settings it cannot honour refused."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from graft.core.config import make_config
from graft.core.errors import ConfigError
from graft.core.runtime import resolve_runtime
from graft.data.discovery import discover
from graft.frozen.features import extract_features
from graft.models.backbones import create_backbone

from ..conftest import make_shapes

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # an ONNX export: a few seconds each

RT = resolve_runtime("cpu", "fp32")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = make_shapes(tmp_path_factory.mktemp("eng"), n_train=3, n_val=1)
    torch.manual_seed(0)
    bb = create_backbone("timm:resnet10t", 4, pretrained=False)
    return dataclasses.replace(bb, spec=bb.spec.with_size(64)), discover(data).train


def test_onnxruntime_features_equal_pytorch_fp32_and_the_export_is_kept(setup, tmp_path):
    bb, samples = setup
    want = extract_features(bb, samples, RT, cache_dir=tmp_path / "t").features
    got = extract_features(bb, samples, RT, cache_dir=tmp_path / "o", engine="onnxruntime")
    # stored as fp16: equal to its rounding (half an ulp of the largest feature)
    assert torch.allclose(got.features, want, rtol=2e-3, atol=1e-3 * want.abs().max())
    [onnx_file] = (tmp_path / "o" / "onnx").glob("*.onnx")
    stamp = onnx_file.stat().st_mtime_ns
    for entry in (tmp_path / "o").rglob("*.safetensors"):
        entry.unlink()  # features gone, the export kept: computed again without exporting
    again = extract_features(bb, samples, RT, cache_dir=tmp_path / "o", engine="onnxruntime")
    assert again.computed == len(samples) and onnx_file.stat().st_mtime_ns == stamp
    assert torch.equal(again.features, got.features)


def test_a_damaged_export_is_redone_and_a_failing_one_falls_back(
    setup, tmp_path, monkeypatch, caplog
):
    import graft.frozen.runners as engines

    bb, samples = setup
    want = extract_features(bb, samples, RT, cache_dir=tmp_path / "t").features
    extract_features(bb, samples[:1], RT, cache_dir=tmp_path / "o", engine="onnxruntime")
    [onnx_file] = (tmp_path / "o" / "onnx").glob("*.onnx")
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])  # truncated
    got = extract_features(bb, samples, RT, cache_dir=tmp_path / "o", engine="onnxruntime")
    assert onnx_file.stat().st_size > 1000
    assert torch.allclose(got.features, want, rtol=2e-3, atol=1e-3 * want.abs().max())

    def cannot(*a, **k):
        raise RuntimeError("unsupported operator aten::frobnicate\nmore detail")

    monkeypatch.setattr(engines, "_export", cannot)
    with caplog.at_level(logging.WARNING, logger="graft.frozen.runners"):
        fell = extract_features(bb, samples, RT, cache_dir=tmp_path / "n", engine="onnxruntime")
    assert (
        "ONNX Runtime cannot run this network (unsupported operator aten::frobnicate); "
        "extracting with PyTorch" in caplog.text
    )
    assert torch.equal(fell.features, want)


def test_settings_onnxruntime_cannot_honour_are_refused():
    from graft.frozen.runners import resolve_engine

    with pytest.raises(ConfigError, match="unknown engine 'ort'.*choose one of auto, torch, onnx"):
        make_config("d", engine="ort")
    with pytest.raises(ConfigError, match="computes in fp32, not bf16: drop --precision"):
        resolve_engine("onnxruntime", resolve_runtime("cpu", "bf16"), "bf16")
    assert resolve_engine("onnxruntime", RT) == "onnxruntime"
    assert resolve_engine("torch", RT) == "torch"


def test_auto_takes_the_engine_that_finishes_sooner_and_keeps_a_warm_cache(
    setup, tmp_path, monkeypatch
):
    import graft.frozen.features as features
    from graft.frozen.features import choose_engine

    bb, samples = setup
    n = len(samples)
    engine, why = choose_engine("auto", bb, samples, RT, cache_dir=tmp_path)
    assert engine == "torch"  # 9 images do not pay for the export
    assert why == (
        f"{n} images to extract: about 3 s with ONNX Runtime (its one-time export included), "
        "0 s with PyTorch"
    )
    monkeypatch.setattr(features, "EXPORT_SECONDS", 0.0)  # as if the export cost nothing
    assert choose_engine("auto", bb, samples, RT, cache_dir=tmp_path)[0] == "onnxruntime"
    extract_features(bb, samples, RT, cache_dir=tmp_path, engine="torch")  # torch's cache warm
    assert choose_engine("auto", bb, samples, RT, cache_dir=tmp_path) == (
        "torch",
        f"every feature is in its cache already ({n} images)",
    )
    gpu_like = dataclasses.replace(RT, device=torch.device("meta"))
    assert choose_engine("auto", bb, samples, gpu_like, cache_dir=tmp_path)[0] == "torch"
    assert (
        choose_engine("auto", bb, samples, RT, cache_dir=tmp_path / "n", distributed=True)[1]
        == "torchrun: every process extracts with the same engine"
    )
    assert choose_engine("onnxruntime", bb, samples, RT, cache_dir=tmp_path) == (
        "onnxruntime",
        "asked for",
    )


def test_a_run_records_the_engine_that_ran_and_why(trained_run):
    import json
    import re

    import yaml

    meta = json.loads((trained_run.run_dir / "model.json").read_text())
    assert meta["engine"]["engine"] == "torch"  # 72 small images do not pay for the export
    # the session's feature cache may hold them already, from an earlier test
    assert re.fullmatch(
        r"\d+ images to extract: about \d+ s with ONNX Runtime \(its one-time export included\), "
        r"\d+ s with PyTorch|every feature is in its cache already \(72 images\)",
        meta["engine"]["reason"],
    )
    assert yaml.safe_load((trained_run.run_dir / "config.yaml").read_text())["engine"] == "torch"
