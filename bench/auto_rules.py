"""How would `--auto` have done with another ranking rule? For each `bench/quality.py --modes auto`
run (its compare.json), the candidate each rule picks, and the unseen accuracy of each pick: the
candidate's settings passed to `graft train` with the run's seed (what `--auto`'s final training
does; the pick the run made, under whichever rule, is read from its results instead), then
`graft evaluate` on the set's unseen folder. Rules: acc (fold accuracy, ties to the loss: the
rule before stop 44 and in stops 45-46), low (the low end of the fold accuracy's Wilson
interval, ties to the loss: acc's order among candidates scored on the same images, a candidate
scored on fewer ranked lower; the rule since stop 47), loss (held-out loss, ties to the accuracy:
stop 44's rule), se-loss (the lowest loss among candidates within one standard error of the best
fold accuracy).

    python bench/auto_rules.py --work /tmp/exp auto44s1 auto44s2 [--src PATH] [--refit]
                               [--rules acc,low,loss,se-loss]

`--refit` retrains every pick, the run's own too, an extract pick with `--refit` (what `--auto`'s
final training does since stop 46): the picks of a run made before, scored as today's `--auto`
would train them.

Each label is a `bench/quality.py --label` of an auto run whose name ends in its seed (sN).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

RULES = ("acc", "low", "loss", "se-loss")


def picks(rows: list[dict]) -> dict[str, str]:
    scored = [r for r in rows if r["status"] == "scored"]
    best = max(r["accuracy"] for r in scored)
    se = math.sqrt(best * (1 - best) / scored[0]["scored_images"])
    near = [r for r in scored if r["accuracy"] >= best - se]
    return {
        "acc": min(scored, key=lambda r: (-r["accuracy"], r["loss"]))["candidate"],
        "low": min(scored, key=lambda r: (-r["accuracy_ci95"][0], r["loss"]))["candidate"],
        "loss": min(scored, key=lambda r: (r["loss"], -r["accuracy"]))["candidate"],
        "se-loss": min(near, key=lambda r: r["loss"])["candidate"],
    }


def flags(row: dict, refit: bool = False) -> list[str]:
    """`graft train`'s options for a compare.json row; `refit`: an extract pick's head fitted
    again with the val images, as `--auto`'s final training does since stop 46."""
    f = ["--backbone", row["backbone"], "--strategy", row["strategy"]]
    if refit and row["strategy"] == "extract":
        f += ["--refit"]
    if row["unfreeze_last"]:
        f += ["--unfreeze-last", str(row["unfreeze_last"])]
    if row["cache_views"]:
        f += ["--cache-views", str(row["cache_views"])]
    return f + (["--keep", "last"] if row["strategy"] != "extract" else [])


def unseen(
    work: Path, env: dict, set_: str, seed: int, row: dict, cache: Path, refit: bool = False
) -> float:
    key = "".join(c if c.isalnum() else "_" for c in row["candidate"])
    out = work / ("rules-refit" if refit else "rules") / f"{set_}-s{seed}-{key}"
    done = out / "unseen.json"
    if done.exists():
        return json.loads(done.read_text())["accuracy"]
    data, graft = work / "data" / set_, [sys.executable, "-m", "graft"]
    train = ["train", str(data / "train"), "--out", str(out), "--overwrite"]
    train += ["--cache-dir", str(cache), "--seed", str(seed), *flags(row, refit)]
    subprocess.run([*graft, *train], env=env, check=True, capture_output=True)
    ev = subprocess.run(
        [*graft, "evaluate", str(out), str(data / "test"), "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    acc = json.loads(ev.stdout)["accuracy"]
    done.write_text(json.dumps({"accuracy": acc}))
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("labels", nargs="+")
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-quality"))
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    ap.add_argument(
        "--refit",
        action="store_true",
        help="retrain every pick (the run's own too) with an extract pick's head refitted with val",
    )
    ap.add_argument("--rules", default=",".join(RULES), help="the rules to score, e.g. acc,low")
    args = ap.parse_args()
    rules = args.rules.split(",")
    unknown = set(rules) - set(RULES)
    if unknown:
        raise SystemExit(f"unknown rule(s) {', '.join(sorted(unknown))}: choose from {RULES}")
    env = dict(os.environ, PYTHONPATH=str(args.src))
    lines = []
    print("set      seed " + " ".join(f"{r:>8}" for r in rules) + "  picks (when not the run's)")
    for label in args.labels:
        seed = int(label.rsplit("s", 1)[1])
        results = {
            r["set"]: r for r in json.loads((args.work / f"results-{label}.json").read_text())
        }
        for run in sorted((args.work / label).iterdir()):
            compare = run / "run-auto" / "compare.json"
            if not compare.exists() or run.name not in results:
                continue
            rows = json.loads(compare.read_text())["rows"]
            by_name = {r["candidate"]: r for r in rows}
            picked = {r: c for r, c in picks(rows).items() if r in rules}
            line = {}
            made = results[run.name]["chosen"]  # the pick the run made, under its own rule
            for rule, cand in picked.items():
                if cand == made and not args.refit:
                    line[rule] = results[run.name]["unseen"]
                else:
                    line[rule] = unseen(
                        args.work,
                        env,
                        run.name,
                        seed,
                        by_name[cand],
                        run / "cache-auto",
                        args.refit,
                    )
            lines.append(line)
            other = {r: c for r, c in picked.items() if c != made}
            print(
                f"{run.name:8} {seed:4} "
                + " ".join(f"{line[r]:8.4f}" for r in rules)
                + "  "
                + "; ".join(f"{r}: {c}" for r, c in other.items()),
                flush=True,
            )
    print(
        "mean          "
        + " ".join(f"{sum(x[r] for x in lines) / len(lines):8.4f}" for r in rules)
        + f"  ({len(lines)} runs)"
    )


if __name__ == "__main__":
    main()
