"""HTTP serving: a small FastAPI app around a `Classifier` loaded from a run folder.

GET / is a page to try the model in a browser (page.py); GET /card the model card's facts;
GET /health, GET /classes, POST /predict (multipart, one or more `files`, optional `top_k`):
per file its decision (a class, "unknown" or "review": core/decisions.py), class probabilities
and unknown score, or the reason it could not be read; POST /explain (one `file`):
a PNG of the Grad-CAM overlay for its top class; POST /feedback (JSON:
filename, sha256 of the upload, predicted, corrected): "this is wrong, it is X", appended to
RUN/feedback.csv so production mistakes come back as labels. Needs `graft[serve]`.

Each request decodes its uploads in a worker thread, in parallel with the others; the network
runs in one thread of its own, never on the event loop, on the requests that arrived together as
one batch (batching.py), so /health and new connections are answered under load. The engine is
chosen as `graft predict`'s (inference/engines.py): on a CPU with ONNX Runtime, the run's cached
export (a server predicts for hours: the one-time export always pays); PyTorch otherwise, and
for /explain, which needs the network's gradients.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run
# time, and UploadFile is imported inside create_app (fastapi is an optional extra).
import contextlib
import csv
import datetime as _dt
import gc
import hashlib
import importlib.util
import io
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from ..core.errors import GraftError
from ..core.runfolder import FEEDBACK
from ..inference.classifier import Classifier
from ..inference.engines import AUTO_MIN_IMAGES, load_for
from ..models.modelfile import ModelMeta, read_meta
from .batching import Batcher

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 25 << 20  # per file; larger uploads are refused, not decoded
MAX_FILES = 64  # per request: a 999-file request would hold the model for everyone else


def create_app(
    run_dir: str | Path,
    device: str = "auto",
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_files: int = MAX_FILES,
    engine: str = "auto",
):
    """The ASGI app; the model is loaded once, here.

    >>> app = create_app("runs/demo")  # doctest: +SKIP
    >>> # uvicorn.run(app) or fastapi.testclient.TestClient(app)
    """
    for module in ("fastapi", "multipart"):
        if importlib.util.find_spec(module) is None:
            raise GraftError("serving needs FastAPI: pip install 'graft[serve]'")
    from fastapi import FastAPI, File, Form, HTTPException, UploadFile
    from fastapi.responses import HTMLResponse, Response
    from starlette.concurrency import run_in_threadpool

    from .page import PAGE

    fast, why = load_for(run_dir, AUTO_MIN_IMAGES, engine, device)  # a server: the export pays
    log.info("serving with %s", why)
    meta = read_meta(run_dir)
    model_lock, feedback_lock = threading.Lock(), threading.Lock()
    torch_model: list[Classifier] = [fast] if type(fast) is Classifier else []

    loading = threading.Lock()

    def pytorch() -> Classifier:
        """The PyTorch model (for /explain's gradients), loaded on first use, once."""
        with loading:
            if not torch_model:
                torch_model.append(Classifier.load(run_dir, device=device))
        return torch_model[0]

    def forward(tensors):
        with model_lock:  # /explain may be using the same PyTorch model
            return fast.forward(tensors)

    batcher = Batcher(forward)
    gc.freeze()  # the model's objects are permanent: full collections under load skip them

    # as many decodes at once as there are cores: more threads would only queue for the GIL,
    # and the event loop answering /health with them
    decoding = threading.BoundedSemaphore(os.cpu_count() or 1)

    def run_model(blobs: list[bytes], top_k: int, names: list[str]):
        with decoding:  # this request's thread: in parallel with the others
            decoded = fast.decode(blobs)
        probs, unknown = batcher.run([t for t in decoded if not isinstance(t, str)])
        return fast.results(names, decoded, probs, unknown, top_k)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    # no /docs or /redoc: FastAPI's pages load their scripts from a CDN, and the server must work
    # offline; /openapi.json stays for clients that generate code from it
    app = FastAPI(
        title="graft",
        description=f"{meta.backbone} classifier from {run_dir}",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/card")
    def card() -> dict[str, Any]:
        return model_facts(meta)

    @app.post("/explain")
    async def explain(file: UploadFile = File(...)) -> Response:
        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"larger than {max_bytes:,} bytes")

        def draw() -> bytes:
            model = pytorch()
            with model_lock:
                return model.explanation_png(data)

        try:
            png = await run_in_threadpool(draw)
        except GraftError as exc:  # an unreadable upload
            raise HTTPException(422, str(exc)) from exc
        return Response(png, media_type="image/png")

    @app.post("/feedback")
    def feedback(item: dict[str, Any]) -> dict[str, Any]:
        """One correction: which upload (its name and sha256), what the model said, what it is."""
        row = _feedback_row(item, meta.classes)
        if isinstance(row, str):
            raise HTTPException(422, row)
        path = Path(run_dir) / FEEDBACK
        buf = io.StringIO()
        writer = csv.writer(buf)
        with feedback_lock:
            if not path.exists():
                writer.writerow(["time", "filename", "sha256", "predicted", "corrected"])
            writer.writerow(row)
            with open(path, "a", encoding="utf-8", newline="") as fh:
                fh.write(buf.getvalue())
        return {"saved": True, "corrected": row[-1]}

    # uptime checkers often send HEAD; on the event loop itself, not in the worker threads the
    # requests decode in, so it answers at once under load
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backbone": meta.backbone, "classes": len(meta.classes)}

    @app.get("/classes")
    def classes() -> list[str]:
        return meta.classes

    @app.post("/predict")
    async def predict(files: list[UploadFile] = File(...), top_k: int = Form(5)) -> list[dict]:
        if len(files) > max_files:
            raise HTTPException(413, f"{len(files)} files in one request; at most {max_files}")
        if top_k < 1:
            raise HTTPException(422, "top_k must be at least 1")
        names, blobs, too_big = [], [], {}
        for f in files:
            data = await f.read(max_bytes + 1)
            names.append(f.filename or "<upload>")
            blobs.append(b"" if len(data) > max_bytes else data)
            if len(data) > max_bytes:
                too_big[len(names) - 1] = f"larger than {max_bytes:,} bytes"
        results = await run_in_threadpool(run_model, blobs, top_k, names)
        return [
            {
                "filename": r.path,
                "decision": None if i in too_big else r.decision,
                "probabilities": None if i in too_big else r.probs,
                "unknown_score": None if i in too_big else r.unknown,
                "sha256": hashlib.sha256(blobs[i]).hexdigest() if blobs[i] else None,
                "error": too_big.get(i, r.error),
            }
            for i, r in enumerate(results)
        ]

    return app


def _feedback_row(item: Any, classes: list[str]) -> list[str] | str:
    """The CSV row of a correction, or what is wrong with it (untrusted input: a class that is
    not one, a hash that is not one, control characters in a file name are refused)."""
    if not isinstance(item, dict):
        return "send a JSON object: filename, sha256, predicted, corrected"
    name, digest = item.get("filename"), item.get("sha256")
    predicted, corrected = item.get("predicted"), item.get("corrected")
    if corrected not in classes:
        return f"corrected must be one of the classes: {', '.join(classes)}"
    if predicted not in (*classes, "unknown", "review"):
        return "predicted must be a class, unknown or review"
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        return "sha256 must be the upload's 64 hex digits, as /predict returns it"
    if not (isinstance(name, str) and len(name) <= 255 and name.isprintable()):
        return "filename must be printable text of at most 255 characters"
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return [now, name, digest, predicted, corrected]


def model_facts(meta: ModelMeta) -> dict[str, Any]:
    """What the page's model card shows, from model.json."""
    val = meta.val or {}
    counts = (meta.class_counts or {}).get("train") or {}
    return {
        "backbone": meta.backbone,
        "strategy": meta.strategy,
        "classes": meta.classes,
        "val_accuracy": val.get("accuracy"),
        "val_ci95": val.get("accuracy_ci95"),
        "val_images": val.get("n"),
        "train_images": sum(counts.values()),
        "unknown": meta.unknown is not None,
        "unknown_flag_rate": (meta.unknown or {}).get("flag_rate"),
        "thresholds": (meta.decision or {}).get("thresholds") or {},
        "created": meta.created,
    }


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    engine: str = "auto",
) -> None:
    """Run the app with uvicorn until interrupted."""
    if importlib.util.find_spec("uvicorn") is None:
        raise GraftError("serving needs uvicorn: pip install 'graft[serve]'")
    import uvicorn

    uvicorn.run(create_app(run_dir, device, engine=engine), host=host, port=port)
