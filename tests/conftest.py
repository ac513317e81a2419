"""Shared fixtures: tiny generated image datasets and an isolated feature cache."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    """A random-coloured shape at a random place on a random light background."""
    bg = tuple(rng.randint(180, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 120) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return im


def make_shapes(
    root: Path, n_train: int = 16, n_val: int = 8, seed: int = 0, classes=SHAPES, flat: bool = False
) -> Path:
    """root/train/<shape>/*.png and root/val/<shape>/*.png (or root/<shape>/ when flat)."""
    rng = random.Random(seed)
    splits = {"": n_train + n_val} if flat else {"train": n_train, "val": n_val}
    for split, n in splits.items():
        for shape in classes:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_shape(shape, rng).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def chrome(tmp_path):
    """A headless Debian Chromium driven by selenium (skips where it is not installed), with the
    flags this closed network needs: nothing in the background tries to reach the internet."""
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (CI installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """One feature cache per test session, never the user's ~/.cache."""
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "feature-cache"))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def trained_run(shapes_dir, tmp_path_factory):
    """One extract run on the shapes, shared by tests that only read it."""
    import graft

    out = tmp_path_factory.mktemp("run") / "shapes"
    cache = tmp_path_factory.getbasetemp() / "feature-cache"
    return graft.train(
        shapes_dir, out=str(out), cache_dir=str(cache), workers=0, seed=0, report=False
    )
