"""Images: open any file as an 8-bit RGB picture a network can trust, or say why not.

Decoding, its guards (pixel limit, aspect ratio), the content digest that identifies an image,
and decoding or verifying many files in threads with each failure named.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.constants import MAX_PIXELS
from ..core.errors import ImageError

LARGE_PIXELS = 89_478_485  # `graft verify` notes images over this as large
DECODE_BUDGET = 250_000_000  # pixels being decoded at once across threads (~1 GB of RGBA)
MAX_ASPECT = 10.0  # longer/shorter side beyond this is padded, so resizing cannot explode
MAX_SIDE = 4096  # longer side kept before padding an extreme-aspect image


def shrink_to_side(img: Image.Image, side: int) -> Image.Image:
    """`img` with its shorter side brought down to `side` (bilinear; never enlarged)."""
    w, h = img.size
    scale = side / min(w, h)
    if scale >= 1:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def load_image(
    path: str | Path | bytes,
    min_side: int | None = None,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Open any image as an 8-bit RGB picture a network can trust, or raise `ImageError`.

    EXIF orientation applied; transparency composited on white; grayscale, CMYK, 1-bit, 16-bit
    and float images converted by value range; first frame of animations; extreme aspect ratios
    padded to MAX_ASPECT. `min_side` lets JPEGs decode at a reduced scale that still leaves the
    shorter side >= it; the pixels that will really be decoded are checked against `max_pixels`
    before decoding (decompression bombs), and large decodes wait for memory (DECODE_BUDGET).
    `path` may also be the file's bytes (an upload), reported under `name`.
    """
    data = path if isinstance(path, (bytes, bytearray)) else None
    path = name or ("<upload>" if data is not None else str(path))
    try:
        with _open(io.BytesIO(data) if data is not None else path) as im:
            w, h = im.size
            if w < 1 or h < 1:
                raise ImageError(path, f"image has no pixels ({w}x{h})")
            if min_side and im.format == "JPEG":
                im.draft("RGB", _draft_size(w, h, min_side))  # DCT scaling: 1/2, 1/4 or 1/8
            dw, dh = im.size
            if dw * dh > max_pixels:
                raise ImageError(
                    path,
                    f"{w}x{h} = {w * h:,} pixels is over the limit of "
                    f"{max_pixels:,} (decompression-bomb guard); if the image is "
                    "genuine raise --max-pixels, else downscale it",
                )
            with _DECODING.hold(dw * dh):
                im.load()
                rgb = prepare_image(im)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(path, "file not found (a broken link, or deleted)") from exc
    except PermissionError as exc:
        raise ImageError(path, "permission denied; make the file readable") from exc
    except IsADirectoryError as exc:
        raise ImageError(path, "is a folder, not an image") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(path, _unidentified_reason(path, data)) from exc
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        IndexError,
        TypeError,
        KeyError,
        ZeroDivisionError,
        MemoryError,
        RuntimeError,
    ) as exc:
        # Pillow reports broken data through all of these, depending on the codec.
        raise ImageError(path, f"cannot decode: {exc}") from exc
    return rgb


class _PixelBudget:
    """At most `budget` pixels decoding at once across threads; an image larger than the whole
    budget decodes alone. Keeps peak memory bounded when threads meet several huge images."""

    def __init__(self, budget: int):
        self.budget, self.in_use = budget, 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: self.in_use == 0 or self.in_use + pixels <= self.budget)
            self.in_use += pixels
        try:
            yield
        finally:
            with self.cond:
                self.in_use -= pixels
                self.cond.notify_all()


_DECODING = _PixelBudget(DECODE_BUDGET)
_LIFT_LOCK = threading.Lock()
_lifted = [0, None]  # (graft decodes in progress, Pillow's own limit to restore)


@contextlib.contextmanager
def _pillow_guard_lifted() -> Iterator[None]:
    """Pillow refuses to open an image of more than 2 x MAX_IMAGE_PIXELS before graft can
    decode it at reduced scale; while graft opens images, its own check (above) is the guard.
    Pillow's setting is restored once no graft decode is opening a file."""
    with _LIFT_LOCK:
        if _lifted[0] == 0:
            _lifted[1] = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _lifted[0] += 1
    try:
        yield
    finally:
        with _LIFT_LOCK:
            _lifted[0] -= 1
            if _lifted[0] == 0:
                Image.MAX_IMAGE_PIXELS = _lifted[1]


def _open(source: str | io.BytesIO) -> Image.Image:
    """Image.open without Pillow's own size refusal or bomb warning: graft's check on the pixels
    really decoded (load_image) is the guard, and says it better."""
    with _pillow_guard_lifted(), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def prepare_image(im: Image.Image) -> Image.Image:
    """An opened PIL image -> upright 8-bit RGB with transparency on white, aspect limited."""
    return _limit_aspect(_to_rgb(ImageOps.exif_transpose(im)))


def _draft_size(w: int, h: int, min_side: int) -> tuple[int, int]:
    scale = min_side / min(w, h)
    return max(1, int(w * scale)), max(1, int(h * scale))


def _unidentified_reason(path: str, data: bytes | None = None) -> str:
    try:
        size = len(data) if data is not None else os.path.getsize(path)
        if data is not None:
            head = bytes(data[:8])
        else:
            with open(path, "rb") as fh:  # a tiny read, for the message only
                head = fh.read(8)
    except OSError:
        return "not an image file"
    if size == 0:
        return "empty file (0 bytes)"
    if head.startswith(b"%PDF"):
        return "a PDF document, not an image"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file, not an image"
    return "not a recognised image format (wrong extension or corrupt data)"


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im)), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map 16-bit, 32-bit and float pixel values to 0..255 by their type's range, not by clipping
    (clipping is what turns a 16-bit PNG solid white)."""
    a = arr.astype(np.float64)
    if arr.dtype.kind == "f":
        peak = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
    elif arr.dtype.itemsize >= 2 and a.size and a.max() > 255:
        peak = 65535.0
    elif arr.dtype.itemsize >= 2:
        # 16-bit container holding small values: still a 16-bit image (dark, not white).
        peak = 65535.0 if arr.dtype.itemsize == 2 else 255.0
    else:
        peak = 255.0
    return np.clip(np.nan_to_num(a) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)


def _limit_aspect(im: Image.Image) -> Image.Image:
    """Pad an image thinner than 1:MAX_ASPECT with white so that resizing its shorter side to 256
    cannot produce a 2,560,000-pixel-long tensor; shrink its longer side to MAX_SIDE first."""
    w, h = im.size
    if max(w, h) / min(w, h) <= MAX_ASPECT:
        return im
    if max(w, h) > MAX_SIDE:
        s = MAX_SIDE / max(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
        w, h = im.size
    tw = max(w, int(np.ceil(h / MAX_ASPECT)))
    th = max(h, int(np.ceil(w / MAX_ASPECT)))
    canvas = Image.new("RGB", (tw, th), (255, 255, 255))
    canvas.paste(im, ((tw - w) // 2, (th - h) // 2))
    return canvas


def file_digest(path: str) -> str:
    """sha256 of a file's bytes: the identity of an image for caching and duplicate checks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- many files


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str


def decode_files(
    paths: Sequence[str], fn: Callable[[str], Any], workers: int = 4
) -> tuple[list[Any], list[BadFile]]:
    """`fn(path)` for every path in threads (Pillow decodes without the GIL): the results (None
    where `fn` raised ImageError) and the failures with their reasons, both in input order."""

    def one(p: str) -> tuple[Any, str | None]:
        try:
            return fn(p), None
        except ImageError as exc:
            return None, exc.reason

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, paths))
    bad = [BadFile(p, why) for p, (_, why) in zip(paths, results) if why is not None]
    return [r for r, _ in results], bad


def verify_files(
    paths: Sequence[str], workers: int = 4, max_pixels: int = MAX_PIXELS, min_side: int = 256
) -> tuple[list[BadFile], list[BadFile]]:
    """Decode every file; return (unusable files, large files that load downscaled), in input
    order, each with its reason. JPEGs are read through at reduced scale (`min_side`), as
    training reads them: the whole stream is decoded, so truncation still shows."""

    def check(p: str) -> str | None:  # decode and drop: verifying must not hold every image
        load_image(p, min_side, max_pixels=max_pixels)
        return _large_note(p)

    notes, bad = decode_files(paths, check, workers)
    large = [BadFile(p, note) for p, note in zip(paths, notes) if note]
    return bad, large


def _large_note(path: str) -> str | None:
    with _open(path) as im:  # the header only: size and format
        w, h, fmt = *im.size, im.format
    if w * h <= LARGE_PIXELS:
        return None
    how = "decoded at reduced scale" if fmt == "JPEG" else "decoded in full, one at a time"
    return f"large ({w}x{h} = {w * h:,} pixels), will be downscaled ({how})"


def format_bad_files(bad: Sequence[BadFile], limit: int = 20) -> str:
    lines = [f"  {b.path}: {b.reason}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)
