"""How long the fitted head takes (core/linear.py): the cross-validated fit on N feature vectors of
D dimensions, C classes, as `graft train` runs it (5 folds solved together, up to 15 L2 strengths,
stopping two past the best, then the final fit).

    python bench/head_fit.py [--sizes 500,1000,5000] [--dim 1280] [--classes 10] [--sklearn]
    python bench/head_fit.py --sizes 5000 --fashion /tmp/fashion5000.pt

`--sklearn` adds two lines per size for scale: scikit-learn's LogisticRegressionCV with the same
15 strengths and 5 folds on the same scaled features (its own L-BFGS), and one LogisticRegression
fit at the strength graft chose (what a single fit costs).

Features are clustered Gaussians (a class centre plus noise) by default. Those are perfectly
separable, so the CV's loss falls to the weakest strength; real features are not, and cost the
solver more. `--fashion FILE` runs on real ones instead: EfficientNet-Lite0's pooled features of
the first N / 10 Fashion-MNIST training images of each class from the 2,000th on (Debian's
dataset-fashion-mnist), fourth roots as `graft train` reads them, extracted once into FILE
(3.5 minutes at 2,000 on 2 cores) and read from it after; it prints the fit on all images
(`cv_images=None`, the cross-validation before the subsample) and the default, each with its
accuracy on 1,000 unseen test images (100 a class); with `--sklearn`, one scikit-learn
LogisticRegression fit at the default's strength, run to convergence (what one fit costs).
"""

from __future__ import annotations

import argparse
import time

import torch

from graft.core.linear import fit_logistic_cv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500,1000,5000")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--sklearn", action="store_true", help="time scikit-learn's as well")
    ap.add_argument("--fashion", metavar="FILE", help="real lite0 features, cached in FILE")
    args = ap.parse_args()
    if args.fashion:
        for n in map(int, args.sizes.split(",")):
            _fashion(n, args.fashion, args.sklearn)
        return
    print(f"{'N':>6} {'D':>5} {'C':>3} {'threads':>7} {'seconds':>8} {'L2':>8} {'cv acc':>7}")
    for n in map(int, args.sizes.split(",")):
        g = torch.Generator().manual_seed(0)
        centres = torch.randn(args.classes, args.dim, generator=g)
        y = torch.arange(n) % args.classes
        x = (centres[y] + 2.0 * torch.randn(n, args.dim, generator=g)).relu()  # pooled: >= 0
        start = time.perf_counter()
        fitted = fit_logistic_cv(x, y, args.classes)
        seconds = time.perf_counter() - start
        best = min(fitted.path, key=lambda r: r["cv_loss"])
        print(
            f"{n:6d} {args.dim:5d} {args.classes:3d} {torch.get_num_threads():7d} "
            f"{seconds:8.2f} {fitted.l2:8.1e} {best['cv_acc']:7.3f}",
            flush=True,
        )
        if args.sklearn:
            _sklearn(x, y, fitted.l2, args.classes)


def _sklearn(x: torch.Tensor, y: torch.Tensor, l2: float, classes: int) -> None:
    """The same fits by scikit-learn: its C is 1 / (2 x l2 x N) for graft's mean loss + l2|W|^2."""
    import warnings

    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    from graft.core.linear import FOLDS, L2_GRID

    xs = (x / x.norm(dim=1).mean()).numpy()  # graft's scaling: one grid for every backbone
    yn, n = y.numpy(), len(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 1.9's notices of changing defaults
        for name, model in (
            (
                "sklearn CV",
                LogisticRegressionCV(Cs=[1 / (2 * s * n) for s in L2_GRID], cv=FOLDS, max_iter=200),
            ),
            ("sklearn 1 fit", LogisticRegression(C=1 / (2 * l2 * n), max_iter=200)),
        ):
            start = time.perf_counter()
            model.fit(xs, yn)
            seconds = time.perf_counter() - start
            print(
                f"{n:6d} {xs.shape[1]:5d} {classes:3d} {torch.get_num_threads():7d} "
                f"{seconds:8.2f}  {name}",
                flush=True,
            )


def _fashion(n: int, cache: str, sklearn: bool) -> None:
    """Real features: the fit on all images against the default (a subsample above CV_IMAGES)."""
    from pathlib import Path

    from graft.core.linear import CV_IMAGES
    from graft.models.heads import power_normalise

    path = Path(cache)
    data = torch.load(path) if path.exists() else {}
    if data.get("n") != n:
        data = {"n": n, "train": _lite0_fashion("train", n // 10, 2000), "test": None}
        data["test"] = _lite0_fashion("t10k", 100, 200)
        torch.save(data, path)
    (x, y), (tx, ty) = data["train"], data["test"]
    x, tx = power_normalise(x, [x.shape[1]], 0.25), power_normalise(tx, [tx.shape[1]], 0.25)
    print(f"{'N':>6} {'D':>5} {'cv_images':>9} {'seconds':>8} {'L2':>8} {'unseen':>7}")
    for limit in (None, CV_IMAGES):
        start = time.perf_counter()
        fitted = fit_logistic_cv(x, y, 10, cv_images=limit)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            acc = float((fitted.linear()(tx).argmax(1) == ty).float().mean())
        print(
            f"{n:6d} {x.shape[1]:5d} {str(limit):>9} {seconds:8.2f} {fitted.l2:8.1e} {acc:7.4f}",
            flush=True,
        )
    if sklearn:  # one converged fit at the strength chosen: what a single fit costs here
        import warnings

        from sklearn.linear_model import LogisticRegression

        scale = x.norm(dim=1).mean()  # graft's scaling, as _sklearn
        xs, txs = (x / scale).numpy(), (tx / scale).numpy()
        model = LogisticRegression(C=1 / (2 * fitted.l2 * n), max_iter=1000)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.fit(xs, y.numpy())
        seconds = time.perf_counter() - start
        acc = float((model.predict(txs) == ty.numpy()).mean())
        print(
            f"{n:6d} {x.shape[1]:5d} {'sklearn 1 fit':>9} {seconds:8.2f} {fitted.l2:8.1e} "
            f"{acc:7.4f}  ({model.n_iter_[0]} L-BFGS iterations)",
            flush=True,
        )


def _lite0_fashion(stem: str, per_class: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    from PIL import Image
    from quality import FASHION, _idx

    from graft.data.transforms import build_transforms
    from graft.models.backbones import create_backbone

    bb = create_backbone("efficientnet_lite0", num_classes=None)
    net, tf = bb.model.features.eval(), build_transforms(bb.spec, train=False)
    images = _idx(FASHION / f"{stem}-images-idx3-ubyte.gz")
    labels = _idx(FASHION / f"{stem}-labels-idx1-ubyte.gz")
    idx = np.concatenate([np.flatnonzero(labels == c)[start:][:per_class] for c in range(10)])
    out = []
    with torch.inference_mode():
        for b in range(0, len(idx), 100):
            batch = [tf(Image.fromarray(255 - images[i]).convert("RGB")) for i in idx[b : b + 100]]
            out.append(net(torch.stack(batch)))
    return torch.cat(out), torch.as_tensor(labels[idx].astype(np.int64))


if __name__ == "__main__":
    main()
