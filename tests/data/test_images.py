"""Big but honest images: JPEGs decoded at reduced scale, the guard on decoded pixels, large
decodes serialised, and `graft verify` telling large from unusable."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image, ImageDraw

import graft
from graft.data.discovery import verify
from graft.data.images import _PixelBudget, load_image

from ..conftest import make_shapes


def _big(path, size, fmt, **kw):
    im = Image.new("RGB", size, (235, 230, 220))
    d = ImageDraw.Draw(im)
    w, h = size
    d.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(30, 40, 120))
    im.save(path, fmt, **kw)
    return path


@pytest.fixture(scope="module")
def big_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    jpeg = _big(folder / "phone.jpg", (12000, 9000), "JPEG", quality=85)  # 108 MP
    png = _big(folder / "clipart.png", (10000, 10000), "PNG", compress_level=1)  # 100 MP
    return jpeg, png


@pytest.mark.slow
def test_a_108_mp_jpeg_decodes_at_reduced_scale(big_images):
    jpeg, _ = big_images
    assert load_image(jpeg, min_side=256).size == (1500, 1125)  # 1/8 scale, still >= 256
    with pytest.raises(graft.ImageError, match="12000x9000 = 108,000,000 pixels is over"):
        load_image(jpeg, max_pixels=100_000_000)
    assert load_image(jpeg, min_side=256, max_pixels=2_000_000).size == (1500, 1125)


@pytest.mark.slow
def test_big_images_train_without_skip_bad(big_images, tmp_path):
    import shutil

    data = make_shapes(tmp_path / "data", n_train=4, n_val=2)
    jpeg, png = big_images
    shutil.copy(jpeg, data / "train" / "circle" / "phone.jpg")
    shutil.copy(png, data / "train" / "circle" / "clipart.png")
    _, bad, large = verify(data, workers=2)
    assert bad == []
    notes = {b.path.rsplit("/", 1)[-1]: b.reason for b in large}
    assert notes == {
        "phone.jpg": "large (12000x9000 = 108,000,000 pixels), will be downscaled "
        "(decoded at reduced scale)",
        "clipart.png": "large (10000x10000 = 100,000,000 pixels), will be downscaled "
        "(decoded in full, one at a time)",
    }
    run = graft.train(data, out=str(tmp_path / "run"), epochs=2, workers=0, report=False)
    assert run.skipped == [] and len(run.history) == 2


@pytest.mark.parametrize("sizes, most", [((200, 200, 100, 50), 250), ((400, 100, 100), 400)])
def test_large_decodes_wait_for_the_pixel_budget(sizes, most):
    """Never more than the budget decoding at once; an image over it decodes alone."""
    budget = _PixelBudget(250)
    peak, lock = [0], threading.Lock()

    def decode(pixels):
        with budget.hold(pixels):
            with lock:
                peak[0] = max(peak[0], budget.in_use)
            time.sleep(0.05)

    threads = [threading.Thread(target=decode, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= most and budget.in_use == 0
