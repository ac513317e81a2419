"""ONNX export: preprocessing inside, dynamic batch, parity with PyTorch checked on every export,
the exported file usable by `graft predict`, tampered files refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")
import graft  # noqa: E402
from graft.core.errors import CheckpointError  # noqa: E402
from graft.inference.classifier import OnnxClassifier  # noqa: E402
from graft.inference.export import ExportError, export  # noqa: E402
from graft.inference.onnxfile import read_onnx_meta  # noqa: E402


def _graft(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "graft", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "lite0.onnx"
    return export(trained_run.run_dir, out=out), trained_run


@pytest.mark.slow
def test_export_keeps_preprocessing_and_matches_pytorch(exported, shapes_dir):
    result, run = exported
    assert result.path.is_file() and result.source == "val split" and result.images == 16
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0
    meta = read_onnx_meta(result.path)
    assert meta["classes"] == ["circle", "square", "triangle"]
    assert meta["backbone"] == "efficientnet_lite0" and meta["preprocess"].input_size == 224
    onnx_clf, torch_clf = OnnxClassifier(result.path), graft.load(run.run_dir)
    images = sorted((shapes_dir / "val").rglob("*.png"))[:5]
    for batch in (1, 5):  # dynamic batch
        p_onnx = onnx_clf.probabilities(images[:batch], batch_size=batch)
        assert torch.allclose(p_onnx, torch_clf.probabilities(images[:batch]), atol=1e-4)
    r = _graft("predict", result.path, images[0], "--json", "--top-k", "1")
    assert r.returncode == 0, r.stderr
    via_run = _graft("predict", run.run_dir, images[0], "--json", "--top-k", "1")
    got, want = json.loads(r.stdout)[0], json.loads(via_run.stdout)[0]
    assert list(got["probabilities"]) == list(want["probabilities"])
    assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)
    # the unknown score is computed inside the graph, the decision from the metadata
    assert got["decision"] == want["decision"]
    assert got["unknown_score"] == pytest.approx(want["unknown_score"], abs=1e-4)
    assert meta["policy"] == torch_clf.policy and meta["unknown_k"] == torch_clf.unknown_k
    # flip TTA (the default) runs inside the graph: it agrees with the model that averages the
    # mirror in, not with the same model reading each image once (compared as logs: these
    # shapes are easy, their probabilities near 0 and 1)
    logs = onnx_clf.probabilities(images).log()
    assert torch_clf.tta == "flip"
    assert (logs - torch_clf.probabilities(images).log()).abs().max() < 1e-3
    torch_clf.tta = None
    assert (logs - torch_clf.probabilities(images).log()).abs().max() > 1e-2


@pytest.mark.slow
def test_a_torchvision_classic_exports_too(shapes_dir, tmp_path):
    run = graft.train(
        shapes_dir,
        backbone="resnet18",
        pretrained=False,
        epochs=1,
        workers=0,
        report=False,
        out=str(tmp_path / "r18"),
    )
    result = export(run.run_dir)
    assert result.path == run.run_dir / "model.onnx"
    assert result.max_abs_diff <= 1e-3 and result.top1_agreement == 1.0


def test_a_disagreeing_export_is_not_kept(trained_run, tmp_path, monkeypatch):
    import importlib

    ex = importlib.import_module("graft.inference.export")  # graft.export: the function

    monkeypatch.setattr(ex, "EXPORT_PROBABILITY_PARITY", -1.0)  # any difference at all is too much
    with pytest.raises(ExportError, match="disagrees with PyTorch on 16 val split image"):
        ex.export(trained_run.run_dir, out=tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_tampered_onnx_files_are_refused_in_one_line(exported, tmp_path, shapes_dir):
    import onnx

    result, _ = exported
    image = sorted((shapes_dir / "val").rglob("*.png"))[0]
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(result.path.read_bytes()[:5000])
    proto = onnx.load(str(result.path))
    for p in proto.metadata_props:
        if p.key == "classes":
            p.value = json.dumps(["a", "b", "c", "d"])
    onnx.save(proto, str(tmp_path / "four.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "foreign.onnx"))
    for name, message in [
        ("truncated.onnx", "is damaged or not an ONNX model"),
        ("four.onnx", "the graph has 3 outputs but its metadata names 4"),
        ("foreign.onnx", "was not exported by graft"),
    ]:
        r = _graft("predict", tmp_path / name, image)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(CheckpointError):
        OnnxClassifier(tmp_path / "missing.onnx")


@pytest.mark.slow
def test_random_edits_of_the_onnx_metadata_never_crash_or_blow_up(exported, tmp_path, shapes_dir):
    """Fuzz in a child process under a 6 GB address-space limit: every edit of graft's metadata
    in an exported file either predicts or ends in one CheckpointError line; an input size of
    100000 would ask for 120 GB and die here if it were trusted."""
    result, _ = exported
    image = sorted((shapes_dir / "val").rglob("*.png"))[0]
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ_ONNX)
    r = subprocess.run(
        [sys.executable, str(script), str(result.path), str(image), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    refused, loaded = map(int, r.stdout.split())
    assert refused >= 20 and loaded >= 1


FUZZ_ONNX = """
import json, random, resource, sys
import onnx
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from graft.core.errors import CheckpointError
from graft.inference.classifier import OnnxClassifier

path, image, tmp = sys.argv[1:]
original = onnx.load(path)
props = {p.key: p.value for p in original.metadata_props}
pre = json.loads(props["preprocess"])
odd = [None, True, -1, 0, 7, 10**5, 10**12, 1e308, "", "x", [], {}, [0.5, 0.5], [0, 0, 0],
       [1e9] * 3, "bicubic", "lanczos"]
rng = random.Random(0)
refused = loaded = 0
for i in range(40):
    meta = dict(props)
    p2 = dict(pre)
    key = rng.choice(list(p2))
    p2[key] = rng.choice(odd)
    meta["preprocess"] = json.dumps(p2)
    if i % 4 == 0:
        meta["classes"] = json.dumps(rng.choice([["a", "a", "b"], ["a"], "ab", ["a", "b", "c"]]))
    if i % 5 == 0:
        meta["max_pixels"] = str(rng.choice(odd))
    proto = onnx.load(path)
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    out = f"{tmp}/fuzz{i}.onnx"
    onnx.save(proto, out)
    try:
        OnnxClassifier(out).predict_files([image])
        loaded += 1
    except CheckpointError:
        refused += 1
print(refused, loaded)
"""


@pytest.mark.slow
def test_the_readmes_plain_python_example_gives_graft_s_probabilities(exported, shapes_dir):
    """The docs' onnxruntime + Pillow + numpy snippet preprocesses exactly as graft does."""
    import re
    from pathlib import Path

    result, _ = exported
    readme = (Path(__file__).resolve().parents[2] / "docs" / "GUIDE.md").read_text(encoding="utf-8")
    snippet = re.search(r"```python\n(import json\n\nimport numpy.*?)```", readme, re.S).group(1)
    image = sorted((shapes_dir / "val").rglob("*.png"))[3]
    snippet = snippet.replace("runs/demo/model.onnx", str(result.path))
    snippet = snippet.replace("data/demo/val/bag/0000.png", str(image))
    scope: dict = {}
    exec(compile(snippet.replace("print(", "top3 = ("), "README", "exec"), scope)
    want = OnnxClassifier(result.path).probabilities([image])[0]
    assert torch.allclose(torch.from_numpy(scope["probabilities"]), want, atol=1e-5)
    # the snippet's decision rule is graft's, on every kind of row
    from graft.core.decisions import Policy, Threshold

    policy = Policy(
        ("circle", "square", "triangle"),
        {"square": Threshold("recall", 0.9, 0.2), "circle": Threshold("precision", 0.9, 0.8)},
        scope["rule"]["unknown_threshold"],
    )
    scope["rule"]["thresholds"] = policy.to_dict()
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 3, generator=g), 1)
    unknown = torch.rand(200, generator=g) * 2 * policy.unknown_threshold
    mine = [scope["decide"](p.numpy(), float(u)) for p, u in zip(probs, unknown)]
    assert mine == policy.decide(probs, unknown) and {"review", "unknown"} <= set(mine)


def test_concatenated_backbones_train_predict_and_export_as_one_graph(shapes_dir, tmp_path):
    run = graft.train(
        shapes_dir,
        backbone="efficientnet_lite0+efficientnet_lite1",
        out=str(tmp_path / "run"),
        workers=0,
        report=False,
    )
    assert run.val_accuracy >= 0.8 and run.best["head"] == "fit"
    assert json.loads((run.run_dir / "model.json").read_text())["backbone"] == (
        "efficientnet_lite0+efficientnet_lite1"
    )
    onnx_path = export(run.run_dir).path
    image = str(shapes_dir / "val" / "circle" / "000.png")
    eager = graft.load(run.run_dir).predict([image])[0]
    exported = graft.load(onnx_path).predict([image])[0]
    assert max(abs(eager[c] - exported[c]) for c in eager) < 1e-4
    # the calibration travels in the file, and the loaded model says which it applies
    assert graft.load(onnx_path).meta.temperature == graft.load(run.run_dir).temperature != 1.0
