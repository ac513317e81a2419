"""Which accuracy levers pay on folders graft never saw, measured on cached features (seconds per
set once the features exist): the fitted head on one backbone's features, the mirror image's
features averaged in at test time (flip TTA), mirrors as extra training samples, and several
backbones' features concatenated; the fitted head and each concatenation also on the features
power-normalised (models/heads.py: signed square root, each backbone's part to unit length; the
columns marked "power"; "root4": the fourth root instead of the square root, graft's default since
stop 37; "+tta" averages the mirror's raw features in first; "L2 weaker": the
head at the grid's next weaker strength than the one cross-validation chose); with `--stages`,
also the first backbone's features pooled from its last stages as well as its last layer (Head2Toe's
idea, Evci et al. 2022, without its selection: each stage's pooled vector scaled to unit mean norm,
side by side). Each set is one of bench/quality.py's; graft's own split of its training folder is
used (the val share left out, as `graft train` leaves it) and the head is scored on the set's unseen
`test/` images.

    python bench/levers.py [--work /tmp/graft-levers] [--sets fm10,fm6,digits,shapes,fm30,...]
                           [--backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2]
                           [--stages blocks.4,blocks.5,blocks.6]

Features are computed with the embedded backbones at graft's default precision and cached under
WORK/cache; the mirrored copies of the images are written under WORK/flip.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from graft.core.linear import ITERATIONS, FittedHead, fit_logistic, fit_logistic_cv
from graft.core.runtime import resolve_runtime
from graft.data.discovery import discover
from graft.frozen.features import extract_features
from graft.models.backbones import Backbone, GraftNet, create_backbone
from graft.models.heads import power_normalise

sys.path.insert(0, str(Path(__file__).parent))
import quality  # noqa: E402


def _mirror(src: Path, dst: Path) -> None:
    for f in src.rglob("*.png"):
        out = dst / f.relative_to(src)
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(f).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out)


def features(work: Path, name: str, backbone: str) -> dict[str, dict[str, torch.Tensor]]:
    """{"train"|"test": {"x", "xf" (mirrored), "y"}} for one set and backbone."""
    data, flip = work / "data" / name, work / "flip" / name
    if not data.exists():
        quality.SETS[name][0](data)
    _mirror(data, flip)
    split = discover(data / "train", 0.2, 0)  # graft train's own split: val left out
    test = discover(data / "test", 0.2, 0)
    rt = resolve_runtime("cpu", "auto")
    bb = create_backbone(backbone, len(split.classes))
    out = {}
    for part, samples in (("train", split.train), ("test", sorted(test.train + test.val))):
        fs = extract_features(bb, samples, rt, cache_dir=work / "cache")
        mirrored = [(p.replace(str(data), str(flip)), y) for p, y in fs.samples]
        ff = extract_features(bb, mirrored, rt, cache_dir=work / "cache")
        out[part] = {"x": fs.features, "xf": ff.features, "y": fs.labels}
    return out


class StagesPooled(nn.Module):
    """`features`' output with the global average of each named stage's output before it."""

    def __init__(self, features: nn.Module, stages: list[str]):
        super().__init__()
        self.features, self.stages = features, stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled: list[torch.Tensor] = []
        hooks = [
            self.features.get_submodule(s).register_forward_hook(
                lambda m, i, o: pooled.append(o.mean((2, 3)))
            )
            for s in self.stages
        ]
        try:
            last = self.features(x)
        finally:
            for h in hooks:
                h.remove()
        return torch.cat([*pooled, last], 1)


def stage_features(
    work: Path, name: str, backbone: str, stages: list[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], list[int]]:
    """{"train"|"test": {"x", "y"}} of the stages-pooled network, and each part's width."""
    data = work / "data" / name
    split = discover(data / "train", 0.2, 0)
    test = discover(data / "test", 0.2, 0)
    rt = resolve_runtime("cpu", "auto")
    bb = create_backbone(backbone, len(split.classes))
    f = bb.model.features.eval()
    widths: list[int] = []
    hooks = [
        f.get_submodule(s).register_forward_hook(lambda m, i, o: widths.append(o.shape[1]))
        for s in stages
    ]
    with torch.no_grad():
        f(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    widths.append(bb.model.num_features)
    net = GraftNet(StagesPooled(f, stages), nn.Identity(), sum(widths))
    pooled = Backbone(f"{backbone}@{','.join(stages)}", net, bb.spec, bb.blocks)
    out = {}
    for part, samples in (("train", split.train), ("test", sorted(test.train + test.val))):
        fs = extract_features(pooled, samples, rt, cache_dir=work / "cache", engine="torch")
        out[part] = {"x": fs.features, "y": fs.labels}
    return out, widths


def stages_lever(d: dict[str, dict[str, torch.Tensor]], widths: list[int]) -> float:
    """Each part scaled to unit mean norm on the training images, then the fitted head."""
    tr, te = d["train"], d["test"]
    edges = torch.tensor([0, *widths]).cumsum(0).tolist()
    scale = torch.cat(
        [
            torch.full((b - a,), float(tr["x"][:, a:b].norm(dim=1).mean()))
            for a, b in zip(edges, edges[1:])
        ]
    )
    head = fit_logistic_cv(tr["x"] / scale, tr["y"], int(tr["y"].max()) + 1).linear()
    return _acc(head, te["x"] / scale, te["y"])


def _acc(head, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


def _one_strength_weaker(x: torch.Tensor, y: torch.Tensor, classes: int, fitted: FittedHead):
    """The head at the grid's next strength after the one the cross-validation chose (its path
    walked again from the strongest, warm-started, as fit_logistic_cv walks it)."""
    grid = [r["l2"] for r in fitted.path]
    chosen = grid.index(fitted.l2)
    scale = float(x.norm(dim=1).mean().clamp_min(1e-12))
    head = None
    for l2 in grid[: min(chosen + 1, len(grid) - 1) + 1]:
        head = fit_logistic(x / scale, y, classes, l2, head=head, max_iter=ITERATIONS)
    return lambda t: head(t / scale)


def levers(sets: dict[str, dict[str, dict]], first: str) -> dict[str, float]:
    """Unseen accuracy of each lever on one set; `sets` maps backbone -> features."""
    d = sets[first]
    tr, te = d["train"], d["test"]
    classes = int(tr["y"].max()) + 1
    row = {}
    head = fit_logistic_cv(tr["x"], tr["y"], classes).linear()
    row["fit"] = _acc(head, te["x"], te["y"])
    width = tr["x"].shape[1]
    px = power_normalise(tr["x"], [width])
    fitted = fit_logistic_cv(px, tr["y"], classes)
    power = fitted.linear()
    tta = power_normalise((te["x"] + te["xf"]) / 2, [width])
    row["fit power"] = _acc(power, power_normalise(te["x"], [width]), te["y"])
    row["fit power+tta"] = _acc(power, tta, te["y"])
    root4 = fit_logistic_cv(power_normalise(tr["x"], [width], 0.25), tr["y"], classes).linear()
    row["fit root4+tta"] = _acc(
        root4, power_normalise((te["x"] + te["xf"]) / 2, [width], 0.25), te["y"]
    )
    weaker = _one_strength_weaker(px, tr["y"], classes, fitted)
    row["power+tta, L2 weaker"] = _acc(weaker, tta, te["y"])
    row["fit+tta"] = _acc(head, (te["x"] + te["xf"]) / 2, te["y"])
    n = len(tr["y"])
    both = fit_logistic_cv(
        torch.cat([tr["x"], tr["xf"]]),
        torch.cat([tr["y"], tr["y"]]),
        classes,
        groups=torch.cat([torch.arange(n), torch.arange(n)]),
    ).linear()
    row["fit+mirrors"] = _acc(both, te["x"], te["y"])
    row["fit+mirrors+tta"] = _acc(both, (te["x"] + te["xf"]) / 2, te["y"])
    names = list(sets)
    for combo in (names[-1:], [names[0], names[-1]], names):
        if (len(combo) == 1 and combo[0] == first) or len(set(combo)) < len(combo):
            continue
        x = torch.cat([sets[b]["train"]["x"] for b in combo], 1)
        t = torch.cat([sets[b]["test"]["x"] for b in combo], 1)
        tf = torch.cat([sets[b]["test"]["xf"] for b in combo], 1)
        head = fit_logistic_cv(x, tr["y"], classes).linear()
        key = "+".join(b.replace("efficientnet_", "") for b in combo)
        row[key] = _acc(head, t, te["y"])
        row[f"{key}+tta"] = _acc(head, (t + tf) / 2, te["y"])
        parts = [sets[b]["train"]["x"].shape[1] for b in combo]
        head = fit_logistic_cv(power_normalise(x, parts), tr["y"], classes).linear()
        row[f"{key} power"] = _acc(head, power_normalise(t, parts), te["y"])
        row[f"{key} power+tta"] = _acc(head, power_normalise((t + tf) / 2, parts), te["y"])
        head = fit_logistic_cv(power_normalise(x, parts, 0.25), tr["y"], classes).linear()
        row[f"{key} root4+tta"] = _acc(head, power_normalise((t + tf) / 2, parts, 0.25), te["y"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-levers"))
    ap.add_argument("--sets", default=",".join(quality.MEASURED))
    ap.add_argument(
        "--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
    )
    ap.add_argument("--stages", default="", help="e.g. blocks.4,blocks.5,blocks.6")
    args = ap.parse_args()
    backbones = args.backbones.split(",")
    rows = []
    for name in args.sets.split(","):
        feats = {b: features(args.work, name, b) for b in backbones}
        rows.append({"set": name, **levers(feats, backbones[0])})
        if args.stages:
            stages = args.stages.split(",")
            pooled, widths = stage_features(args.work, name, backbones[0], stages)
            rows[-1][f"stages {'+'.join(s.split('.')[-1] for s in stages)}+last"] = stages_lever(
                pooled, widths
            )
        if len(rows) == 1:
            print(" ".join(f"{k:>14}" for k in rows[0]))
        print(
            " ".join(
                f"{v:>14.3f}" if isinstance(v, float) else f"{v:>14}" for v in rows[-1].values()
            ),
            flush=True,
        )
    keys = [k for k in rows[0] if k != "set"]
    print(
        " ".join(
            ["mean".rjust(14), *(f"{statistics.mean(r[k] for r in rows):14.4f}" for k in keys)]
        )
    )


if __name__ == "__main__":
    main()
