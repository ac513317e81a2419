"""Benchmark: graft against the PyTorch transfer-learning tutorial's recipe, same data, split and
backbone, so only the engine differs. Prints one table.

The tutorial recipe, as published (pytorch.org/tutorials/beginner/transfer_learning_tutorial):
ImageFolder + PIL decode every epoch, RandomResizedCrop(224) + flip / Resize(256) + CenterCrop(224),
batch 4, shuffle, num_workers=4, SGD(lr=1e-3, momentum=0.9), StepLR(7, 0.1), best val accuracy
kept; "fixed feature extractor" freezes everything but the new last layer.

    python bench/speed.py                        # demo set, frozen + finetune, 25 epochs
    python bench/speed.py --data shapes          # a generated set
    python bench/speed.py --data PATH/TO/IMAGEFOLDER --modes extract --epochs 25
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets
from torchvision import transforms as T

import graft
from graft.backbones import create_backbone
from graft.data import discover
from graft.features import extract_features
from graft.runtime import resolve_runtime
from graft.transforms import INTERPOLATIONS


def tutorial_train(data: Path, mode: str, epochs: int, backbone: str) -> tuple[float, float]:
    """The tutorial's train_model(), with graft's backbone in place of resnet18."""
    torch.manual_seed(0)
    bb = create_backbone(backbone, num_classes=len(discover(data).classes))
    spec, model = bb.spec, bb.model
    interp = INTERPOLATIONS[spec.interpolation]
    tfs = {
        "train": T.Compose(
            [
                T.RandomResizedCrop(spec.input_size, interpolation=interp),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(spec.mean, spec.std),
            ]
        ),
        "val": T.Compose(
            [
                T.Resize(spec.resize_size, interpolation=interp),
                T.CenterCrop(spec.input_size),
                T.ToTensor(),
                T.Normalize(spec.mean, spec.std),
            ]
        ),
    }
    sets = {x: datasets.ImageFolder(data / x, tfs[x]) for x in ("train", "val")}
    loaders = {
        x: torch.utils.data.DataLoader(sets[x], batch_size=4, shuffle=True, num_workers=4)
        for x in sets
    }
    if mode == "extract":
        for p in model.features.parameters():
            p.requires_grad = False
        params = model.head.parameters()
    else:
        params = model.parameters()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    start, best_acc = time.perf_counter(), 0.0
    best_weights = copy.deepcopy(model.state_dict())  # kept as the tutorial keeps them: its cost

    for _ in range(epochs):
        for phase in ("train", "val"):
            model.train() if phase == "train" else model.eval()
            correct = 0
            for inputs, labels in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                correct += (outputs.argmax(1) == labels).sum().item()
            if phase == "train":
                scheduler.step()
            acc = correct / len(sets[phase])
            if phase == "val" and acc > best_acc:
                best_acc, best_weights = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_weights)  # the tutorial's last step
    return time.perf_counter() - start, best_acc


def graft_train(
    data: Path, mode: str, epochs: int | None, backbone: str, cache: Path
) -> tuple[float, float]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run = graft.train(
            data,
            backbone=backbone,
            strategy=mode,
            epochs=epochs,
            out=out,
            cache_dir=str(cache),
            report=False,
        )
    return time.perf_counter() - start, run.val_accuracy  # the saved model, as graft evaluate


def throughput(data: Path, backbone: str, cache: Path) -> tuple[float, float]:
    """(pure forward img/s on random tensors, graft's cold feature extraction img/s)."""
    bb = create_backbone(backbone, num_classes=2)
    rt = resolve_runtime()
    net = rt.prepare(bb.model.features).eval()
    x = rt.batch(torch.randn(64, 3, bb.spec.input_size, bb.spec.input_size))
    with torch.inference_mode(), rt.autocast():
        net(x)
        t = time.perf_counter()
        for _ in range(3):
            net(x)
        forward = 3 * 64 / (time.perf_counter() - t)
    samples = discover(data).train
    t = time.perf_counter()
    extract_features(bb, samples, rt, cache_dir=cache / "cold", workers=1)
    return forward, len(samples) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description="graft vs the tutorial recipe")
    ap.add_argument("--data", default="demo", help="demo, shapes, or an ImageFolder path")
    ap.add_argument("--modes", default="extract,finetune", help="'' for the ceiling only")
    ap.add_argument("--epochs", type=int, default=25, help="tutorial epochs (and graft finetune)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    if args.data == "demo":
        data = Path(__file__).resolve().parent.parent / "data" / "demo"
    elif args.data == "shapes":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.conftest import make_shapes

        data = make_shapes(tmp / "shapes", n_train=60, n_val=30, seed=7)
    else:
        data = Path(args.data)
    split = discover(data)
    print(
        f"data: {data} ({len(split.train)} train, {len(split.val)} val, "
        f"{len(split.classes)} classes); backbone {args.backbone}; "
        f"torch threads {torch.get_num_threads()}; graft precision {resolve_runtime().precision}"
    )
    rows = []
    for mode in filter(None, args.modes.split(",")):
        t_time, t_acc = tutorial_train(data, mode, args.epochs, args.backbone)
        rows.append((mode, "tutorial", args.epochs, t_time, t_acc, 1.0))
        g_epochs = None if mode == "extract" else args.epochs
        g_time, g_acc = graft_train(data, mode, g_epochs, args.backbone, tmp / f"cache-{mode}")
        label = "graft (cold cache)" if mode == "extract" else "graft"
        rows.append((mode, label, g_epochs or "default", g_time, g_acc, t_time / g_time))
        if mode == "extract":
            w_time, w_acc = graft_train(data, mode, None, args.backbone, tmp / f"cache-{mode}")
            rows.append((mode, "graft (warm cache)", "default", w_time, w_acc, t_time / w_time))
    print("\n| mode | engine | epochs | wall s | best val acc | speed-up |")
    print("|---|---|---|---:|---:|---:|")
    for mode, engine, ep, wall, acc, ratio in rows:
        print(f"| {mode} | {engine} | {ep} | {wall:.1f} | {acc:.4f} | {ratio:.1f}x |")
    fwd, ext = throughput(data, args.backbone, tmp)
    print(
        f"\nceiling: pure forward {fwd:.1f} img/s (batch 64, random tensors); graft feature "
        f"extraction end to end {ext:.1f} img/s = {ext / fwd:.0%} of it"
    )


if __name__ == "__main__":
    main()
