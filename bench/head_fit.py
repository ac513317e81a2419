"""How long the fitted head takes (core/linear.py): the cross-validated fit on N feature vectors of
D dimensions, C classes, as `graft train` runs it (5 folds, 15 L2 strengths, then the final fit).

    python bench/head_fit.py [--sizes 500,1000,5000] [--dim 1280] [--classes 10] [--sklearn]

`--sklearn` adds two lines per size for scale: scikit-learn's LogisticRegressionCV with the same
15 strengths and 5 folds on the same scaled features (its own L-BFGS), and one LogisticRegression
fit at the strength graft chose (what a single fit costs).

Features are clustered Gaussians (a class centre plus noise): the solver's work depends on the
sizes and on how separable the classes are, not on where the vectors came from.
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
