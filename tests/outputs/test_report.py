"""The report: every file written and consistent with metrics.csv and evaluate; the page is
self-contained and renders in a real browser; explanations point at what decides the class."""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import graft
from graft.outputs.report import FIGURES

SECTIONS = (
    "how-good",
    "summary",
    "curves",
    "confusion",
    "per-class",
    "samples",
    "predictions",
    "top-losses",
    "calibration",
    "decisions",
    "most-confused",
    "explanations",
)


@pytest.fixture(scope="module")
def report_run(trained_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(trained_run.run_dir, run)
    return run, graft.report(run)


def test_every_file_written_at_its_size(report_run):
    run, rep = report_run
    for name in FIGURES:
        with Image.open(run / name) as im:
            im.load()
            assert list(im.size) == rep["figures"][name], name
    assert (run / "report.html").stat().st_size > 10_000
    # a fitted head's val number is unbiased; a best-epoch run says its number flatters
    # (test_report_of_an_epoch_trained_head); --auto runs are checked in test_compare.py
    how = rep["how_good"]
    assert how["how"].startswith("unbiased: the val images took no part in any choice (the head")
    assert how["accuracy"] == rep["evaluation"]["accuracy"] and how["comparison"] is None


def test_report_of_a_fitted_head_draws_its_regularisation_path(report_run):
    run, rep = report_run
    assert rep["history"] == [] and not (run / "metrics.csv").exists()
    path = rep["run"]["best"]["path"]
    assert len(path) == 15 and rep["run"]["best"]["l2"] in [r["l2"] for r in path]
    page = (run / "report.html").read_text()
    assert "fitted by L-BFGS, L2" in page


def test_report_of_an_epoch_trained_head(shapes_dir, tmp_path):
    run = tmp_path / "run"
    graft.train(shapes_dir, out=str(run), head="epochs", epochs=4, workers=0, report=False)
    rep = graft.report(run)
    assert rep["how_good"]["how"].startswith("optimistic: the epoch kept is the one that scored")
    on_disk = json.loads((run / "report.json").read_text())
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in on_disk["history"]] == [float(r["epoch"]) for r in rows]
    assert on_disk["history"][-1]["val_acc"] == pytest.approx(float(rows[-1]["val_acc"]))
    ev = graft.load(run).evaluate(shapes_dir / "val")
    assert on_disk["evaluation"]["confusion_matrix"] == ev["confusion_matrix"]
    assert on_disk["evaluation"]["accuracy"] == pytest.approx(ev["accuracy"])
    best = max(float(r["val_acc"]) for r in rows)
    assert on_disk["run"]["best"]["val_acc"] == pytest.approx(best)


def test_html_is_self_contained(report_run):
    run, _ = report_run
    page = (run / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert "http://" not in page and "https://" not in page
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page
    assert page.count("data:image/png;base64,") == len(FIGURES)


@pytest.mark.browser
def test_report_renders_in_headless_chromium(report_run, tmp_path, chrome):
    run, driver = report_run[0], chrome
    driver.get((run / "report.html").resolve().as_uri())
    widths = driver.execute_script(
        "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)"
    )
    assert len(widths) == len(FIGURES) and all(w > 0 for w in widths), widths
    ids = driver.execute_script(
        "return Array.from(document.querySelectorAll('section')).map(s => s.id)"
    )
    assert tuple(ids) == SECTIONS
    driver.save_screenshot(str(tmp_path / "report.png"))


# ---------------------------------------------------------------- explanations mean something


def _patch_dataset(root: Path, n_train: int, n_test: int) -> None:
    """Noise background; the class is the colour of one small square at a random place."""
    rng = random.Random(0)
    colours = {"red": (230, 20, 20), "blue": (20, 40, 230)}
    for split, n in (("train", n_train), ("val", n_test)):
        for name, colour in colours.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.random.default_rng(rng.randrange(2**31)).integers(
                    90, 170, (224, 224, 3), dtype=np.uint8
                )
                s = 56
                # inside the eval view: the center crop drops 14px of each border
                x0, y0 = rng.randrange(16, 208 - s), rng.randrange(16, 208 - s)
                arr[y0 : y0 + s, x0 : x0 + s] = colour
                path = root / split / name / f"{i:03d}.png"
                Image.fromarray(arr).save(path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "shap"])
def test_attribution_concentrates_on_the_deciding_patch(tmp_path_factory, method):
    root = tmp_path_factory.getbasetemp() / "patches"
    if not root.exists():
        _patch_dataset(root, n_train=20, n_test=3)
    run_dir = tmp_path_factory.getbasetemp() / "patch-run"
    if not (run_dir / "model.json").exists():
        graft.train(root, out=str(run_dir), workers=0, report=False)
    clf = graft.load(run_dir)
    ratios = []
    for path in sorted(root.glob("val/*/*.png")):
        x0, y0, x1, y1 = _box_of(path)
        maps = clf.explain(path, method=method, classes=1)
        true = path.parent.name
        assert maps[0].class_name == true
        heat = maps[0].heatmap
        inside = np.zeros_like(heat, dtype=bool)
        inside[max(0, y0) : y1, max(0, x0) : x1] = True
        ratios.append(heat[inside].mean() / max(heat[~inside].mean(), 1e-6))
    # a map blind to the patch gives ratios around 1; the numerics of the CPU move single ratios
    # (1.8-6.8 seen on one machine, all over 2 on another), so the test asks what holds on every
    # image with a wide margin over chance, and a clear concentration on average
    assert min(ratios) > 1.25 and sum(ratios) / len(ratios) >= 2.0, ratios


def _box_of(path: Path) -> tuple[int, int, int, int]:
    """The patch's box in the network's input: found from the pixels themselves, mapped through
    the eval transform (resize 224 -> 256, center crop 224)."""
    arr = np.asarray(Image.open(path))
    colour = arr.reshape(-1, 3)[
        np.argmax(
            (arr.reshape(-1, 3) == [230, 20, 20]).all(1)
            | (arr.reshape(-1, 3) == [20, 40, 230]).all(1)
        )
    ]
    ys, xs = np.nonzero((arr == colour).all(2))
    scale, off = 256 / 224, (256 - 224) // 2
    return (
        int(xs.min() * scale) - off,
        int(ys.min() * scale) - off,
        int((xs.max() + 1) * scale) - off,
        int((ys.max() + 1) * scale) - off,
    )


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "timm:resnet10t"])
def test_gradcam_works_for_other_backbones(name):
    from graft.core.runtime import resolve_runtime
    from graft.inference.classifier import Classifier
    from graft.models.backbones import create_backbone

    bb = create_backbone(name, 3, pretrained=False)
    clf = Classifier(bb, ["a", "b", "c"], resolve_runtime("cpu", "fp32"))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), np.uint8))
    maps = clf.explain(img, method="gradcam", classes=2)
    assert len(maps) == 2 and maps[0].heatmap.shape == (bb.spec.input_size,) * 2
    assert maps[0].probability >= maps[1].probability


def test_model_card_holds_the_real_numbers(trained_run):
    import yaml

    from graft.outputs.card import write_card

    card = write_card(trained_run.run_dir).read_text(encoding="utf-8")
    meta = json.loads((trained_run.run_dir / "model.json").read_text())
    _, header, body = card.split("---\n", 2)
    head = yaml.safe_load(header)
    assert head["library_name"] == "graft" and "efficientnet_lite0" in head["tags"]
    [result] = head["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == round(meta["val"]["accuracy"], 4)
    lo, hi = meta["val"]["accuracy_ci95"]
    assert (
        f"accuracy **{meta['val']['accuracy']:.4f}** (95% Wilson interval {lo:.3f}-{hi:.3f})"
        in body
    )
    for c in ("circle", "square", "triangle"):
        assert f"| {c} | 16 | 8 |" in body  # train and val images per class
    # the decisions: what "unknown" is, and the operating point per class on val
    u = meta["decision"]["unknown"]
    assert (
        f"to the 1st nearest of 48 training images in the network's features, above "
        f"{u['threshold']:.4f}, a level that flags 5% of held-out training images." in body
    )
    assert "| class | target | threshold | precision | recall | review | caught |" in body
    assert re.search(r"^\| circle \| arg-max \| - \| \d\.\d{3} \(", body, re.M)
    assert meta["tta"] == "flip"
    assert "- test-time augmentation: each image is read as it is and mirrored left" in body
    assert not re.search(r"TODO|TBD|XXX|lorem|\{\{", card)


def test_a_tampered_fitted_head_record_still_gives_a_report_and_card(report_run, tmp_path):
    """model.json from elsewhere: the head's L2 as text and a broken path are shown, not fatal."""
    run = tmp_path / "run"
    shutil.copytree(report_run[0], run)
    meta = json.loads((run / "model.json").read_text())
    meta["best"]["l2"] = "<b>lots</b>"
    meta["best"]["path"] = [{"l2": "x"}]
    (run / "model.json").write_text(json.dumps(meta))
    rep = graft.report(run, explain_images=0)
    assert rep["run"]["best"]["l2"] == "<b>lots</b>"
    assert "&lt;b&gt;lots" in (run / "report.html").read_text()
    assert "L2 '<b>lots</b>'" in (run / "README.md").read_text()


def test_the_top_losses_are_marked_with_the_audit_of_the_data(trained_run, tmp_path, monkeypatch):
    """An audit of the run's data folder (./audit by default, or --audit DIR) marks the top losses
    it lists; an audit of another folder at ./audit is left alone; a --audit without one is an
    error naming it."""
    from graft.core.errors import GraftError
    from graft.data.splits import load_split
    from graft.inference.classifier import Prediction
    from graft.outputs.report import build_report

    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    split = load_split(run / "split")
    classes = split.classes

    def wrong_by(y: int, true: float) -> dict[str, float]:
        other = classes[(y + 1) % len(classes)]
        rest = [c for c in classes if c not in (classes[y], other)]
        return {other: 0.9, classes[y]: true, **dict.fromkeys(rest, (0.1 - true) / len(rest))}

    # every val image confidently wrong, the first one most: eight top losses, it among them
    wrong = [
        Prediction(p, wrong_by(y, 0.01 if i == 0 else 0.05), decision="x")
        for i, (p, y) in enumerate(split.val)
    ]
    flagged = split.val[0][0]
    doc = {
        "data_dir": split.root,
        "by_kind": {"label": 1, "outlier": 1},
        "issues": [
            {"kind": "outlier", "paths": [flagged], "given": classes[0], "score": 0.5},
            {
                "kind": "label",
                "paths": [flagged],
                "given": classes[split.val[0][1]],
                "suggested": classes[1],
                "score": 0.25,
            },
        ],
    }
    audit = tmp_path / "work" / "audit"
    audit.mkdir(parents=True)
    (audit / "audit.json").write_text(json.dumps(doc))
    (audit / "audit.html").write_text("<html></html>")
    monkeypatch.chdir(tmp_path / "work")  # ./audit: graft audit's default --out

    r = build_report(run, explain_images=0, val_predictions=wrong)
    marks = {t["path"]: t["audit"] for t in r["top_losses"]}
    assert len(marks) == 8 and marks[flagged] == (
        f"label issue: suggested {classes[1]}, the given class 0.25 out of fold"
    )  # the label issue first, though the outlier came first in the file
    assert sum(m is not None for m in marks.values()) == 1
    assert r["audit"]["by_kind"] == {"label": 1, "outlier": 1}
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "1 of these 8 are in the audit of the data folder" in page
    assert 'href="../work/audit/audit.html"' in page

    doc["data_dir"] = str(tmp_path / "elsewhere")
    (audit / "audit.json").write_text(json.dumps(doc))
    r = build_report(run, explain_images=0, val_predictions=wrong)
    assert r["audit"] is None and all("audit" not in t for t in r["top_losses"])
    assert "graft audit" in (run / "report.html").read_text(encoding="utf-8")  # how to make one
    r = build_report(run, explain_images=0, val_predictions=wrong, audit=audit)  # asked: used
    assert sum(t["audit"] is not None for t in r["top_losses"]) == 1

    with pytest.raises(GraftError, match=r"--audit .*nowhere: no audit.json there"):
        build_report(run, explain_images=0, val_predictions=wrong, audit=tmp_path / "nowhere")
