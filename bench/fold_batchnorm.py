"""Benchmark: the frozen extractor with BatchNorm folded into its convolutions against the stock
network, pure forward at batch 64, fp32 and bf16, and how far their features are apart. One table.

    python bench/fold_batchnorm.py                  # efficientnet_lite0, 3 timed calls each
    python bench/fold_batchnorm.py --backbone resnet18 --calls 5
"""

from __future__ import annotations

import argparse
import time

import torch

from graft.core.runtime import resolve_runtime
from graft.frozen.networks import fold_batchnorm
from graft.models.backbones import EMBEDDED, create_backbone


def rate(net, x, calls: int) -> float:
    net(x)  # warm-up: oneDNN picks its kernels for this shape
    t = time.perf_counter()
    for _ in range(calls):
        net(x)
    return calls * x.shape[0] / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    bb = create_backbone(args.backbone, 2, pretrained=args.backbone in EMBEDDED)
    size = bb.spec.input_size
    folded_cpu = fold_batchnorm(bb.model.features, size)
    x = torch.rand(64, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref32 = bb.model.features.eval()(x).float()
    print(f"backbone {args.backbone}; torch threads {torch.get_num_threads()}")
    print(
        "\n| precision | stock img/s | folded img/s | speed-up | max rel diff to stock fp32 "
        "(stock / folded) |\n|---|---:|---:|---:|---|"
    )
    for prec in ("fp32", "bf16"):
        rt = resolve_runtime("cpu", prec)
        stock, folded = rt.prepare(bb.model.features).eval(), rt.prepare(folded_cpu)
        xb = rt.batch(x)
        with torch.inference_mode(), rt.autocast():
            a, b = rate(stock, xb, args.calls), rate(folded, xb, args.calls)
            ya, yb = stock(xb).float(), folded(xb).float()
        scale = ref32.abs().max()
        da, db = (
            ((ya - ref32).abs().max() / scale).item(),
            ((yb - ref32).abs().max() / scale).item(),
        )
        print(f"| {prec} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {da:.1e} / {db:.1e} |")


if __name__ == "__main__":
    main()
