"""The `graft` command: each command parses its flags, calls one library function, renders."""

from __future__ import annotations

import atexit
import difflib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ..core.constants import ONNX_OPSET
from ..core.errors import GraftError
from . import data as cli_data
from . import options, render
from . import train as cli_train

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Teach a pretrained image network new classes from a folder of images.",
)
datasets_app = typer.Typer(no_args_is_help=True, help="Fetch public example datasets.")
app.add_typer(datasets_app, name="datasets")
log = logging.getLogger("graft")

# the commands that train (train.py), first in --help
app.command()(cli_train.train)
app.command()(cli_train.compare)


@app.command()
def predict(
    run_dir: Annotated[
        Path, typer.Argument(help="Run folder from graft train, or an exported .onnx file.")
    ],
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    top_k: Annotated[
        int, typer.Option(min=1, help="Classes per image (at most the class count).")
    ] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list on stdout.")] = False,
    as_csv: Annotated[
        bool, typer.Option("--csv", help="CSV: path,rank,class,probability.")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: Annotated[str, typer.Option()] = "auto",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write the rows to FILE.csv or FILE.jsonl as they come (long jobs), not stdout."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="--out exists: skip the files it holds, append.")
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="auto: ONNX Runtime on a CPU once the images pay for the one-time export "
            "(cached), else PyTorch; or torch, onnxruntime."
        ),
    ] = "auto",
) -> None:
    """Class probabilities for images; unreadable files are reported, not fatal."""
    from ..core.dist import from_env, process_group
    from ..data.discovery import expand_inputs

    if as_json and as_csv:
        raise typer.BadParameter("--json and --csv each choose the output: give one of them")
    if out is not None and (as_json or as_csv):
        raise typer.BadParameter(
            "--out's suffix chooses its format (.csv, .jsonl): drop --json/--csv"
        )
    if resume and out is None:
        raise typer.BadParameter("--resume goes on with an --out file: name it")
    paths = expand_inputs(inputs)
    d = from_env()
    with process_group(d):
        errors = _predict(
            d, run_dir, paths, top_k, as_json, as_csv, batch_size, device, out, resume, engine
        )
    if errors:
        if d.is_main:
            typer.echo(f"{errors} file(s) could not be read", err=True)
        raise typer.Exit(1)


def _predict(d, run_dir, paths, top_k, as_json, as_csv, batch_size, device, out, resume, engine):
    """predict's work, in one process or as one of a torchrun job's (each process a share of the
    files; rank 0 writes the output): the count of files that could not be read."""
    from ..core.dist import barrier
    from ..core.runtime import no_progress
    from ..inference.engines import AUTO_MIN_IMAGES, load_for
    from ..workflows.predict import predict_gathered, predict_sharded, predict_to_file

    if not d.is_main:  # rank 0 exports the model first, if the engine needs an export
        barrier(d, "loading the model")
    clf, why = load_for(run_dir, len(paths), engine, device, local_rank=d.local_rank)
    if d.is_main:
        barrier(d, "loading the model")
        (log.info if len(paths) >= AUTO_MIN_IMAGES else log.debug)("engine %s", why)
    progress = render.progress if d.is_main else no_progress
    if out is not None:
        kw = dict(resume=resume, top_k=top_k, batch_size=batch_size, progress=progress)
        if d.enabled:
            done = predict_sharded(clf, paths, out, d, **kw)
        else:
            done = predict_to_file(clf, paths, out, **kw)
        skipped = f", {done.skipped} already in it" if done.skipped else ""
        if d.is_main:
            typer.echo(f"{out}: {done.predicted} file(s) predicted{skipped}", err=True)
        return done.errors
    if d.enabled:
        results = predict_gathered(clf, paths, d, top_k=top_k, batch_size=batch_size)
    else:
        results = clf.predict_files(paths, top_k=top_k, batch_size=batch_size)
    if d.is_main:
        render.predictions(results, "json" if as_json else "csv" if as_csv else "text")
    return sum(bool(r.error) for r in results)


@app.command()
def evaluate(
    run_dir: Annotated[
        Path, typer.Argument(help="Run folder from graft train, or an exported .onnx file.")
    ],
    data_dir: Annotated[
        Path, typer.Argument(help="Class folders (or a folder with test/ or val/).")
    ],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    device: Annotated[str, typer.Option()] = "auto",
    labels: options.Labels = None,
    path_column: options.PathColumn = None,
    label_column: options.LabelColumn = None,
) -> None:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix on labelled images
    (with --labels: the table's test rows, else its val rows, else all)."""
    from ..inference.classifier import load_classifier

    model = load_classifier(run_dir, device=device)
    report = model.evaluate(data_dir, labels, path_column, label_column)
    if as_json:
        render.as_json(report)
    else:
        render.evaluation(report)


@app.command()
def thresholds(
    run_dir: Annotated[Path, typer.Argument(help="Run folder from graft train.")],
    target: Annotated[
        list[str] | None,
        typer.Option(help="CLASS:recall=X or CLASS:precision=X (repeatable, or a,b)."),
    ] = None,
    clear: Annotated[
        bool, typer.Option("--clear", help="Back to the plain arg-max for every class.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Per-class operating points of a saved run, chosen on the held-out scores it kept (no
    training); what no class claims is decided 'review'. Without --target: the current ones."""
    from ..models.modelfile import read_meta
    from ..workflows.decisions import set_targets

    targets = [t.strip() for v in target or [] for t in v.split(",") if t.strip()]
    if targets and clear:
        raise typer.BadParameter("--clear removes the targets that --target sets: give one")
    meta = set_targets(run_dir, targets) if targets or clear else read_meta(run_dir)
    if as_json:
        render.as_json({"decision": meta.decision, "val": (meta.val or {}).get("decisions")})
    else:
        render.operating_point(meta.decision, (meta.val or {}).get("decisions"))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder from graft train.")],
    data: Annotated[
        Path | None, typer.Option(help="Where the run's images are now, if they moved.")
    ] = None,
    audit: Annotated[
        Path | None,
        typer.Option(
            help="A graft audit folder: its issues marked on the top losses "
            "(default: ./audit, if it audited this run's data folder)."
        ),
    ] = None,
) -> None:
    """Write report.html, report.json and the figures (PNG) into the run folder."""
    from ..core.runfolder import REPORT_HTML
    from ..outputs.report import build_report

    result = build_report(run_dir, data, audit=audit)
    render.out(f"{Path(run_dir) / REPORT_HTML}  ({result['build_seconds']:.1f}s)")


@app.command()
def explain(
    run_dir: Annotated[Path, typer.Argument(help="Run folder from graft train.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    method: Annotated[
        str, typer.Option(help="gradcam (fast) | shap (signed Shapley values)")
    ] = "gradcam",
    classes: Annotated[int, typer.Option(min=1, help="Heatmaps for the top K classes.")] = 2,
    out: Annotated[Path, typer.Option(help="Folder for the figures.")] = Path("explanations"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
) -> None:
    """One figure per image: the image, then a heatmap per top class with its probability."""
    from ..data.discovery import expand_inputs
    from ..inference.classifier import Classifier
    from ..inference.explain import explain_files

    clf = Classifier.load(run_dir, device=device)
    for path in explain_files(clf, expand_inputs(images), out, method, classes):
        render.out(str(path))


@app.command()
def serve(
    run_dir: Annotated[Path, typer.Argument(help="Run folder from graft train.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    device: Annotated[str, typer.Option()] = "auto",
    engine: Annotated[
        str,
        typer.Option(help="auto: ONNX Runtime on a CPU (the run's cached export), else PyTorch."),
    ] = "auto",
) -> None:
    """Serve the classifier over HTTP: POST /predict with image files, GET /health, /classes."""
    from ..serve.app import serve as run_server

    run_server(run_dir, host, port, device, engine)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder from graft train.")],
    format: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Output file (default RUN/model.onnx).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or newer).")] = ONNX_OPSET,
    dynamic_batch: Annotated[
        bool, typer.Option("--dynamic-batch/--no-dynamic-batch", help="Any batch size.")
    ] = True,
) -> None:
    """Export the model (normalisation inside, softmax out) and check it against PyTorch."""
    from ..inference.export import export as run_export

    if format != "onnx":
        raise typer.BadParameter(f"unknown format {format!r}; graft exports onnx")
    result = run_export(run_dir, out, opset, dynamic_batch)
    render.export_result(result)


# data and backbone commands (data.py), after the model commands in --help
app.command()(cli_data.verify)
app.command()(cli_data.audit)
app.command()(cli_data.suggest)
app.command()(cli_data.backbones)
datasets_app.command("fetch")(cli_data.datasets_fetch)


def main() -> None:
    """Entry point: known errors become one line and exit code 2; GRAFT_DEBUG=1 shows tracebacks.

    Usage errors (unknown option, bad value, missing argument) print the usage line and one line
    naming the problem, exit 2; bare `graft` prints the help. Typer raises its own copies of
    click's exceptions (typer.TyperException, typer.Exit, typer.Abort): those are caught here.
    """
    debug = bool(os.environ.get("GRAFT_DEBUG"))
    if (sys.stdout.encoding or "").lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(encoding="utf-8")  # JSON and CSV are UTF-8 whatever the locale
    logging.basicConfig(  # libraries at WARNING; graft's own progress at INFO
        level=logging.WARNING,
        format="%(levelname)s %(message)s" if debug else "%(message)s",
        stream=sys.stderr,
    )
    log.setLevel(logging.INFO)
    _exit(_run(debug))


def _run(debug: bool) -> int:
    """The command's exit code: 0, its own, 2 for a known error or a usage error, 130 when
    interrupted."""
    try:
        # standalone_mode=False: an Exit's code is returned, errors are raised to be shown here
        code = app(standalone_mode=False, prog_name="graft")
    except GraftError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:  # usage errors: usage line + "Error: ...", exit 2
        if debug:
            raise
        if getattr(exc, "possibilities", None):  # click offers --out for --bogus: only close ones
            exc.possibilities = [
                p
                for p in exc.possibilities
                if difflib.SequenceMatcher(None, exc.option_name, p).ratio() >= 0.75
            ]
        exc.show()
        return exc.exit_code
    return code if isinstance(code, int) else 0


def _exit(code: int) -> NoReturn:
    """End the process with `code` as sys.exit does, less the teardown of every module: with
    torch loaded that teardown is about 1 s of every command (`python -c "import torch,
    torch._dynamo"`: 3.76 s, 2.68 s ending this way, on the 2-core dev machine). What a normal
    exit does that matters still happens: the atexit functions (logging's flush, trackers,
    worker processes), then the standard streams flushed. Where another thread still runs,
    Python's own exit waits for it as usual."""
    if threading.active_count() > 1:
        sys.exit(code)
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (graft predict | head): nothing to save
                pass
        os._exit(code)


if __name__ == "__main__":
    main()
