"""HTTP serving, in process (no socket): probabilities per upload, bad uploads named."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import re
import shutil
import socket
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from graft.serve.app import create_app  # noqa: E402


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
    # served by ONNX Runtime on the run's export (engine auto on a CPU): PyTorch's numbers to
    # the export's parity
    assert square["probabilities"] == pytest.approx(expected[0], abs=1e-4)
    assert notes == {
        "filename": "notes.jpg",
        "decision": None,
        "probabilities": None,
        "unknown_score": None,
        "sha256": hashlib.sha256(b"hello world").hexdigest(),
        "error": "a text file, not an image",
    }
    assert square["sha256"] == hashlib.sha256(good).hexdigest()
    # every prediction carries its decision and unknown score, as the Python API gives them
    (want,) = trained_run.load().predict_files([shapes_dir / "val" / "square" / "000.png"])
    assert square["decision"] == want.decision == "square"
    assert square["unknown_score"] == pytest.approx(want.unknown, abs=1e-4)
    assert 0 <= want.unknown < 2
    assert huge["probabilities"] is None and huge["error"] == "larger than 50,000 bytes"


def test_corrections_come_back_as_labels(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    client = TestClient(create_app(run, device="cpu"))
    digest = hashlib.sha256(b"x").hexdigest()
    ok = {"filename": "a,b.png", "sha256": digest, "predicted": "circle", "corrected": "square"}
    assert client.post("/feedback", json=ok).json() == {"saved": True, "corrected": "square"}
    bad = [
        ({**ok, "corrected": "hexagon"}, "corrected must be one of the classes: circle, square"),
        ({**ok, "predicted": "x"}, "predicted must be a class, unknown or review"),
        ({**ok, "sha256": "abc"}, "sha256 must be the upload's 64 hex digits"),
        ({**ok, "filename": "a\nb"}, "filename must be printable text"),
    ]
    for body, message in bad:
        r = client.post("/feedback", json=body)
        assert r.status_code == 422 and r.json()["detail"].startswith(message)
    rows = list(csv.reader(open(run / "feedback.csv", encoding="utf-8")))
    assert rows[0] == ["time", "filename", "sha256", "predicted", "corrected"]
    assert rows[1][1:] == ["a,b.png", digest, "circle", "square"] and len(rows) == 2


def test_too_many_files_in_one_request_are_refused(trained_run, shapes_dir):
    client = TestClient(create_app(trained_run.run_dir, device="cpu", max_files=2))
    good = (shapes_dir / "val" / "square" / "000.png").read_bytes()
    r = client.post(
        "/predict", files=[("files", (f"{i}.png", good, "image/png")) for i in range(3)]
    )
    assert r.status_code == 413 and "at most 2" in r.json()["detail"]
    assert client.get("/health").status_code == 200


@contextlib.contextmanager
def live_server(run_dir):
    """The app on a real socket on 127.0.0.1 (a free port), in a thread; stopped on exit."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        create_app(run_dir, device="cpu"), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_health_answers_while_a_prediction_runs(trained_run, shapes_dir, monkeypatch):
    """The model runs off the event loop: /health returns while a slow predict is in flight."""
    import httpx

    from graft.inference.classifier import Classifier

    slow, real = threading.Event(), Classifier.forward

    def forward_slowly(self, *a, **k):  # the network's pass, in either engine
        slow.set()
        time.sleep(3)
        return real(self, *a, **k)

    monkeypatch.setattr(Classifier, "forward", forward_slowly)
    good = (shapes_dir / "val" / "square" / "000.png").read_bytes()
    with live_server(trained_run.run_dir) as base:
        done = {}

        def post():
            files = [("files", ("a.png", good, "image/png"))]
            done["r"] = httpx.post(f"{base}/predict", files=files, timeout=30)

        thread = threading.Thread(target=post)
        thread.start()
        assert slow.wait(10)
        health = httpx.get(f"{base}/health", timeout=2)
        assert health.status_code == 200 and thread.is_alive()  # answered during the prediction
        thread.join(30)
        assert done["r"].status_code == 200 and done["r"].json()[0]["error"] is None


def test_head_answers_and_no_page_loads_from_a_cdn(trained_run):
    client = TestClient(create_app(trained_run.run_dir, device="cpu"))
    assert client.head("/health").status_code == 200  # uptime checkers send HEAD
    assert client.head("/").status_code == 200
    assert client.get("/docs").status_code == 404  # Swagger UI's scripts come from a CDN
    assert client.get("/openapi.json").status_code == 200


def test_page_card_and_explain_endpoints(trained_run, shapes_dir):
    client = TestClient(create_app(trained_run.run_dir, device="cpu"))
    page = client.get("/")
    assert page.status_code == 200 and 'id="files"' in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']https?:""", page.text)  # works offline
    assert "http://" not in page.text and "https://" not in page.text
    card = client.get("/card").json()
    meta = trained_run.load().meta
    assert card["val_accuracy"] == meta.val["accuracy"] and card["train_images"] == 48
    assert card["classes"] == ["circle", "square", "triangle"]
    good = (shapes_dir / "val" / "circle" / "000.png").read_bytes()
    r = client.post("/explain", files={"file": ("c.png", good, "image/png")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (224, 224)
    bad = client.post("/explain", files={"file": ("x.png", b"text", "image/png")})
    assert bad.status_code == 422 and "a text file, not an image" in bad.json()["detail"]
    assert client.get("/health").status_code == 200


@pytest.mark.browser
def test_the_page_in_a_real_browser(trained_run, shapes_dir, tmp_path, chrome):
    """Upload through the page's file input; the bars show what /predict says."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image, driver = shapes_dir / "val" / "triangle" / "001.png", chrome
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    with live_server(run) as base:
        files = [("files", (image.name, image.read_bytes(), "image/png"))]
        want = httpx.post(f"{base}/predict", files=files, data={"top_k": "3"}).json()[0]
        driver.get(base + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "efficientnet_lite0" in d.find_element(By.ID, "card").text)
        driver.find_element(By.ID, "files").send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result.done"))
        bars = driver.find_elements(By.CSS_SELECTOR, ".result .bar")
        shown = [
            (b.get_attribute("data-class"), b.find_element(By.CLASS_NAME, "pct").text) for b in bars
        ]
        assert shown == [(c, f"{100 * p:.1f}%") for c, p in want["probabilities"].items()]
        top = driver.find_element(By.CSS_SELECTOR, ".result .top")
        name, p = next(iter(want["probabilities"].items()))
        assert want["decision"] == name  # a val image of a clear class: no unknown, no review
        assert top.text == f"{name} {100 * p:.1f}%"
        driver.execute_script(
            "const t = document.getElementById('threshold'); t.value = 100;"
            "t.dispatchEvent(new Event('input'));"
        )
        # the review band: a class decided below the slider goes to review (a calibrated 1.0 in
        # float32 is not below 100%)
        second = list(want["probabilities"].items())[1]
        if 100 * p < 100:
            assert top.text == (
                f"review: {name} {100 * p:.1f}%, {second[0]} {100 * second[1]:.1f}%"
            )
        else:
            assert top.text == f"{name} {100 * p:.1f}%"
        driver.execute_script(
            f"const t = document.getElementById('threshold'); t.value = {int(100 * p)};"
            "t.dispatchEvent(new Event('input'));"
        )
        assert top.text == f"{name} {100 * p:.1f}%"  # at its own level it is not for review
        # "wrong? it is circle": the correction lands in RUN/feedback.csv
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.CSS_SELECTOR, ".result .fix select")).select_by_visible_text(
            "circle"
        )
        driver.find_element(By.CSS_SELECTOR, ".result .send").click()
        wait.until(
            lambda d: "saved: it is circle" in d.find_element(By.CSS_SELECTOR, ".result").text
        )
        rows = list(csv.reader(open(run / "feedback.csv", encoding="utf-8")))
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        assert rows[1][1:] == [image.name, digest, want["decision"], "circle"]
        driver.find_element(By.CSS_SELECTOR, ".result .cam").click()
        wait.until(
            lambda d: d.execute_script(
                "const i = document.querySelector('.result img');"
                "return i.src.startsWith('blob:') && i.complete && i.naturalWidth === 224 "
                "&& !document.querySelector('.result .cam');"
            )
        )
        driver.save_screenshot(str(tmp_path / "page.png"))
