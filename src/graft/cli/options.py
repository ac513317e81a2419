"""The training settings as command-line options, generated from the config schema.

Each `TrainConfig` field carries its help text and choices once (core/config.py); `settings_options`
turns the fields into typer options of a command, so `graft train --help` and `graft compare
--help` cannot drift from the config. Every generated option defaults to None: unset, so the
config's own default (or the strategy's) applies and a YAML file's value is not overridden.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..core.config import TrainConfig

F = TypeVar("F", bound=Callable[..., Any])


def _field_help(name: str) -> str:
    return next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)


# the labels-table options of the commands that read a data folder without a training config
# (evaluate, audit), with train's help text
Labels = Annotated[Path | None, typer.Option(help=_field_help("labels"))]
PathColumn = Annotated[str | None, typer.Option(help=_field_help("path_column"))]
LabelColumn = Annotated[str | None, typer.Option(help=_field_help("label_column"))]

_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "tuple": list[str]}


def settings_options(exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """Decorator: the command's `**settings` become one option per `TrainConfig` field (but
    `data_dir` and `exclude`), passed to it by field name; unset options are None."""
    skip = {"data_dir", *exclude}

    def wrap(command: F) -> F:
        sig = inspect.signature(command, eval_str=True)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        params += [_parameter(f) for f in fields(TrainConfig) if f.name not in skip]
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return command

    return wrap


def _parameter(f: Field) -> inspect.Parameter:
    kind = _TYPES[str(f.type).split("[")[0].split(" ")[0]]  # a tuple: repeatable, or a,b
    flag = f.name.replace("_", "-")
    decls = [f"--{flag}/--no-{flag}"] if kind is bool else [f"--{flag}"]
    option = typer.Option(*decls, help=_help(f), show_default=False)
    return inspect.Parameter(
        f.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[kind | None, option],
    )


def _help(f: Field) -> str:
    text = f.metadata["help"]
    if f.metadata["choices"]:
        text += f" One of: {', '.join(f.metadata['choices'])}."
    if "(default:" not in text and f.default not in (MISSING, None, (), False):
        text += f" (default: {f.default})"
    return text
