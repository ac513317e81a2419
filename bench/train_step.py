"""Training-step throughput of a backbone on this machine: precision x memory layout x batch x
image size. Prints one table (images per second of forward + backward + SGD step).

    python bench/train_step.py [--backbone efficientnet_lite0] [--images 96]
"""

from __future__ import annotations

import argparse
import time

import torch

from graft.models.backbones import create_backbone

CONFIGS = [  # (batch, bf16 autocast, channels_last, image size)
    (4, False, False, 224),
    (4, False, True, 224),
    (16, False, True, 224),
    (32, False, True, 224),
    (16, True, False, 224),
    (16, True, True, 224),
    (16, False, True, 160),
    (16, True, True, 160),
]


def step_rate(model, batch: int, bf16: bool, channels_last: bool, size: int, images: int) -> float:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 6, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    step()  # warm-up: oneDNN builds its kernels for this shape
    n = max(2, images // batch)
    start = time.perf_counter()
    for _ in range(n):
        step()
    return batch * n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--images", type=int, default=96)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_backbone(args.backbone, 6, pretrained=False).model
    print(f"{args.backbone}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| batch | precision | layout | size | img/s |\n|---:|---|---|---:|---:|")
    for batch, bf16, cl, size in CONFIGS:
        rate = step_rate(model, batch, bf16, cl, size, args.images)
        print(
            f"| {batch} | {'bf16' if bf16 else 'fp32'} | {'NHWC' if cl else 'NCHW'} | {size} "
            f"| {rate:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
