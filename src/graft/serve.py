"""HTTP serving: a small FastAPI app around a `Classifier` loaded from a run folder.

GET /health, GET /classes, POST /predict (multipart, one or more `files`, optional `top_k`):
per file its class probabilities, or the reason it could not be read. Needs `graft[serve]`.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run
# time, and UploadFile is imported inside create_app (fastapi is an optional extra).
import importlib.util
from pathlib import Path
from typing import Any

from .errors import GraftError
from .predict import Classifier

MAX_UPLOAD_BYTES = 25 << 20  # per file; larger uploads are refused, not decoded


def create_app(run_dir: str | Path, device: str = "auto", max_bytes: int = MAX_UPLOAD_BYTES):
    """The ASGI app; the model is loaded once, here.

    >>> app = create_app("runs/demo")  # doctest: +SKIP
    >>> # uvicorn.run(app) or fastapi.testclient.TestClient(app)
    """
    for module in ("fastapi", "multipart"):
        if importlib.util.find_spec(module) is None:
            raise GraftError("serving needs FastAPI: pip install 'graft[serve]'")
    from fastapi import FastAPI, File, Form, UploadFile

    clf = Classifier.load(run_dir, device=device)
    app = FastAPI(title="graft", description=f"{clf.meta['backbone']} classifier from {run_dir}")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "backbone": clf.meta["backbone"], "classes": len(clf.classes)}

    @app.get("/classes")
    def classes() -> list[str]:
        return clf.classes

    @app.post("/predict")
    async def predict(files: list[UploadFile] = File(...), top_k: int = Form(5)) -> list[dict]:
        names, blobs, too_big = [], [], {}
        for f in files:
            data = await f.read(max_bytes + 1)
            names.append(f.filename or "<upload>")
            blobs.append(b"" if len(data) > max_bytes else data)
            if len(data) > max_bytes:
                too_big[len(names) - 1] = f"larger than {max_bytes:,} bytes"
        results = clf.predict_files(blobs, top_k=top_k, names=names)
        return [{"filename": r.path, "probabilities": None if i in too_big else r.probs,
                 "error": too_big.get(i, r.error)} for i, r in enumerate(results)]  # fmt: skip

    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto") -> None:  # fmt: skip
    """Run the app with uvicorn until interrupted."""
    if importlib.util.find_spec("uvicorn") is None:
        raise GraftError("serving needs uvicorn: pip install 'graft[serve]'")
    import uvicorn

    uvicorn.run(create_app(run_dir, device), host=host, port=port)
