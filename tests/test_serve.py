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
    assert client.get("/health").json() == {
        "status": "ok",
        "backbone": "efficientnet_lite0",
        "classes": 3,
    }
    assert client.get("/classes").json() == ["circle", "square", "triangle"]
    good = (shapes_dir / "val" / "square" / "000.png").read_bytes()
    big = io.BytesIO()
    Image.new("RGB", (600, 600)).save(big, "BMP")  # about 1 MB: over this app's limit
    r = client.post(
        "/predict",
        data={"top_k": "2"},
        files=[
            ("files", ("square.png", good, "image/png")),
            ("files", ("notes.jpg", b"hello world", "image/jpeg")),
            ("files", ("huge.bmp", big.getvalue(), "image/bmp")),
        ],
    )
    assert r.status_code == 200
    square, notes, huge = r.json()
    assert square["filename"] == "square.png" and square["error"] is None
    assert list(square["probabilities"])[0] == "square" and len(square["probabilities"]) == 2
    expected = trained_run.load().predict([shapes_dir / "val" / "square" / "000.png"], top_k=2)
    assert square["probabilities"] == pytest.approx(expected[0])
    assert notes == {
        "filename": "notes.jpg",
        "probabilities": None,
        "error": "a text file, not an image",
    }
    assert huge["probabilities"] is None and huge["error"] == "larger than 50,000 bytes"


def test_too_many_files_in_one_request_are_refused(trained_run, shapes_dir):
    client = TestClient(create_app(trained_run.run_dir, device="cpu", max_files=2))
    good = (shapes_dir / "val" / "square" / "000.png").read_bytes()
    r = client.post(
        "/predict", files=[("files", (f"{i}.png", good, "image/png")) for i in range(3)]
    )
    assert r.status_code == 413 and "at most 2" in r.json()["detail"]
    assert client.get("/health").status_code == 200


def test_health_answers_while_a_prediction_runs(trained_run, shapes_dir, monkeypatch):
    """The model runs off the event loop: /health returns while a slow predict is in flight."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from graft.predict import Classifier

    slow, real = threading.Event(), Classifier.predict_files

    def predict_slowly(self, *a, **k):
        slow.set()
        time.sleep(3)
        return real(self, *a, **k)

    monkeypatch.setattr(Classifier, "predict_files", predict_slowly)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(trained_run.run_dir, device="cpu"),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        good = (shapes_dir / "val" / "square" / "000.png").read_bytes()
        done = {}
        post = threading.Thread(
            target=lambda: done.setdefault(
                "r",
                httpx.post(
                    f"{base}/predict", files=[("files", ("a.png", good, "image/png"))], timeout=30
                ),
            )
        )
        post.start()
        assert slow.wait(10)
        health = httpx.get(f"{base}/health", timeout=2)
        assert health.status_code == 200 and post.is_alive()  # answered during the prediction
        post.join(30)
        assert done["r"].status_code == 200 and done["r"].json()[0]["error"] is None
    finally:
        server.should_exit = True
        thread.join(10)
