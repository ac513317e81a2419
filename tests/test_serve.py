"""HTTP serving, in process (no socket): probabilities per upload, bad uploads named."""

from __future__ import annotations

import io

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from graft.serve import create_app  # noqa: E402


def test_predict_over_http(trained_run, shapes_dir):
    client = TestClient(create_app(trained_run.run_dir, device="cpu", max_bytes=50_000))
    assert client.get("/health").json() == {"status": "ok", "backbone": "efficientnet_lite0",
                                            "classes": 3}  # fmt: skip
    assert client.get("/classes").json() == ["circle", "square", "triangle"]
    good = (shapes_dir / "val" / "square" / "000.png").read_bytes()
    big = io.BytesIO()
    Image.new("RGB", (600, 600)).save(big, "BMP")  # about 1 MB: over this app's limit
    r = client.post("/predict", data={"top_k": "2"}, files=[
        ("files", ("square.png", good, "image/png")),
        ("files", ("notes.jpg", b"hello world", "image/jpeg")),
        ("files", ("huge.bmp", big.getvalue(), "image/bmp")),
    ])  # fmt: skip
    assert r.status_code == 200
    square, notes, huge = r.json()
    assert square["filename"] == "square.png" and square["error"] is None
    assert list(square["probabilities"])[0] == "square" and len(square["probabilities"]) == 2
    expected = trained_run.load().predict([shapes_dir / "val" / "square" / "000.png"], top_k=2)
    assert square["probabilities"] == pytest.approx(expected[0])
    assert notes == {"filename": "notes.jpg", "probabilities": None,
                     "error": "a text file, not an image"}  # fmt: skip
    assert huge["probabilities"] is None and huge["error"] == "larger than 50,000 bytes"
