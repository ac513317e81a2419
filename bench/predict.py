"""Benchmark: `graft predict` as a moderation queue runs it, against the network's own pace.

Writes N small unseen PNGs (Fashion-MNIST test images, 28x28 grey, as the issue measured), then
times whole processes on them: `graft predict RUN FILES` to stdout (everything kept, printed at
the end), `graft predict RUN FILES --out X.csv` (streamed, decoded in threads), the same on the
exported `RUN/model.onnx`; and the ceiling: ONNX Runtime alone on tensors already decoded
(batch 64, fp32). Peak RSS per process (ru_maxrss of the child). One table.

    python bench/predict.py --run runs/demo --files 5000
    python bench/predict.py --run runs/demo --files 10000,50000 --only stream  # memory vs N
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def make_files(folder: Path, n: int) -> list[str]:
    """n PNGs from the Fashion-MNIST test images (cycled past 10,000), written once."""
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(FASHION, "rb") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.png"
        if not path.exists():
            Image.fromarray(images[i % len(images)]).save(path)
        paths.append(str(path))
    return paths


_PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL);"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
    "sys.exit(r.returncode)"
)


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one whole process (measured by a fresh parent, so
    each command's own peak)."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd[:6])}...: {r.stderr[-2000:]}")
    return seconds, int(r.stderr.strip().splitlines()[-1]) / 1024


def ceiling(model: Path, files: list[str], batch: int = 64) -> float:
    """Images/s of ONNX Runtime alone on decoded, preprocessed tensors (the network's pace)."""
    import graft

    clf = graft.load(model)
    tensors = [clf.preprocess(p) for p in files[:512]]
    x = np.stack([t.numpy() for t in tensors[:batch]])
    clf.session.run(None, {"image": x})  # warm-up
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < 10:
        clf.session.run(None, {"image": x})
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder (graft train)")
    ap.add_argument("--files", default="5000", help="file counts, comma-separated")
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-bench-predict"))
    ap.add_argument("--only", default="", help="stream: the streamed run-folder command alone")
    args = ap.parse_args()
    graft_cmd = [sys.executable, "-m", "graft"]
    onnx = args.run / "model.onnx"
    if not onnx.exists():
        subprocess.run([*graft_cmd, "export", str(args.run)], check=True, capture_output=True)
    rows = []
    for n in map(int, args.files.split(",")):
        files = make_files(args.work / "files", n)
        folder = args.work / f"list-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        # the files by folder: a command line of 100,000 paths would be too long
        inputs = (
            [str(args.work / "files")] if n == len(list((args.work / "files").iterdir())) else files
        )
        modes = {
            "stream RUN": [str(args.run), *inputs, "--out", str(folder / "run.csv")],
            "stdout RUN": [str(args.run), *inputs, "--csv"],
            "stream ONNX": [str(onnx), *inputs, "--out", str(folder / "onnx.csv")],
        }
        if args.only == "stream":
            modes = {"stream RUN": modes["stream RUN"]}
        for name, cmd in modes.items():
            for out in folder.glob("*.csv"):
                out.unlink()
            seconds, peak = run([*graft_cmd, "predict", *cmd])
            rows.append((n, name, n / seconds, seconds, peak))
            print(f"{n:>7} {name:<12} {n / seconds:8.1f} img/s {seconds:8.1f} s {peak:8.0f} MB")
    top = ceiling(onnx, make_files(args.work / "files", 512))
    print(f"\nceiling: ONNX Runtime alone, batch 64, fp32, decoded tensors: {top:.1f} img/s\n")
    print("| files | command | images/s | share of the ceiling | wall s | peak RSS MB |")
    print("|---:|---|---:|---:|---:|---:|")
    for n, name, rate, seconds, peak in rows:
        print(f"| {n} | {name} | {rate:.1f} | {rate / top:.0%} | {seconds:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
