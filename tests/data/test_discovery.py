"""Data discovery, splitting and robust image loading: one test per oddity."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graft.core.constants import MAX_PIXELS
from graft.core.errors import DatasetError, ImageError
from graft.data.discovery import discover, find_images, verify
from graft.data.images import load_image
from graft.data.transforms import PreprocessSpec, build_transforms

from ..conftest import make_shapes


def _pixel(im: Image.Image, xy=(0, 0)) -> tuple:
    return im.convert("RGB").getpixel(xy)


# ---------------------------------------------------------------- pixel formats


def test_rgba_red_shape_on_transparent_loads_red_on_white(tmp_path):
    im = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (5, 5, 15, 15))
    im.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((10, 10)) == (255, 0, 0)


def test_la_and_palette_transparency_composited_on_white(tmp_path):
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    assert _pixel(load_image(tmp_path / "la.png")) == (255, 255, 255)
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((4, 4), 1)
    p.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((4, 4)) == (255, 0, 0)


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # red in CMYK
    r, g, b = _pixel(load_image(tmp_path / "c.jpg"), (8, 8))
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_saturated(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(arr).save(tmp_path / "g16.png")
    value = _pixel(load_image(tmp_path / "g16.png"))[0]
    assert 120 <= value <= 135, value  # not 255


def test_1bit_and_grayscale(tmp_path):
    Image.new("1", (8, 8), 1).save(tmp_path / "b.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    assert _pixel(load_image(tmp_path / "b.png")) == (255, 255, 255)
    assert _pixel(load_image(tmp_path / "l.png")) == (77, 77, 77)


def test_exif_rotation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    r, g, _ = _pixel(load_image(tmp_path / "a.gif"))
    assert r > 200 and g < 50


def test_extreme_aspect_ratio_stays_small(tmp_path):
    Image.new("L", (10000, 1), 0).save(tmp_path / "thin.png")
    im = load_image(tmp_path / "thin.png")
    assert max(im.size) / min(im.size) <= 10
    spec = PreprocessSpec(224, (0.5,) * 3, (0.5,) * 3)
    x = build_transforms(spec, train=False)(im)
    assert x.shape == (3, 224, 224)


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header (with a correct CRC) claims another size."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    # the limit is Pillow's own refusal level (2 x its warning level), and an option
    assert MAX_PIXELS == 178_956_970
    (tmp_path / "bomb.png").write_bytes(_png_claiming(15000, 12000))
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "bomb.png")
    assert (
        f"15000x12000 = 180,000,000 pixels is over the limit of {MAX_PIXELS:,} "
        "(decompression-bomb guard); if the image is genuine raise --max-pixels"
    ) in str(err.value)
    (tmp_path / "huge.png").write_bytes(_png_claiming(30000, 30000))  # Pillow would refuse it
    with pytest.raises(ImageError, match="30000x30000 = 900,000,000 pixels is over the limit"):
        load_image(tmp_path / "huge.png")
    with pytest.raises(ImageError, match="is over the limit of 1,000"):
        load_image(tmp_path / "bomb.png", max_pixels=1000)
    # a raised limit lets the header through; this fake PNG then fails as the bytes it is
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(tmp_path / "bomb.png", max_pixels=200_000_000)
    from PIL import Image as PILImage

    assert PILImage.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own setting is left as it was


# ---------------------------------------------------------------- broken files


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("zero.jpg", b"", "empty file (0 bytes)"),
        ("text.png", b"hello, this is not an image\n", "a text file, not an image"),
        ("doc.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "a PDF document, not an image"),
        (
            "noise.jpg",
            bytes(range(7, 255)) * 4,
            "not a recognised image format (wrong extension or corrupt data)",
        ),
    ],
)
def test_unreadable_files_name_the_reason(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / name)
    assert err.value.reason == reason
    assert str(err.value) == f"{tmp_path / name}: {reason}"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_fail(tmp_path, fmt):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    path = tmp_path / f"t.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert err.value.reason.startswith("cannot decode:")


def test_missing_file_and_folder_named_like_image(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageError, match="is a folder, not an image"):
        load_image(tmp_path / "dir.png")


# ---------------------------------------------------------------- layouts


def test_split_layout_counts(tmp_path):
    make_shapes(tmp_path, n_train=4, n_val=2)
    split = discover(tmp_path)
    assert split.classes == ["circle", "square", "triangle"]
    assert len(split.train) == 12 and len(split.val) == 6 and split.layout == "split"


def test_flat_layout_split_is_stratified_and_deterministic(tmp_path):
    make_shapes(tmp_path, n_train=8, n_val=2, flat=True)
    a = discover(tmp_path, val_fraction=0.2, seed=3)
    b = discover(tmp_path, val_fraction=0.2, seed=3)
    c = discover(tmp_path, val_fraction=0.2, seed=4)
    assert a.layout == "flat" and a.train == b.train and a.val == b.val
    assert a.val != c.val
    assert [sum(1 for _, y in a.val if y == k) for k in range(3)] == [2, 2, 2]


def test_hidden_files_and_folders_are_never_data(tmp_path):
    make_shapes(tmp_path, n_train=2, n_val=1)
    (tmp_path / "train" / "circle" / ".DS_Store").write_bytes(b"\0\0")
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "circle" / "._000.png")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / ".ipynb_checkpoints" / "x.png")
    split = discover(tmp_path)
    assert split.classes == ["circle", "square", "triangle"]
    assert len(split.train) == 6


def test_images_in_subfolders_belong_to_the_class(tmp_path):
    make_shapes(tmp_path, n_train=2, n_val=1)
    (tmp_path / "train" / "circle" / "more" / "deeper").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "circle" / "more" / "deeper" / "x.PNG")
    split = discover(tmp_path)
    assert sum(1 for _, y in split.train if y == 0) == 3


def test_symlink_loops_and_escapes_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    data = tmp_path / "data"
    make_shapes(data, n_train=2, n_val=1)
    os.symlink(data / "train" / "circle", data / "train" / "circle" / "loop")
    os.symlink(outside, data / "train" / "circle" / "escape")
    files = find_images(data / "train" / "circle", data)
    assert len(files) == 2
    assert not any("secret" in f for f in files)


def test_class_mismatch_between_train_and_val(tmp_path):
    make_shapes(tmp_path, n_train=2, n_val=1)
    (tmp_path / "val" / "circle").rename(tmp_path / "val" / "oval")
    with pytest.raises(DatasetError) as err:
        discover(tmp_path)
    assert "missing in val: circle" in str(err.value)
    assert "in val but not in train: oval" in str(err.value)


def test_empty_class_single_class_and_empty_folder(tmp_path):
    make_shapes(tmp_path / "a", n_train=2, n_val=1)
    (tmp_path / "a" / "train" / "hexagon").mkdir()
    with pytest.raises(DatasetError, match="class folder\\(s\\) with no images: hexagon"):
        discover(tmp_path / "a")
    make_shapes(tmp_path / "b", n_train=2, n_val=1, classes=("circle",))
    with pytest.raises(DatasetError, match="only one class \\(circle\\)"):
        discover(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(DatasetError, match="has no class folders"):
        discover(tmp_path / "c")


def test_verify_lists_every_bad_file(tmp_path):
    make_shapes(tmp_path, n_train=2, n_val=1)
    (tmp_path / "train" / "circle" / "zero.png").write_bytes(b"")
    (tmp_path / "val" / "square" / "bad.jpg").write_bytes(b"garbage")
    _, bad, large = verify(tmp_path, workers=2)
    assert large == []
    assert sorted((Path(b.path).name, b.reason) for b in bad) == [
        ("bad.jpg", "a text file, not an image"),
        ("zero.png", "empty file (0 bytes)"),
    ]


def test_a_folder_of_graft_runs_is_never_a_class(tmp_path):
    data = make_shapes(tmp_path / "data", n_train=3, n_val=0, flat=True)
    run = data / "runs" / "20260101-000000-efficientnet_lite0"
    run.mkdir(parents=True)
    (run / "model.json").write_text("{}")
    Image.new("RGB", (8, 8)).save(run / "samples.png")  # a report figure, not a class image
    (data / "circle" / "old-run").mkdir()
    (data / "circle" / "old-run" / "last.json").write_text("{}")
    Image.new("RGB", (8, 8)).save(data / "circle" / "old-run" / "curves.png")
    split = discover(data)
    assert split.classes == ["circle", "square", "triangle"]
    files = [os.path.relpath(p, data) for p, _ in split.train + split.val]
    assert len(files) == 9 and not [f for f in files if "run" in f]


def test_a_flat_class_with_one_image_is_a_clear_error(tmp_path):
    data = make_shapes(tmp_path / "data", n_train=1, n_val=0, flat=True)
    with pytest.raises(DatasetError, match="class\\(es\\) with a single image: circle, square"):
        discover(data)
