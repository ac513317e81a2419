"""`graft datasets fetch`: download, checksum and unpack, against a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from functools import partial

import pytest
from PIL import Image

from graft.core.errors import DatasetError
from graft.data.fetch import fetch_dataset


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 0)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 (an ephemeral port) for the test's duration."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_unpacks_and_reports_checksum(server, tmp_path):
    www, base = server
    members = {
        f"hymenoptera_data/{s}/{c}/{i}.png": _png()
        for s in ("train", "val")
        for c in ("ants", "bees")
        for i in range(2)
    }
    data = _zip_bytes(members)
    (www / "h.zip").write_bytes(data)
    seen = []
    got = fetch_dataset(
        "hymenoptera",
        tmp_path / "data",
        url=f"{base}/h.zip",
        sha256=hashlib.sha256(data).hexdigest(),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert got.path == tmp_path / "data" / "hymenoptera_data"
    assert got.sha256 == hashlib.sha256(data).hexdigest() and got.bytes == len(data)
    assert sorted(p.name for p in (got.path / "train").iterdir()) == ["ants", "bees"]
    assert seen[-1] == (len(data), len(data))
    assert not list((tmp_path / "data").glob(".graft-fetch-*"))


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    www, base = server
    (www / "h.zip").write_bytes(_zip_bytes({"hymenoptera_data/train/a/1.png": _png()}))
    with pytest.raises(DatasetError, match="checksum mismatch"):
        fetch_dataset("hymenoptera", tmp_path / "d", url=f"{base}/h.zip", sha256="00" * 32)
    assert list((tmp_path / "d").iterdir()) == []


def test_zip_slip_and_bad_zip_and_404(server, tmp_path):
    www, base = server
    (www / "evil.zip").write_bytes(_zip_bytes({"../../escaped.txt": b"x"}))
    with pytest.raises(DatasetError, match="would unpack outside"):
        fetch_dataset("hymenoptera", tmp_path / "d", url=f"{base}/evil.zip")
    assert not (tmp_path / "escaped.txt").exists()
    (www / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a valid zip file"):
        fetch_dataset("hymenoptera", tmp_path / "d", url=f"{base}/bad.zip")
    with pytest.raises(DatasetError, match="cannot download .*404"):
        fetch_dataset("hymenoptera", tmp_path / "d", url=f"{base}/missing.zip")
    with pytest.raises(DatasetError, match="did you mean: hymenoptera"):
        fetch_dataset("hymenopter", tmp_path / "d")
