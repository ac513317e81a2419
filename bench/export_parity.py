"""Which backbones export to ONNX with parity: for each, a 3-class model (random weights unless
the backbone embeds real ones) saved as a run, `graft export`, and the check's figures. One table.

    python bench/export_parity.py                       # every named backbone
    python bench/export_parity.py --backbones resnet18,vgg11
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from graft.inference.export import export
from graft.models.backbones import EMBEDDED, TORCHVISION, create_backbone
from graft.models.modelfile import ModelMeta, save_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default=",".join([*EMBEDDED, *TORCHVISION]))
    args = ap.parse_args()
    print("| backbone | export s | images | max abs diff | top-1 agreement | result |")
    print("|---|---:|---:|---:|---:|---|")
    for name in args.backbones.split(","):
        with tempfile.TemporaryDirectory() as run:
            bb = create_backbone(name, 3, pretrained=name in EMBEDDED)
            meta = ModelMeta(
                backbone=name, classes=["a", "b", "c"], preprocess=bb.spec, strategy="extract"
            )
            save_model(run, bb, meta)
            t = time.perf_counter()
            try:
                r = export(Path(run))
                row = f"{r.images} | {r.max_abs_diff:.1e} | {r.top1_agreement:.0%} | exported"
            except Exception as exc:  # a backbone that does not export: say why
                row = f" | | | not exported: {str(exc).splitlines()[0][:120]}"
            print(f"| {name} | {time.perf_counter() - t:.1f} | {row} |")


if __name__ == "__main__":
    main()
