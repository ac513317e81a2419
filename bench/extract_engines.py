"""Benchmark: the frozen extractor in PyTorch and in ONNX Runtime, cold, on one folder: images/s
of each (fresh feature caches), and the one-time export. The numbers `--engine auto` weighs
(frozen/features.py: EXTRACT_RATE, EXPORT_SECONDS).

    python bench/extract_engines.py DATA [--labels FILE.csv] [--backbone efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from graft.core.runtime import default_workers, resolve_runtime
from graft.data.discovery import discover
from graft.frozen.features import extract_features
from graft.models.backbones import create_backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--labels")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()
    split = discover(args.data, labels=args.labels)
    samples = split.train + split.val
    backbone = create_backbone(args.backbone, len(split.classes))
    runtime = resolve_runtime("auto", "auto")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("torch", "onnxruntime", "onnxruntime"):
            cache = Path(tmp) / engine
            for old in cache.glob("*") if cache.exists() else []:
                if old.name != "onnx":  # the second ONNX Runtime pass: export kept, features gone
                    for f in sorted(old.rglob("*"), reverse=True):
                        f.unlink() if f.is_file() else f.rmdir()
                    old.rmdir()
            start = time.perf_counter()
            extract_features(
                backbone, samples, runtime, cache, engine=engine, workers=default_workers()
            )
            rows.append((engine, time.perf_counter() - start))
    (_, torch_s), (_, first_s), (_, ort_s) = rows
    n = len(samples)
    print(f"{n} images, {args.backbone}, {runtime.device.type} {runtime.precision}")
    print("| engine | s | images/s |")
    print("|---|---:|---:|")
    print(f"| PyTorch ({runtime.precision}) | {torch_s:.1f} | {n / torch_s:.1f} |")
    print(f"| ONNX Runtime (fp32), export cached | {ort_s:.1f} | {n / ort_s:.1f} |")
    print(f"| ONNX Runtime, first run: export | {first_s - ort_s:.1f} | |")
    gain = 1 / (n / torch_s) - 1 / (n / ort_s)
    if gain > 0:
        print(f"ONNX Runtime pays from about {(first_s - ort_s) / gain:.0f} images")
    else:
        print("ONNX Runtime is not faster here")


if __name__ == "__main__":
    main()
