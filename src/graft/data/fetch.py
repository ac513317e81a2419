"""Public datasets graft can fetch: download with a progress callback, verify, unpack safely."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import DatasetError, did_you_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteDataset:
    url: str
    folder: str  # the folder the archive unpacks to
    sha256: str | None  # None: not published; the digest is computed and reported instead
    description: str


KNOWN = {
    "hymenoptera": RemoteDataset(
        "https://download.pytorch.org/tutorial/hymenoptera_data.zip",
        "hymenoptera_data",
        None,
        "ants vs bees from the PyTorch transfer-learning tutorial (about 120 train + 75 val each)",
    )
}


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    bytes: int


def fetch_dataset(
    name: str,
    dest: str | Path = "data",
    url: str | None = None,
    sha256: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> Fetched:
    """Download a known dataset's zip into `dest` and unpack it; return where it is.

    The zip is checked (expected sha256 when known or given, CRC of every member) and unpacked
    into a temporary folder first, so a failed fetch leaves nothing half-written.
    """
    if name not in KNOWN:
        raise DatasetError(
            f"unknown dataset {name!r}{did_you_mean(name, KNOWN)}; known: {', '.join(KNOWN)}"
        )
    info = KNOWN[name]
    dest = Path(dest)
    target = dest / info.folder
    if target.exists():
        raise DatasetError(f"{target} exists already; remove it or choose another folder")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".graft-fetch-") as tmp:
        archive = Path(tmp) / "download.zip"
        digest, size = _download(url or info.url, archive, progress)
        expected = sha256 or info.sha256
        if expected and digest != expected.lower():
            raise DatasetError(
                f"checksum mismatch for {url or info.url}: got sha256 {digest}, "
                f"expected {expected}; the download is damaged or was altered"
            )
        _unzip(archive, Path(tmp) / "out")
        unpacked = Path(tmp) / "out" / info.folder
        if not unpacked.is_dir():
            raise DatasetError(f"the archive from {url or info.url} has no {info.folder}/ folder")
        shutil.move(str(unpacked), target)
    return Fetched(target, digest, size)


def _download(url: str, path: Path, progress) -> tuple[str, int]:
    h, done = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(path, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            while chunk := resp.read(1 << 16):
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except OSError as exc:  # URLError, HTTPError, timeouts, connection resets
        raise DatasetError(
            f"cannot download {url}: {exc}; check the network, or download the "
            "zip by hand and unpack it"
        ) from exc
    return h.hexdigest(), done


def _unzip(archive: Path, out: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DatasetError(f"the downloaded zip is damaged (member {bad} fails its CRC)")
            root = out.resolve()
            for member in zf.namelist():
                dest = (out / member).resolve()
                if not str(dest).startswith(str(root)):  # zip-slip: ../ in member names
                    raise DatasetError(f"the zip member {member!r} would unpack outside {out}")
            zf.extractall(out)
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"the download is not a valid zip file: {exc}") from exc
