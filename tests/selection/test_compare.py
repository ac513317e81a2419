"""`graft compare` and `graft train --auto`: a row per candidate, the budget honoured, and a
selection protocol that never lets a scored image take part in a choice."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import graft
from graft.core.errors import BackboneError, ConfigError
from graft.core.metrics import wilson_interval
from graft.core.runfolder import COMPARE_HTML, COMPARE_JSON, MODEL_META, MODEL_WEIGHTS
from graft.data.splits import stratified_folds
from graft.selection.compare import Candidate, _ranked, default_grid, parse_budget
from graft.selection.crossval import Trials

from ..conftest import make_shapes

LITE0 = ["efficientnet_lite0"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("cmp"), n_train=10, n_val=5, seed=3)


@pytest.fixture(scope="module")
def swapped(small, tmp_path_factory) -> Path:
    """The same training images; val/ with every class folder's images moved to another class.
    A protocol that chose anything on val would choose differently here."""
    root = tmp_path_factory.mktemp("swapped")
    shutil.copytree(small / "train", root / "train")
    names = sorted(p.name for p in (small / "val").iterdir())
    for a, b in zip(names, names[1:] + names[:1]):
        shutil.copytree(small / "val" / a, root / "val" / b)
    return root


def _scores(rows):
    return [(r["candidate"], r["status"], r["accuracy"]) for r in rows]


def test_stratified_folds_partition_every_class_evenly():
    samples = [(f"{c}/{i}.png", c) for c in range(3) for i in range(11)]
    folds = stratified_folds(samples, 5, seed=0)
    flat = sorted(i for f in folds for i in f)
    assert flat == list(range(33))  # disjoint and complete
    for f in folds:
        per_class = [sum(samples[i][1] == c for i in f) for c in range(3)]
        assert all(n in (2, 3) for n in per_class)
    assert folds == stratified_folds(samples, 5, seed=0) != stratified_folds(samples, 5, seed=1)


def test_the_ranking_is_by_the_accuracy_intervals_low_end_then_held_out_loss_then_cost():
    def row(name, right, loss, status="scored", of=100):
        if status != "scored":
            return {"candidate": name, "accuracy": None, "loss": None, "status": status}
        ci = list(wilson_interval(right, of))
        return {"candidate": name, "accuracy": right / of, "accuracy_ci95": ci, "loss": loss,
                "status": status, "scored_images": of}  # fmt: skip

    # cheapest first, as compare runs them
    rows = [
        row("a", 95, 0.30),
        row("b", 95, 0.20),
        row("c", 97, 0.50),  # one more image right, a worse loss: first
        row("d", 95, 0.20),
        row("e", None, None, "stopped"),
        row("f", 96, 0.20),  # b's and d's loss, a better accuracy
        row("g", 95, float("nan")),  # a loss that is no number loses the accuracy tie
        row("h", 20, 0.01, of=20),  # all right, but on one fold of five: not above 96 of 100
        row("i", 19, 0.01, of=20),  # 0.95 on 20 is weaker evidence than 0.95 on 100
    ]
    ranked = _ranked(rows)
    assert [r["candidate"] for r in ranked] == ["c", "f", "b", "d", "a", "g", "h", "i", "e"]
    assert [r.get("rank") for r in ranked] == [1, 2, 3, 4, 5, 6, 7, 8, None]
    # the run that showed it (photos2, seed 2): finetune's 26 of 26 on one fold ranked first, and
    # scored 3.75 points below the extract candidate's 127 of 128 on the unseen images
    one_fold, all_folds = row("finetune", 26, 0.24, of=26), row("extract", 127, 0.03, of=128)
    assert [r["candidate"] for r in _ranked([one_fold, all_folds])] == ["extract", "finetune"]


def test_compare_scores_every_candidate_on_the_training_images_alone(small, swapped):
    rows = graft.compare(small, budget="10m", backbones=LITE0, strategies=["extract"], workers=0)
    assert [r["candidate"] for r in rows] != [] and len(
        rows
    ) == 2  # extract, with and without views
    assert {r["candidate"] for r in rows} == {
        "efficientnet_lite0 extract",
        "efficientnet_lite0 extract (+4 views)",
    }
    for r in rows:
        assert r["status"] == "scored" and r["folds"] == 5 and r["scored_images"] == 30
        assert r["accuracy"] >= 0.8, r  # the shapes are easy
        lo, hi = r["accuracy_ci95"]
        assert lo <= r["accuracy"] <= hi
        assert 0 < r["loss"] < 1.0, r  # the held-out cross-entropy: the tie-break
    assert rows[0]["rank"] == 1 and rows.chosen is rows[0]
    assert (-rows[0]["accuracy"], rows[0]["loss"]) <= (-rows[1]["accuracy"], rows[1]["loss"])
    # val/ with its labels swapped changes nothing: it took no part
    again = graft.compare(swapped, budget="10m", backbones=LITE0, strategies=["extract"], workers=0)
    assert _scores(again) == _scores(rows)


def test_the_budget_runs_the_cheapest_first_and_says_what_it_skipped(small, monkeypatch):
    monkeypatch.setattr(
        Trials, "forward_seconds", lambda self, name, training=False: 0.05
    )  # a known cost model
    seen = []
    rows = graft.compare(
        small,
        budget="30s",
        backbones=LITE0,
        strategies=["finetune", "extract"],
        workers=0,
        on_row=seen.append,
    )
    assert [r["candidate"] for r in seen] == [
        "efficientnet_lite0 extract",
        "efficientnet_lite0 extract (+4 views)",
        "efficientnet_lite0 finetune",
    ]
    status = {r["candidate"]: r for r in rows}
    assert status["efficientnet_lite0 extract"]["status"] == "scored"
    skipped = status["efficientnet_lite0 finetune"]
    assert skipped["status"] == "skipped" and skipped["note"].startswith("needs about 37 s")
    assert rows[-1] is skipped  # scored rows first
    with pytest.raises(
        ConfigError,
        match=r"the budget leaves \d+ s and the cheapest candidate "
        r"\(efficientnet_lite0 extract\) needs about \d+ s here: give more",
    ):
        graft.compare(small, budget="1s", backbones=LITE0, strategies=["extract"], workers=0)


def test_auto_trains_the_winner_on_train_and_scores_val_once(small, swapped, tmp_path):
    kw = dict(
        auto=True, budget="10m", backbones=LITE0, strategies=["extract"], workers=0, report=True
    )
    run = graft.train(small, out=str(tmp_path / "a"), **kw)
    meta = json.loads((run.run_dir / MODEL_META).read_text())
    table = json.loads((run.run_dir / COMPARE_JSON).read_text())
    assert meta["selection"]["chosen"] == table["chosen"] == run.selection["chosen"]
    assert meta["config"]["keep"] == "last" and meta["val"]["protocol"].startswith("unbiased")
    assert meta["best"]["head"] == "fit" and run.history == []  # val chose nothing
    assert run.val_accuracy >= 0.8
    probs = graft.load(run.run_dir).predict([small / "val" / "circle" / "000.png"])[0]
    assert set(probs) == {"circle", "square", "triangle"}
    html = (run.run_dir / "report.html").read_text()
    assert "How good is it really" in html and table["chosen"] in html and "unbiased" in html
    assert (run.run_dir / COMPARE_HTML).is_file()
    # the winner, a fitted head, is saved fitted again with the val images (AUTO_REFIT)
    assert run.config.refit is True and meta["best"]["refit"]["images"] == 30 + 15
    assert meta["selection"]["retrained"].endswith("then the head fitted again with the val images")
    # by construction: val swapped, the same choice and the very same weights (without the
    # refit, which trains on val); only the reported number moves, to what a swapped val deserves
    kw.update(refit=False, report=False)
    one = graft.train(small, out=str(tmp_path / "b"), **kw)
    other = graft.train(swapped, out=str(tmp_path / "c"), **kw)
    assert other.selection["chosen"] == one.selection["chosen"] == run.selection["chosen"]
    a, b = load_file(one.run_dir / MODEL_WEIGHTS), load_file(other.run_dir / MODEL_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert one.val_accuracy == run.val_accuracy and other.val_accuracy <= 0.2


def test_bad_grids_and_budgets_are_one_line_errors(small, tmp_path):
    with pytest.raises(BackboneError, match="efficientnet_lite0"):
        default_grid(["efficientnet_lite9"])
    with pytest.raises(
        ConfigError,
        match="unknown strategy 'fine' in the grid; choose from extract, finetune, partial",
    ):
        default_grid(LITE0, ["fine"])
    for bad in ("0", "abc", "-5m", ""):
        with pytest.raises(
            ConfigError, match="budget must be a positive duration like 300s, 5m or 1h"
        ):
            parse_budget(bad)
    assert parse_budget("90s") == 90 and parse_budget("1.5h") == 5400
    with pytest.raises(
        ConfigError,
        match=r"20-fold selection needs at least 20 training images "
        r"per class; too few in: circle \(10\).*--folds 10",
    ):
        graft.compare(small, folds=20, backbones=LITE0)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "graft",
            "compare",
            str(small),
            "--budget",
            "abc",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: budget must be a positive duration like 300s, 5m or 1h, got 'abc'"
    )
    r = subprocess.run(
        [sys.executable, "-m", "graft", "train", str(small), "--auto", "--strategy", "finetune"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: --strategy: the comparison chooses these per candidate "
        "(keeping each model's last epoch); limit the choice with "
        "--backbones and --strategies, or train one model without --auto"
    )
    assert "Traceback" not in r.stderr


def test_candidates_honour_the_settings_given_and_keep_the_last_epoch():
    cfg = Candidate("efficientnet_lite0", "partial", unfreeze_last=4).config(
        graft.make_config("x", strategy="extract", epochs=99, lr=0.5)
    )
    assert (cfg.strategy, cfg.unfreeze_last, cfg.keep, cfg.patience) == ("partial", 4, "last", 0)
    resolved = cfg.resolve()
    assert (resolved.epochs, resolved.lr, resolved.optimizer) == (99, 0.5, "sgd")  # sgd: default
    with pytest.raises(ConfigError, match="--patience lets the val split choose"):
        graft.make_config("x", keep="last", patience=2)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"keep": "best"}, "--keep: the comparison chooses these per candidate"),
        ({"patience": 3, "cache_views": 2}, "--cache-views, --patience: the comparison chooses"),
        (
            {"warmup_epochs": 2},
            "the candidate efficientnet_lite0 extract cannot honour the "
            "settings given: --warmup-epochs is ignored with --strategy extract",
        ),
        (
            {"optimizer": "adam", "momentum": 0.5},
            "the candidate efficientnet_lite0 extract cannot "
            "honour the settings given: --momentum is ignored with --optimizer adam",
        ),
    ],
)
def test_a_setting_some_candidate_would_drop_is_refused(small, options, message):
    with pytest.raises(ConfigError) as err:
        graft.compare(small, backbones=LITE0, strategies=["extract", "finetune"], **options)
    assert message in str(err.value)
    with pytest.raises(ConfigError, match="--backbones has an empty item"):
        graft.compare(small, backbones=[" ", ""])


def test_auto_trains_every_candidate_with_the_epochs_given(small, tmp_path):
    run = graft.train(
        small,
        out=str(tmp_path / "r"),
        auto=True,
        budget="10m",
        backbones=LITE0,
        strategies=["extract"],
        epochs=3,
        lr=0.01,
        workers=0,
        report=False,
    )
    rows = run.selection["rows"]
    assert [r["settings"]["epochs"] for r in rows] == [3, 3]
    assert {r["settings"]["lr"] for r in rows} == {0.01}
    assert len(run.history) == 3 and run.config.lr == 0.01 and run.config.keep == "last"
    assert run.config.refit is None  # an epoch-trained head is not refitted


def test_partial_on_cached_activations_is_scored_on_every_fold_finetune_on_the_first(
    small, monkeypatch
):
    """...partial's and finetune's heads starting fitted (LP-FT, their default) on each fold's
    training images alone: never on the images that fold scores."""
    import graft.selection.crossval as crossval

    starts = []
    real = crossval.start_fitted

    def recorded(cfg, head, fs, classes, samples=None):
        starts.append(set(samples))
        return real(cfg, head, fs, classes, samples)

    monkeypatch.setattr(crossval, "start_fitted", recorded)
    rows = graft.compare(
        small,
        budget="10m",
        backbones=LITE0,
        strategies=["partial", "finetune"],
        workers=0,
        image_size=64,
    )
    by = {r["strategy"]: r for r in rows}
    assert set(by) == {"partial", "finetune"}
    assert all(r["status"] == "scored" for r in rows), rows
    assert (by["finetune"]["folds"], by["finetune"]["scored_images"]) == (1, 6)
    assert (by["partial"]["folds"], by["partial"]["scored_images"]) == (5, 30)
    assert by["partial"]["unfreeze_last"] == 4  # the last third of lite0's 11 blocks
    assert by["partial"]["trainable_params"] < by["finetune"]["trainable_params"]
    assert by["partial"]["settings"]["head"] == by["finetune"]["settings"]["head"] == "fit"
    pool = graft.discover(small).train
    trained = [frozenset(pool) - {pool[i] for i in fold} for fold in stratified_folds(pool, 5, 0)]
    # partial's five folds and finetune's first, each fitted on that fold's training images
    assert Counter(map(frozenset, starts)) == Counter([*trained, trained[0]])


def test_an_interrupted_comparison_keeps_the_rows_scored(small, tmp_path):
    def stop(row):
        raise KeyboardInterrupt  # Ctrl-C right after the first candidate

    rows = graft.compare(
        small, budget="10m", backbones=LITE0, strategies=["extract"], workers=0, on_row=stop
    )
    assert rows.interrupted and rows.to_dict()["interrupted"] is True
    assert [r["status"] for r in rows] == ["scored"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "graft",
            "compare",
            str(small),
            "--backbones",
            ",",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--backbones has an empty item" in r.stderr, r.stderr


def test_the_default_grid_puts_the_offline_backbones_side_by_side():
    from graft.models.backbones import list_backbones

    offline = [b.name for b in list_backbones() if b.offline]
    joined = [(c.backbone, c.strategy) for c in default_grid() if "+" in c.backbone]
    assert joined == ([("+".join(offline), "extract")] if len(offline) > 1 else [])
    assert not [c for c in default_grid(LITE0) if "+" in c.backbone]  # named: as named
