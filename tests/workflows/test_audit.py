"""`graft audit`: planted problems found (wrong labels, a duplicate under two classes, a val copy of
a training image, a blank picture, an unreadable file, an outlier), the fixes file, the corrected
copy, every bad fixes line refused by name, and the data folder never touched."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graft.core.constants import AUDIT_BACKBONE
from graft.core.errors import ConfigError, DatasetError
from graft.workflows.audit import apply_fixes, audit

from ..conftest import make_shapes


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = make_shapes(tmp_path_factory.mktemp("audit") / "data", n_train=20, n_val=8)
    tr = root / "train"
    # two triangles filed as circles
    for i in (0, 1):
        shutil.move(tr / "triangle" / f"{i:03d}.png", tr / "circle" / f"wrong{i}.png")
    # the same square again, resized, under "triangle": a conflict
    Image.open(tr / "square" / "005.png").resize((96, 96)).save(tr / "triangle" / "dup.png")
    # a training circle copied into val: leakage
    shutil.copy(tr / "circle" / "004.png", root / "val" / "circle" / "leak.png")
    Image.new("RGB", (64, 64), (200, 200, 200)).save(tr / "square" / "blank.png")
    (tr / "square" / "broken.png").write_bytes(b"not a png at all")
    checker = (np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)
    Image.fromarray(checker).convert("RGB").save(tr / "circle" / "checker.png")
    before = _snapshot(root)
    out = tmp_path_factory.mktemp("audit-out") / "audit"
    result = audit(root, out, cache_dir=tmp_path_factory.getbasetemp() / "feature-cache")
    return root, out, result, before


def _found(result, kind, **match):
    return [
        i
        for i in result.issues
        if i["kind"] == kind and all(i.get(k) == v for k, v in match.items())
    ]


def test_planted_problems_are_found(planted):
    root, out, result, before = planted
    tr = str(root / "train")
    labels = {Path(i["paths"][0]).name: i for i in _found(result, "label")}
    for name in ("wrong0.png", "wrong1.png"):
        assert labels[name]["given"] == "circle" and labels[name]["suggested"] == "triangle"
    conflict = _found(result, "duplicate", subkind="conflict")
    assert [sorted(Path(p).name for p in i["paths"]) for i in conflict] == [["005.png", "dup.png"]]
    leak = _found(result, "duplicate", subkind="leak")
    assert any(
        set(i["paths"]) == {f"{tr}/circle/004.png", f"{root}/val/circle/leak.png"} for i in leak
    )
    assert _found(result, "file", subkind="blank")[0]["paths"] == [f"{tr}/square/blank.png"]
    assert _found(result, "unreadable")[0]["paths"] == [f"{tr}/square/broken.png"]
    outliers = [Path(i["paths"][0]).name for i in _found(result, "outlier")]
    assert "checker.png" in outliers
    # the folder was only read: every byte and every modification time as before
    assert _snapshot(root) == before


def test_written_files(planted):
    root, out, result, _ = planted
    assert sorted(p.name for p in out.iterdir()) == ["audit.html", "audit.json", "fixes.csv"]
    doc = json.loads((out / "audit.json").read_text())
    assert doc["images"] == result.images == 89 and doc["classes"] == [
        "circle",
        "square",
        "triangle",
    ]
    assert doc["by_kind"] == result.by_kind() and len(doc["issues"]) == len(result.issues)
    assert doc["backbone"] == AUDIT_BACKBONE  # the labels judged on the three embedded networks
    rows = {r["path"]: r for r in csv.DictReader(open(out / "fixes.csv", encoding="utf-8"))}
    assert rows["train/circle/wrong0.png"]["action"] == "relabel"
    assert rows["train/circle/wrong0.png"]["to"] == "triangle"
    assert rows["val/circle/leak.png"]["action"] == "drop"  # the val copy, not the training one
    assert rows["train/square/broken.png"]["action"] == "drop"
    assert rows["train/circle/checker.png"]["action"] in ("keep", "relabel")
    assert rows["train/triangle/dup.png"]["action"] in ("keep", "relabel")  # a person decides
    page = (out / "audit.html").read_text()
    assert (
        "Label issues" in page and "Near-duplicates" in page and "data:image/jpeg;base64," in page
    )
    assert "http://" not in page and "https://" not in page


def test_apply_builds_a_corrected_copy(planted, tmp_path):
    root, out, _, before = planted
    new = tmp_path / "fixed"
    counts = apply_fixes(root, out / "fixes.csv", new)
    assert (new / "train" / "triangle" / "wrong0.png").is_file()
    assert not (new / "train" / "circle" / "wrong0.png").exists()
    assert not (new / "val" / "circle" / "leak.png").exists()
    assert not (new / "train" / "square" / "broken.png").exists()
    written = sum(1 for p in new.rglob("*.png"))
    assert counts["written"] == written and counts["dropped"] >= 3 and counts["relabelled"] >= 2
    assert _snapshot(root) == before


@pytest.mark.parametrize(
    "line, error, message",
    [
        (
            "../outside.png,drop,",
            ConfigError,
            "fixes.csv line 2: '../outside.png' is outside the data folder",
        ),
        (
            "train/circle/gone.png,drop,",
            DatasetError,
            "fixes.csv line 2: 'train/circle/gone.png' is not an image of",
        ),
        (
            "train/circle/000.png,relabel,hexagon",
            ConfigError,
            "line 2: relabel to 'hexagon', which is not a class; the classes are circle, square, "
            "triangle",
        ),
        (
            "train/circle/000.png,burn,",
            ConfigError,
            "line 2: action 'burn' is not one of relabel, drop, keep",
        ),
    ],
)
def test_bad_fixes_lines_are_refused_by_line(planted, tmp_path, line, error, message):
    root, _, _, before = planted
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,to\n" + line + "\n")
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_fixes(root, fixes, tmp_path / "new")
    assert not (tmp_path / "new").exists() and _snapshot(root) == before


def test_the_copy_never_goes_inside_the_data_or_over_files(planted, tmp_path):
    root, out, _, _ = planted
    with pytest.raises(ConfigError, match="is inside the data folder"):
        apply_fixes(root, out / "fixes.csv", root / "fixed")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        apply_fixes(root, out / "fixes.csv", tmp_path / "full")
    with pytest.raises(ConfigError, match="is inside the data folder"):
        audit(root, root / "audit")


def test_one_backbone_judges_alone_and_a_repeated_one_is_refused(
    planted, tmp_path, tmp_path_factory
):
    root, _, result, before = planted
    cache = tmp_path_factory.getbasetemp() / "feature-cache"  # lite0's, from the default audit
    alone = audit(root, tmp_path / "a", backbone="efficientnet_lite0", cache_dir=cache)
    names = {Path(i["paths"][0]).name: i["suggested"] for i in _found(alone, "label")}
    assert names["wrong0.png"] == names["wrong1.png"] == "triangle"
    assert _found(alone, "duplicate") == _found(result, "duplicate")  # lite0's, as by default
    assert json.loads((tmp_path / "a" / "audit.json").read_text())["backbone"] == (
        "efficientnet_lite0"
    )
    with pytest.raises(ConfigError, match="one backbone, or different ones joined by '\\+'"):
        audit(root, tmp_path / "b", backbone="efficientnet_lite0+efficientnet_lite0")
    assert _snapshot(root) == before


def test_one_class_folder_is_one_line(tmp_path):
    make_shapes(tmp_path / "one", classes=("circle",), flat=True)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "graft",
            "audit",
            str(tmp_path / "one"),
            "--out",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


@pytest.mark.browser
def test_audit_page_in_a_real_browser(planted, chrome):
    _, out, result, _ = planted
    chrome.get((out / "audit.html").resolve().as_uri())
    ids = chrome.execute_script(
        "return Array.from(document.querySelectorAll('section')).map(s => s.id)"
    )
    assert ids[0] == "summary" and ids[-1] == "fixing" and "label" in ids and "duplicate" in ids
    widths = chrome.execute_script(
        "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)"
    )
    shown = sum(len(i["paths"]) for i in result.issues if i["kind"] not in ("balance",))
    assert len(widths) >= min(shown, 10) and sum(w > 0 for w in widths) >= len(widths) - 1


def test_a_folder_labelled_by_a_table_is_audited_and_fixed_through_its_table(planted, tmp_path):
    """The planted folder as a table (every image with its folder's class and split) finds the
    same label issues; --apply writes the copy with the images where they were and a corrected
    metadata.csv that trains as it is."""
    root, out, result, before = planted
    rows = ["file_name,label,split"] + [
        f"{p.relative_to(root).as_posix()},{p.parent.name},{p.parts[len(root.parts)]}"
        for p in sorted(root.rglob("*.png"))
    ]
    table = tmp_path / "metadata.csv"
    table.write_text("\n".join(rows) + "\n")
    again = audit(root, tmp_path / "audit", labels=table)
    assert sorted(map(str, _found(again, "label"))) == sorted(map(str, _found(result, "label")))
    new = tmp_path / "fixed"
    counts = apply_fixes(root, out / "fixes.csv", new, labels=table)
    assert counts == apply_fixes(root, out / "fixes.csv", tmp_path / "folders")
    fixed = (new / "metadata.csv").read_text().splitlines()
    assert fixed[0] == "file_name,label,split" and len(fixed) == 1 + counts["written"]
    assert "train/circle/wrong0.png,triangle,train" in fixed
    assert (new / "train" / "circle" / "wrong0.png").is_file()  # the image stays where it was
    assert not any(r.startswith("val/circle/leak.png") for r in fixed)
    assert _snapshot(root) == before
