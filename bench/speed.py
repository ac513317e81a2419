"""Benchmark: graft against the PyTorch transfer-learning tutorial's recipe, same data, split and
backbone, so only the engine differs. Prints one table: per mode the wall time, the time to first
reach the tutorial's best val accuracy (for partial: the tutorial's fine-tune best), the saved
model's val accuracy; then the extraction ceiling, and the whole `graft train` process (cold and
warm cache, peak RSS).

The tutorial recipe, as published (pytorch.org/tutorials/beginner/transfer_learning_tutorial):
ImageFolder + PIL decode every epoch, RandomResizedCrop(224) + flip / Resize(256) + CenterCrop(224),
batch 4, shuffle, num_workers=4, SGD(lr=1e-3, momentum=0.9), StepLR(7, 0.1), best val accuracy
kept; "fixed feature extractor" freezes everything but the new last layer.

    python bench/speed.py                        # demo set, frozen + finetune, 25 epochs
    python bench/speed.py --data shapes          # a generated set
    python bench/speed.py --data PATH/TO/IMAGEFOLDER --modes extract --epochs 25
    python bench/speed.py --modes finetune,partial,partial-live --graft-epochs 10  # graft defaults
    python scripts/make_photos.py --out /tmp/photos && python bench/speed.py --data /tmp/photos

Modes: extract, finetune (the tutorial's two), partial (graft: the last --unfreeze-last blocks on
cached trunk activations) and partial-live (the same with the trunk run every epoch).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets
from torchvision import transforms as T

import graft
from graft.core.runtime import resolve_runtime
from graft.data.discovery import discover
from graft.data.transforms import INTERPOLATIONS
from graft.frozen.features import extract_features
from graft.models.backbones import create_backbone


def tutorial_train(data: Path, mode: str, epochs: int, backbone: str) -> tuple[float, list]:
    """The tutorial's train_model(), with graft's backbone in place of resnet18: its wall time
    and its curve [(seconds since start, val accuracy)] per epoch."""
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
    start, best_acc, curve = time.perf_counter(), 0.0, []
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
            if phase == "val":
                curve.append((time.perf_counter() - start, acc))
    model.load_state_dict(best_weights)  # the tutorial's last step
    return time.perf_counter() - start, curve


def graft_train(
    data: Path, mode: str, epochs: int | None, backbone: str, cache: Path, unfreeze_last: int = 3
) -> tuple[float, list, float]:
    """graft.train: wall time, curve [(seconds since start, val accuracy)] per epoch, and the
    saved model's val accuracy (as graft evaluate gives it)."""
    strategy = "partial" if mode.startswith("partial") else mode
    extra = {"unfreeze_last": unfreeze_last} if strategy == "partial" else {}
    if mode == "partial":
        extra["cache_views"] = 4  # the trunk's activations cached for 4 views; partial-live: 0
    curve = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run = graft.train(
            data,
            backbone=backbone,
            strategy=strategy,
            epochs=epochs,
            out=out,
            cache_dir=str(cache),
            report=False,
            on_epoch=lambda r: curve.append((time.perf_counter() - start, r["val_acc"])),
            **extra,
        )
    return time.perf_counter() - start, curve, run.val_accuracy


def time_to(curve: list, target: float) -> float | None:
    """Seconds until the curve first reaches `target`, None if never."""
    return next((t for t, acc in curve if acc >= target - 1e-6), None)  # float32 vs float


def process(args: list[str]) -> tuple[float, float]:
    """A command as a new process: (wall seconds, its peak RSS in GB, its own workers included)."""
    start = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status:
        raise SystemExit(f"{' '.join(args)} failed: {child.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 2**20  # KB on Linux


def throughput(data: Path, backbone: str, cache: Path) -> tuple[float, float, float, float]:
    """(pure forward img/s on random tensors, graft's cold feature extraction img/s, the same
    with --engine onnxruntime once its export exists, the export's seconds)."""
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
    torch_rate = len(samples) / (time.perf_counter() - t)
    t = time.perf_counter()
    extract_features(bb, samples[:1], rt, cache_dir=cache / "ort", engine="onnxruntime")
    export = time.perf_counter() - t
    for entry in (cache / "ort").rglob("*.safetensors"):
        entry.unlink()
    t = time.perf_counter()
    extract_features(bb, samples, rt, cache_dir=cache / "ort", workers=1, engine="onnxruntime")
    return forward, torch_rate, len(samples) / (time.perf_counter() - t), export


def main() -> None:
    ap = argparse.ArgumentParser(description="graft vs the tutorial recipe")
    ap.add_argument("--data", default="demo", help="demo, shapes, or an ImageFolder path")
    ap.add_argument("--modes", default="extract,finetune,partial", help="'' for none")
    ap.add_argument("--epochs", type=int, default=25, help="the tutorial's epochs")
    ap.add_argument("--graft-epochs", type=int, default=None, help="default: graft's own")
    ap.add_argument("--unfreeze-last", type=int, default=3, help="partial: blocks that train")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the extraction ceiling")
    ap.add_argument(
        "--process",
        default="",
        help="strategies to time as whole processes, "
        "e.g. extract,partial: `graft train DATA` cold and warm, peak RSS",
    )
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
    modes = list(filter(None, args.modes.split(",")))
    tutorial = {}  # mode -> (wall, curve)
    for mode in ("extract", "finetune"):
        if mode in modes or (mode == "finetune" and any(m.startswith("partial") for m in modes)):
            tutorial[mode] = tutorial_train(data, mode, args.epochs, args.backbone)
    rows = []
    for mode in modes:
        ref = "extract" if mode == "extract" else "finetune"
        t_wall, t_curve = tutorial[ref]
        target = max(acc for _, acc in t_curve)
        if mode in tutorial:
            rows.append(
                (mode, "tutorial", args.epochs, t_wall, time_to(t_curve, target), None, target, 1.0)
            )
        cached = mode in ("extract", "partial")  # a second run reads what the first cached
        for label in ("graft (cold cache)", "graft (warm cache)") if cached else ("graft",):
            wall, curve, saved = graft_train(
                data,
                mode,
                args.graft_epochs,
                args.backbone,
                tmp / f"cache-{mode}",
                args.unfreeze_last,
            )
            best = max(acc for _, acc in curve)
            rows.append(
                (
                    mode,
                    label,
                    args.graft_epochs or "default",
                    wall,
                    time_to(curve, target),
                    saved,
                    best,
                    t_wall / wall,
                )
            )
    if rows:
        print(
            "\n| mode | engine | epochs | wall s | s to the tutorial's best | saved model val "
            "acc | best epoch val acc | speed-up |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|")
    for mode, engine, ep, wall, reach, saved, best, ratio in rows:
        reach_s = "never" if reach is None else f"{reach:.1f}"
        saved_s = "" if saved is None else f"{saved:.4f}"
        print(
            f"| {mode} | {engine} | {ep} | {wall:.1f} | {reach_s} | {saved_s} | {best:.4f} | "
            f"{ratio:.1f}x |"
        )
    for mode in ("extract", "finetune"):
        if mode in tutorial:
            best = max(acc for _, acc in tutorial[mode][1])
            print(f"(the tutorial's best {args.epochs}-epoch val accuracy, {mode}: {best:.4f})")
    if not args.no_ceiling:
        fwd, ext, ort, export = throughput(data, args.backbone, tmp)
        print(
            f"\nceiling: pure forward {fwd:.1f} img/s (batch 64, random tensors); graft feature "
            f"extraction end to end {ext:.1f} img/s = {ext / fwd:.0%} of it; with --engine "
            f"onnxruntime {ort:.1f} img/s = {ort / fwd:.0%} (its one-time export and first "
            f"image: {export:.1f} s)"
        )
    if args.process:
        print("\n| `graft train DATA` as a process | cache | wall s | peak RSS GB |")
        print("|---|---|---:|---:|")
    for strategy in filter(None, args.process.split(",")):
        extra = ["--unfreeze-last", str(args.unfreeze_last)] if strategy == "partial" else []
        cmd = [
            sys.executable,
            "-m",
            "graft",
            "train",
            str(data),
            "--strategy",
            strategy,
            "--backbone",
            args.backbone,
            "--out",
            str(tmp / f"proc-{strategy}"),
            "--overwrite",
            "--cache-dir",
            str(tmp / f"proc-cache-{strategy}"),
            *extra,
        ]
        for cache in ("cold", "warm"):
            wall, rss = process(cmd)
            print(f"| --strategy {strategy} {' '.join(extra)} | {cache} | {wall:.1f} | {rss:.2f} |")


if __name__ == "__main__":
    main()
