"""Benchmark: single-image latency of the exported model in ONNX Runtime against PyTorch eager,
on this machine's CPU, for one backbone. Prints one table.

    python bench/export_latency.py                     # efficientnet_lite0, 50 runs each
    python bench/export_latency.py --backbone resnet18 --runs 100

It trains a one-epoch head on generated shapes (weights of the backbone: embedded or random),
exports it with `graft export` (parity checked), then times (a) the network alone on one
preprocessed image and (b) `predict` of one PNG file end to end, median and p90 of --runs calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import graft
from graft.inference.classifier import Classifier, OnnxClassifier
from graft.inference.export import export


def timed(fn, runs: int) -> tuple[float, float]:
    for _ in range(5):
        fn()  # warm-up: kernels chosen, caches filled
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.conftest import make_shapes

    tmp = Path(tempfile.mkdtemp(prefix="graft-bench-export-"))
    data = make_shapes(tmp / "shapes", n_train=8, n_val=4)
    pretrained = args.backbone.startswith("efficientnet_lite")
    run = graft.train(
        data,
        backbone=args.backbone,
        pretrained=pretrained,
        epochs=1,
        workers=0,
        report=False,
        out=str(tmp / "run"),
        cache_dir=str(tmp / "cache"),
    )
    result = export(run.run_dir)
    eager, onnx = Classifier.load(run.run_dir, device="cpu"), OnnxClassifier(result.path)
    image = sorted((data / "val").rglob("*.png"))[0]
    x_eager = eager.runtime.batch(eager.preprocess(image)[None])
    x_onnx = onnx.preprocess(image)[None].numpy()

    @torch.inference_mode()
    def net_eager():
        eager.model(x_eager)

    rows = [
        ("network only", "PyTorch eager fp32", *timed(net_eager, args.runs)),
        (
            "network only",
            "ONNX Runtime fp32",
            *timed(lambda: onnx.session.run(None, {"image": x_onnx}), args.runs),
        ),
        ("predict(file)", "PyTorch eager fp32", *timed(lambda: eager.predict(image), args.runs)),
        ("predict(file)", "ONNX Runtime fp32", *timed(lambda: onnx.predict(image), args.runs)),
    ]
    print(
        f"backbone {args.backbone}; torch threads {torch.get_num_threads()}; parity "
        f"max|dp| {result.max_abs_diff:.1e}, top-1 {result.top1_agreement:.0%}"
    )
    print("\n| what | engine | median ms | p90 ms |\n|---|---|---:|---:|")
    for what, engine, med, p90 in rows:
        print(f"| {what} | {engine} | {med:.1f} | {p90:.1f} |")


if __name__ == "__main__":
    main()
