"""Labels from a table: Hugging Face's metadata.csv and Kaggle's train.csv read as they are, every
bad table refused in one line naming the line and the fix."""

from __future__ import annotations

import shutil

import pytest

from graft.core.config import make_config
from graft.core.errors import ConfigError, DatasetError
from graft.data.discovery import discover
from graft.data.splits import load_split, write_split
from tests.conftest import SHAPES, make_shapes


@pytest.fixture
def flat(tmp_path):
    """tmp/flat/<shape>/NNN.png, 9 per class."""
    return make_shapes(tmp_path / "flat", n_train=6, n_val=3, flat=True)


def _write(path, lines, encoding="utf-8"):
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def _hf_table(root, sep=","):
    rows = [f"{c}/{i:03d}.png{sep}{c}" for c in SHAPES for i in range(9)]
    return _write(root / "metadata.csv", [f"file_name{sep}label", *rows])


def test_a_hugging_face_metadata_csv_gives_the_split_of_the_class_folders(flat):
    table = discover(flat, labels=_hf_table(flat))
    folders = discover(flat)
    assert table.classes == folders.classes
    assert (table.train, table.val) == (folders.train, folders.val)
    assert table.layout == "flat"
    assert table.labels["path_column"] == "file_name" and table.labels["label_column"] == "label"
    assert len(table.labels["sha256"]) == 64


def test_kaggle_ids_without_extension_in_a_flat_folder_separated_by_semicolons(flat, tmp_path):
    images = tmp_path / "train"
    images.mkdir()
    lines = ["ID ; Label "]  # names matched ignoring case and spaces
    for c in SHAPES:
        for i in range(9):
            shutil.copy(flat / c / f"{i:03d}.png", images / f"{c}-{i}.png")
            lines.append(f"{c}-{i};{c}")
    split = discover(images, labels=_write(tmp_path / "train.csv", lines))
    assert split.classes == list(SHAPES)
    assert len(split.train) + len(split.val) == 27
    assert {p.split("/")[-1] for p, _ in split.val} and all(
        p.startswith(str(images)) for p, _ in split.train
    )


def test_a_split_column_is_the_split_and_is_recorded_with_the_table(flat, tmp_path):
    lines = ["file_name,label,split"]
    for c in SHAPES:
        lines += [
            f"{c}/{i:03d}.png,{c},{'train' if i < 5 else 'validation' if i < 7 else 'test'}"
            for i in range(9)
        ]
    split = discover(flat, labels=_write(tmp_path / "t.csv", lines))
    assert (len(split.train), len(split.val), len(split.test)) == (15, 6, 6)
    assert split.layout == "split"
    write_split(split, tmp_path / "run")
    again = load_split(tmp_path / "run")
    assert again.labels == split.labels and again.test == split.test


def test_repeated_rows_count_once_and_unlisted_images_are_not_used(flat, tmp_path):
    lines = ["file_name,label"] + [f"{c}/{i:03d}.png,{c}" for c in SHAPES for i in range(4)]
    lines.append("circle/000.png,circle")
    split = discover(flat, labels=_write(tmp_path / "t.csv", lines))
    assert len(split.train) + len(split.val) == 12


def test_columns_named_by_option(flat, tmp_path):
    lines = ["pic,kind"] + [f"{c}/{i:03d}.png,{c}" for c in SHAPES for i in range(9)]
    t = _write(tmp_path / "t.csv", lines)
    with pytest.raises(DatasetError, match=r"no file column \(looked for file_name.*name the one"):
        discover(flat, labels=t)
    split = discover(flat, labels=t, path_column="pic", label_column="kind")
    assert split.labels["path_column"] == "pic"
    with pytest.raises(ConfigError, match=r"has no column 'knd' \(did you mean: kind\?\)"):
        discover(flat, labels=t, path_column="pic", label_column="knd")


def test_path_column_without_a_table_is_refused():
    with pytest.raises(ConfigError, match="--path-column names a column of a labels table"):
        make_config("data", path_column="file")


BAD = [
    (
        ["file_name,label", "circle/000.png,circle", "nope/1.png,circle"],
        r"t.csv: 1 row\(s\) name no image under .*, the first at line 3: 'nope/1.png' \(no such",
    ),
    (["file_name,label", "../x.png,circle"], r"t.csv line 2: '../x.png' leads out of the data"),
    (["file_name,label", "/etc/passwd,circle"], r"t.csv line 2: '/etc/passwd' is an absolute"),
    (
        ["file_name,label", "circle/000.png,circle", "circle/000.png,square"],
        r"t.csv lines 2 and 3 give 'circle/000.png' two different classes \(circle and square\)",
    ),
    (["file_name,label", "circle/000.png,"], r"t.csv line 2: no class for 'circle/000.png'"),
    (["file_name,label", "circle/000.png,circle,extra"], r"t.csv line 2 has 3 field\(s\)"),
    (["file_name|label", "circle/000.png|circle"], r"t.csv: the first line names one column"),
    (
        ["file_name,label,split", "circle/000.png,circle,dev"],
        r"t.csv line 2: split 'dev' is not train, val \(validation\) or test",
    ),
    (
        ["file_name,label"] + [f"circle/{i:03d}.png,circle" for i in range(3)],
        r"t.csv: only one class \(circle\)",
    ),
    (
        [
            "file_name,label",
            "circle/000.png,circle",
            "square/000.png,square",
            "square/001.png,square",
        ],
        r"t.csv: class\(es\) with a single image: circle",
    ),
    (["file_name,label", "circle/000.png,a/b"], r"t.csv line 2: class name 'a/b' cannot be used"),
    (["file_name,label"], r"t.csv has a header and no rows"),
]


@pytest.mark.parametrize("lines,message", BAD)
def test_a_bad_table_is_refused_in_one_line(flat, tmp_path, lines, message):
    with pytest.raises((DatasetError, ConfigError), match=message) as err:
        discover(flat, labels=_write(tmp_path / "t.csv", lines))
    assert "\n" not in str(err.value)


def test_a_table_that_is_not_utf8_names_its_line(flat, tmp_path):
    t = _write(tmp_path / "t.csv", ["file_name,label", "circle/000.png,circl\u00e9"], "latin-1")
    with pytest.raises(DatasetError, match=r"t.csv line 2 is not UTF-8 text \(byte 36\): save"):
        discover(flat, labels=t)


def test_an_id_matching_two_images_asks_for_the_extension(flat, tmp_path):
    shutil.copy(flat / "circle" / "000.png", flat / "circle" / "000.jpg")
    t = _write(tmp_path / "t.csv", ["id,label", "circle/000,circle"])
    with pytest.raises(DatasetError, match=r"'circle/000' matches 2 images .*give the file's ext"):
        discover(flat, labels=t)


def test_a_split_without_every_class_in_train_is_refused(flat, tmp_path):
    lines = ["file_name,label,split"] + [f"circle/{i:03d}.png,circle,train" for i in range(3)]
    lines += [f"square/{i:03d}.png,square,val" for i in range(3)]
    with pytest.raises(DatasetError, match=r"the train rows have no image of class\(es\) square"):
        discover(flat, labels=_write(tmp_path / "t.csv", lines))


def test_a_dotted_id_finds_its_image(flat, tmp_path):
    images = tmp_path / "dotted"
    images.mkdir()
    lines = ["id,label"]
    for c in SHAPES:
        for i in range(3):
            shutil.copy(flat / c / f"{i:03d}.png", images / f"{c}.{i:03d}.png")
            lines.append(f"{c}.{i:03d},{c}")
    split = discover(images, labels=_write(tmp_path / "t.csv", lines))
    assert len(split.train) + len(split.val) == 9
