"""graft predict's engine: ONNX Runtime on the run's cached export once the images pay for it,
PyTorch for a few images; the same probabilities either way."""

from __future__ import annotations

import pytest

from graft.core.errors import ConfigError
from graft.inference.classifier import Classifier, OnnxClassifier
from graft.inference.engines import AUTO_MIN_IMAGES, load_for

pytest.importorskip("onnxruntime")


def test_auto_exports_once_for_many_images_and_agrees_with_pytorch(
    trained_run, shapes_dir, tmp_path
):
    run = trained_run.run_dir
    few, why = load_for(run, 3, cache_dir=tmp_path)
    assert type(few) is Classifier and why.startswith("torch: 3 image(s) do not pay")
    many, why = load_for(run, AUTO_MIN_IMAGES, cache_dir=tmp_path)
    assert isinstance(many, OnnxClassifier)
    assert why == f"onnxruntime: a CPU, and {AUTO_MIN_IMAGES} images pay for the one-time export"
    (export,) = (tmp_path / "exports").glob("*.onnx")
    stamp = export.stat().st_mtime_ns
    again, why = load_for(run, 3, cache_dir=tmp_path)  # cached: worth it for any number
    assert isinstance(again, OnnxClassifier) and why.endswith("this model's export is cached")
    assert export.stat().st_mtime_ns == stamp
    images = sorted(str(p) for p in (shapes_dir / "val").rglob("*.png"))[:8]
    a, b = few.predict_files(images, top_k=None), again.predict_files(images, top_k=None)
    assert [p.decision for p in a] == [p.decision for p in b]
    for p, q in zip(a, b):
        assert max(abs(p.probs[c] - q.probs[c]) for c in p.probs) < 1e-4
        assert abs(p.unknown - q.unknown) < 1e-3


def test_the_engine_asked_for_is_the_one_used(trained_run, tmp_path):
    clf, why = load_for(trained_run.run_dir, 1, engine="torch", cache_dir=tmp_path)
    assert type(clf) is Classifier and why == "torch: asked for"
    with pytest.raises(ConfigError, match="unknown engine 'ort'; choose one of auto, torch"):
        load_for(trained_run.run_dir, 1, engine="ort")
