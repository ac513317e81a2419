"""A corpus of odd and broken files through verify, train, predict and evaluate; a property test
for the loader; duplicates between splits; hostile class names; determinism."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import graft
from graft.core.errors import CheckpointError, ImageError
from graft.data.images import load_image
from graft.data.transforms import PreprocessSpec, build_transforms

from .conftest import draw_shape, make_shapes
from .data.test_discovery import _png_claiming


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def build_corpus(folder: Path) -> tuple[dict[str, str], list[str]]:
    """Write every odd-but-valid and broken file into `folder`.
    Returns ({bad file name: reason prefix}, [good file names])."""
    import random

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    base = draw_shape("circle", rng)
    good = {
        "cmyk.jpg": lambda p: base.convert("CMYK").save(p),
        "gray16.png": lambda p: Image.fromarray(
            np.asarray(base.convert("L"), dtype=np.uint16) * 257
        ).save(p),
        "onebit.png": lambda p: base.convert("1").save(p),
        "palette_transparent.png": lambda p: base.convert("P").save(p, transparency=0),
        "rgba.png": lambda p: base.convert("RGBA").save(p),
        "la.png": lambda p: base.convert("LA").save(p),
        "exif_rotated.jpg": lambda p: base.save(p, exif=_orientation(6)),
        "animated.gif": lambda p: base.save(p, save_all=True, append_images=[base.rotate(90)]),
        "animated.webp": lambda p: base.save(p, save_all=True, append_images=[base.rotate(90)]),
        "one_pixel.png": lambda p: Image.new("RGB", (1, 1), (10, 20, 30)).save(p),
        "wide 4000x10.png": lambda p: Image.new("RGB", (4000, 10), (0, 0, 0)).save(p),
        "café ünïcode.png": lambda p: base.save(p),
        "UPPER.JPEG": lambda p: base.save(p, "JPEG"),
    }
    for name, write in good.items():
        write(folder / name)
    full = _jpeg_bytes(base)
    png = io.BytesIO()
    base.save(png, "PNG")
    bad = {
        "zero.jpg": (b"", "empty file (0 bytes)"),
        "truncated.jpg": (full[: len(full) // 2], "cannot decode"),
        "truncated.png": (png.getvalue()[:-60], "cannot decode"),
        "random.jpg": (bytes(rng.randrange(256) for _ in range(3000)), "not a recognised"),
        "text.png": (b"just some text\n", "a text file, not an image"),
        "doc.jpg": (b"%PDF-1.7\n1 0 obj\n", "a PDF document, not an image"),
        "bomb.png": (_png_claiming(15000, 12000), "15000x12000 = 180,000,000 pixels"),
    }
    for name, (content, _) in bad.items():
        (folder / name).write_bytes(content)
    reasons = {name: reason for name, (_, reason) in bad.items()}
    os.symlink(folder / "does-not-exist.png", folder / "broken_link.png")
    reasons["broken_link.png"] = "file not found"
    (folder / "folder.jpg").mkdir()  # a folder named like an image: not a file, not listed
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "._shadow.jpg").write_bytes(b"\0\1")
    return reasons, sorted(good)


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def graft_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "graft", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_bad_file_corpus_through_every_command(tmp_path):
    data = make_shapes(tmp_path / "data", n_train=6, n_val=3, classes=("circle", "square"))
    shutil.move(data / "train" / "square", data / "train" / "square with spaces ü")
    shutil.move(data / "val" / "square", data / "val" / "square with spaces ü")
    bad, good = build_corpus(data / "train" / "circle")
    bad_paths = {str(data / "train" / "circle" / n): r for n, r in bad.items()}

    r = graft_cli("verify", data, "--json")
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["classes"] == ["circle", "square with spaces ü"]
    assert report["counts"]["train"]["circle"] == 6 + len(good) + len(bad)
    found = {b["path"]: b["reason"] for b in report["bad"]}
    assert found.keys() == bad_paths.keys()
    for path, reason in bad_paths.items():
        assert found[path].startswith(reason) or reason in found[path], (path, found[path])

    run = tmp_path / "run"
    r = graft_cli("train", data, "--out", run, "--workers", "0", "--epochs", "5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: {len(bad)} file(s) cannot be used:" in r.stderr
    assert all(p in r.stderr for p in bad_paths)
    assert not (run / "model.json").exists()

    r = graft_cli("train", data, "--out", run, "--workers", "0", "--epochs", "5", "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert f"skipped {len(bad)} unreadable file(s)" in r.stdout
    assert set(json.loads((run / "model.json").read_text())["skipped_files"]) == set(bad_paths)

    r = graft_cli("predict", run, data / "train" / "circle", "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    rows = {Path(x["path"]).name: x for x in json.loads(r.stdout)}
    assert set(rows) == {*good, *bad, *[f"{i:03d}.png" for i in range(6)]}
    assert all(rows[n]["error"] is None and len(rows[n]["probabilities"]) == 2 for n in good)
    assert all(rows[n]["error"] is not None for n in bad)

    r = graft_cli("evaluate", run, data / "train", "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["n"] == 6 + len(good) + 6 and len(ev["skipped"]) == len(bad)


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads anything: make the open fail the way it would for a user

        def deny(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr("graft.data.images.Image.open", deny)
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert err.value.reason == "permission denied; make the file readable"


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr", "PA", "La"]
FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"]


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    mode=st.sampled_from(MODES),
    fmt=st.sampled_from(FORMATS),
    w=st.integers(1, 48),
    h=st.integers(1, 48),
    seed=st.integers(0, 2**16),
    cut=st.one_of(st.none(), st.integers(0, 400)),
)
def test_any_small_image_loads_or_raises_graft_error(tmp_path, mode, fmt, w, h, seed, cut):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    try:
        im = im.convert(mode)
        buf = io.BytesIO()
        im.save(buf, fmt)
    except (OSError, ValueError, KeyError):
        return  # Pillow cannot write that mode in that format: nothing to read back
    data = buf.getvalue() if cut is None else buf.getvalue()[:cut]
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    spec = PreprocessSpec(32, (0.5,) * 3, (0.5,) * 3)
    try:
        x = build_transforms(spec, train=False)(load_image(path))
    except ImageError:
        return
    assert x.shape == (3, 32, 32) and x.dtype.is_floating_point


def test_duplicates_between_train_and_val_warned_and_dropped(tmp_path, caplog):
    data = make_shapes(tmp_path / "data", n_train=4, n_val=2)
    shutil.copy(data / "train" / "circle" / "000.png", data / "val" / "circle" / "copy.png")
    with caplog.at_level(logging.WARNING):
        run = graft.train(data, out=str(tmp_path / "a"), workers=0, epochs=2, report=False)
    assert "1 val/test image(s) are identical to train images" in caplog.text
    assert str(data / "val" / "circle" / "copy.png") in caplog.text
    assert run.val_images == 7
    run = graft.train(data, out=str(tmp_path / "b"), workers=0, epochs=2, dedupe=True, report=False)
    assert run.val_images == 6


def test_same_seed_same_metrics(tmp_path, shapes_dir):
    runs = [
        graft.train(shapes_dir, out=str(tmp_path / n), workers=0, epochs=15, seed=1, report=False)
        for n in ("a", "b")
    ]

    def rows(run):
        return [
            {k: v for k, v in r.items() if k != "seconds"}
            for r in csv.DictReader(open(run.run_dir / "metrics.csv"))
        ]

    assert rows(runs[0]) == rows(runs[1]) and len(rows(runs[0])) == 15
    assert "val_recall/circle" in rows(runs[0])[0]


@pytest.mark.parametrize("name", ["..", "a/b", "x\\y", "line\nbreak", "tab\there"])
def test_hostile_class_names_refused(trained_run, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    meta = json.loads((run / "model.json").read_text())
    meta["classes"][0] = name
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match="cannot be used: it holds a path separator or a control character"
    ):
        graft.load(run)


def test_test_split_scored_once_and_apart(tmp_path):
    data = make_shapes(tmp_path / "data", n_train=6, n_val=3)
    make_shapes(tmp_path / "extra", n_train=4, n_val=1, seed=9)
    shutil.move(tmp_path / "extra" / "train", data / "test")
    run = graft.train(data, out=str(tmp_path / "run"), workers=0, epochs=10, report=False)
    assert run.test["n"] == 12 and 0.0 <= run.test["accuracy"] <= 1.0
    lo, hi = run.test["accuracy_ci95"]
    assert lo <= run.test["accuracy"] <= hi
    meta = json.loads((run.run_dir / "model.json").read_text())
    assert meta["test"]["n"] == 12 and meta["best"]["val_acc"] == run.best["val_acc"]
    assert (run.run_dir / "split" / "test.txt").read_text().count("\n") == 12


@pytest.mark.parametrize("balance", ["weights", "sampler"])
def test_balance_on_imbalanced_classes(tmp_path, balance):
    data = make_shapes(tmp_path / "data", n_train=12, n_val=4)
    for p in sorted((data / "train" / "square").glob("*.png"))[2:]:
        p.unlink()  # 12 circles, 2 squares, 12 triangles
    run = graft.train(
        data, out=str(tmp_path / "run"), workers=0, epochs=20, balance=balance, report=False
    )
    recall = run.history[-1]["val_recall"]
    assert set(recall) == {"circle", "square", "triangle"}
    assert f"balance: {balance}" in (run.run_dir / "config.yaml").read_text()


# ---------------------------------------------------------------- careless hands, round three


def test_out_onto_a_folder_of_someone_elses_files_is_refused(tmp_path, shapes_dir):
    mine = tmp_path / "p"
    mine.mkdir()
    (mine / "README.md").write_text("notes\n")
    (mine / "config.yaml").write_text("my: cfg\n")
    for extra in ([], ["--overwrite"]):
        r = graft_cli("train", shapes_dir, "--out", mine, "--workers", "0", *extra)
        assert r.returncode == 2, r.stderr
        assert (
            r.stderr.strip()
            .splitlines()[-1]
            .startswith(
                f"error: --out {mine} holds files that are not a graft run (README.md, config.yaml)"
            )
        )
    assert sorted(p.name for p in mine.iterdir()) == ["README.md", "config.yaml"]
    assert (mine / "README.md").read_text() == "notes\n"


def test_out_inside_the_data_folder_is_refused(tmp_path):
    data = make_shapes(tmp_path / "data", n_train=3, n_val=1)
    for out in (data, data / "run"):
        r = graft_cli("train", data, "--out", out, "--workers", "0")
        assert r.returncode == 2 and "is inside the data folder" in r.stderr, r.stderr
    assert not (data / "run").exists() and not (data / "model.json").exists()


def test_a_class_folder_with_a_newline_is_refused_at_discovery(tmp_path):
    data = make_shapes(tmp_path / "data", n_train=3, n_val=1)
    (data / "train" / "circle").rename(data / "train" / "cir\ncle")
    with pytest.raises(graft.DatasetError, match="control character"):
        graft.train(data, out=str(tmp_path / "run"), workers=0)


def test_model_card_escapes_hostile_class_names():
    from graft.models.modelfile import ModelMeta
    from graft.outputs.card import model_card

    hostile = "<img src=x onerror=alert(2)>"
    meta = ModelMeta(
        backbone="efficientnet_lite0",
        classes=[hostile, "a|b"],
        preprocess=PreprocessSpec(224, (0.5,) * 3, (0.5,) * 3),
        class_counts={"train": {hostile: 3, "a|b": 4}},
        val={
            "accuracy": 0.5,
            "accuracy_ci95": [0.1, 0.9],
            "n": 4,
            "balanced_accuracy": 0.5,
            "per_class": {
                hostile: {"precision": 1.0, "recall": 0.5, "support": 2},
                "a|b": {"precision": 0.5, "recall": 1.0, "support": 2},
            },
        },
    )
    card = model_card(meta, "run")
    assert "<img" not in card and "&lt;img src=x onerror=alert\\(2\\)&gt;" in card
    assert "| a\\|b | 4 |" in card  # the pipe no longer splits the table's cell


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((0, 0, 3), np.uint8), "holds no pixels"),
        (np.zeros((32, 32, 3), np.float32), "an array of dtype float32 is not an 8-bit image"),
    ],
)
def test_odd_arrays_get_one_clear_error(trained_run, images, message):
    with pytest.raises(ImageError, match=message):
        graft.load(trained_run.run_dir).predict(images)


@pytest.mark.parametrize("top_k", [0, -1, 1.5])
def test_top_k_below_one_is_refused_in_python_too(trained_run, shapes_dir, top_k):
    image = next((shapes_dir / "val" / "circle").iterdir())
    with pytest.raises(graft.ConfigError, match="top_k must be a whole number of 1 or more"):
        graft.load(trained_run.run_dir).predict(image, top_k=top_k)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "{data}", "--device", "mps"], "device 'mps' was asked for but this machine"),
        (["export", "{run}", "--opset", "99"], "opset 99 is not supported: choose 18 to"),
        (["export", "{run}", "--out", "{tmp}"], "is a folder: name the file"),
        (["export", "{run}", "--out", "{tmp}/no/such/m.onnx"], "does not exist; create it first"),
        (["predict", "{run}", "{image}", "--json", "--csv"], "--json and --csv each choose"),
    ],
)
def test_careless_commands_end_in_one_line(trained_run, shapes_dir, tmp_path, args, message):
    image = next((shapes_dir / "val" / "circle").iterdir())
    if args[:2] == ["train", "{data}"] and _has_mps():
        pytest.skip("this machine has MPS")
    fill = {"{data}": shapes_dir, "{run}": trained_run.run_dir, "{tmp}": tmp_path, "{image}": image}
    filled = [str(fill.get(a, a)).replace("{tmp}", str(tmp_path)) for a in args]
    r = graft_cli(*filled, *(["--out", tmp_path / "r"] if args[0] == "train" else []))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.onnx"))


def _has_mps() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
