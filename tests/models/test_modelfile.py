"""Model files: round trip gives the same probabilities; hostile or damaged files are refused."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

import graft
from graft.core.errors import CheckpointError


def test_saved_model_predicts_like_the_trained_one(trained_run, shapes_dir):
    clf = graft.load(trained_run.run_dir)
    images = sorted((shapes_dir / "val" / "circle").glob("*.png"))[:4]
    probs = clf.probabilities(images)
    # the same network in memory, rebuilt from the same state: identical numbers
    from graft.inference.classifier import Classifier

    again = Classifier(clf.backbone, clf.classes, clf.runtime, clf.meta).probabilities(images)
    assert torch.allclose(probs, again)
    raw = Classifier(clf.backbone, clf.classes, clf.runtime).probabilities(images)
    assert not torch.allclose(probs, raw)  # model.json's temperature is applied on loading
    assert probs.shape == (4, 3) and torch.allclose(probs.sum(1), torch.ones(4))
    top = clf.predict(images, top_k=2)
    assert all(len(p) == 2 and next(iter(p)) == "circle" for p in top)


def test_run_folder_contents(trained_run):
    names = {p.name for p in trained_run.run_dir.iterdir()}
    assert {"model.safetensors", "model.json", "config.yaml", "split"} <= names
    assert "metrics.csv" not in names  # a fitted head has no epochs
    meta = json.loads((trained_run.run_dir / "model.json").read_text())
    assert meta["classes"] == ["circle", "square", "triangle"]
    assert meta["backbone"] == "efficientnet_lite0" and meta["strategy"] == "extract"
    assert meta["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert meta["best"]["val_acc"] == trained_run.best["val_acc"]
    assert meta["best"]["head"] == "fit" and meta["best"]["folds"] == 5
    assert {"torch", "timm", "graft"} <= set(meta["versions"])
    # the unknown score's reference features: the training images', L2-normalised, half precision
    assert {"reference.safetensors", "scores.safetensors"} <= names
    assert meta["decision"]["unknown"]["references"] == 48 and meta["decision"]["thresholds"] == {}
    # keys only some runs have (partial's trunk, --auto's selection) stay out when they do not
    assert not {"trunk", "selection", "features_computed_per_rank"} & set(meta)
    assert not list(trained_run.run_dir.glob(".graft-tmp-*"))


@pytest.fixture
def run_copy(trained_run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(trained_run.run_dir, dst)
    return dst


class _Payload:
    def __reduce__(self):
        return (exec, ("open('/tmp/graft-pwned', 'w').write('x')",))


def test_the_head_reads_the_features_as_model_json_says(run_copy):
    meta = json.loads((run_copy / "model.json").read_text())
    assert meta["feature_norm"] == "root4"  # the default since stop 37
    assert graft.load(run_copy).backbone.model.head.exponent == 0.25
    # a model saved by stops 32-36 says "power": its head was fitted on square roots
    meta["feature_norm"] = "power"
    (run_copy / "model.json").write_text(json.dumps(meta))
    assert graft.load(run_copy).backbone.model.head.exponent == 0.5


def test_pickle_payload_in_place_of_weights_never_runs(run_copy, tmp_path):
    (run_copy / "model.safetensors").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match="damaged or not a safetensors file"):
        graft.load(run_copy)
    import os

    assert not os.path.exists("/tmp/graft-pwned")


def test_reference_features_are_checked(run_copy):
    from safetensors.torch import save_file

    (run_copy / "reference.safetensors").unlink()
    with pytest.raises(CheckpointError, match="reference.safetensors not found: model.json has"):
        graft.load(run_copy)
    nan = torch.full((48, 1280), float("nan"))
    save_file({"features": nan}, str(run_copy / "reference.safetensors"))
    with pytest.raises(CheckpointError, match="'features' holds values that are not finite"):
        graft.load(run_copy)


def test_weights_that_are_not_finite_numbers_are_refused(run_copy):
    from safetensors.torch import load_file, save_file

    state = load_file(str(run_copy / "model.safetensors"))
    state["head.weight"][0, 0] = float("inf")
    save_file(state, str(run_copy / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor head.weight holds values that are not finite numbers",
    ):
        graft.load(run_copy)


def test_truncated_weights_refused(run_copy):
    data = (run_copy / "model.safetensors").read_bytes()
    (run_copy / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="damaged or not a safetensors file"):
        graft.load(run_copy)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"classes": "circle"}, "classes must be a list of at least two names"),
        ({"classes": ["a", 2]}, "class name 2 is not a non-empty string"),
        ({"classes": ["a", "a", "b"]}, "class name(s) 'a' appear more than once"),
        ({"backbone": 7}, "'backbone' must be str, got int"),
        ({"preprocess": {"mean": 1}}, "preprocess.input_size must be an integer from 16 to 1024"),
        (
            {"preprocess.input_size": 100000},
            "preprocess.input_size must be an integer from 16 to 1024, got 100000",
        ),
        ({"preprocess.std": [0, 0, 0]}, "preprocess.std must be positive, got [0, 0, 0]"),
        ({"preprocess.crop_pct": 0}, "preprocess.crop_pct must be a number from 0.25 to 1, got 0"),
        ({"preprocess.mean": [0.5, 0.5]}, "preprocess.mean must be 3 finite numbers"),
        ({"preprocess.interpolation": "lanczos"}, "preprocess.interpolation must be one of"),
        ({"config": {"max_pixels": 10**15}}, "config.max_pixels must be an integer from 1 to"),
        ({"val": [1, 2]}, "'val' must be dict[str, Any] | None, got list"),
        ({"format_version": 99}, "has format_version 99; this graft reads 1"),
        (
            {"feature_norm": "cube"},
            "feature_norm must be one of 'power', 'root4' or absent, got 'cube'",
        ),
        ({"tta": "rotate"}, "tta must be 'flip' or absent, got 'rotate'"),
        ({"classes": ["a", "b", "c", "d"]}, "model.json lists 4 classes; the weights have"),
        ({"backbone": "resnet18"}, "does not fit the backbone in model.json"),
        ({"decision.unknown.k": 0}, "decision.unknown.k must be a whole number from 1 to 1000"),
        ({"decision.unknown.threshold": -1}, "decision.unknown.threshold must be a number from"),
        ({"decision.unknown.references": 5}, "'features' must have shape (5, 1280), got"),
        (
            {"decision.thresholds": {"dog": {"kind": "recall", "target": 0.9, "threshold": 0.1}}},
            "decision.thresholds names 'dog', which is not a class",
        ),
        (
            {"decision.thresholds": {"circle": {"kind": "recall", "target": 2, "threshold": 0}}},
            "decision.thresholds.circle: target and threshold must be numbers from 0 to 1",
        ),
    ],
)
def test_malformed_model_json_refused(run_copy, change, message):
    meta = json.loads((run_copy / "model.json").read_text())
    for key, value in change.items():
        if key.startswith("preprocess."):
            meta["preprocess"][key.split(".")[1]] = value
        elif key == "decision.thresholds":
            meta["decision"]["thresholds"] = value
        elif key.startswith("decision.unknown."):
            meta["decision"]["unknown"][key.split(".")[2]] = value
        else:
            meta[key] = value
    (run_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        graft.load(run_copy)
    assert message in str(err.value)


def test_random_edits_of_model_json_never_crash(run_copy):
    """Fuzz: any field of model.json replaced by a value of another type, a huge number, a
    negative one, an empty or nested container: loading either works or raises CheckpointError.
    (A limit on memory guards against a field that would allocate: see test_robustness.)"""
    import random

    original = json.loads((run_copy / "model.json").read_text())
    odd = [
        None,
        True,
        -1,
        0,
        10**12,
        1e308,
        float("nan"),
        "",
        "x" * 1000,
        [],
        {},
        [1, 2, 3],
        {"a": {"b": []}},
        ["a"],
        [0.5] * 3,
        [-1e9] * 3,
    ]
    paths = [(k,) for k in original] + [("preprocess", k) for k in original["preprocess"]]
    rng = random.Random(0)
    for _ in range(60):
        meta = json.loads(json.dumps(original))
        for path in rng.sample(paths, 2):
            target = meta if len(path) == 1 else meta["preprocess"]
            if isinstance(target, dict):
                target[path[-1]] = rng.choice(odd)
        (run_copy / "model.json").write_text(json.dumps(meta))
        try:
            graft.load(run_copy)
        except CheckpointError:
            pass


def test_not_a_run_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is not a graft run folder"):
        graft.load(tmp_path)


def test_written_files_respect_the_umask(tmp_path):
    import os

    from graft.core.runtime import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_predict_accepts_one_image_any_iterable_and_arrays(trained_run, shapes_dir):
    import numpy as np
    from PIL import Image

    from graft.core.errors import GraftError, ImageError

    clf = graft.load(trained_run.run_dir)
    path = shapes_dir / "val" / "circle" / "000.png"
    one = clf.predict(str(path))
    assert len(one) == 1 and set(one[0]) == {"circle", "square", "triangle"}
    assert clf.predict(path) == one == clf.predict(p for p in [path])
    array = np.asarray(Image.open(path).convert("RGB"))
    assert clf.predict(array)[0].keys() == one[0].keys()
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    top = max(one[0], key=one[0].get)
    assert max(clf.predict(tensor)[0], key=clf.predict(tensor)[0].get) == top
    with pytest.raises(ImageError) as err:
        clf.predict(np.zeros((5, 7, 9, 2)))
    assert "an array of shape (5, 7, 9, 2) is not an image" in str(err.value)
    assert len(str(err.value)) < 300  # names the shape, never prints the array
    with pytest.raises(GraftError, match="cannot read images from a int: pass a file path"):
        clf.predict(42)
    assert clf.predict_files([array])[0].path == "<ndarray (64, 64, 3)>"
