"""Graft's exception types: every error a user can cause has one, and its message names the fix.

The CLI turns any `GraftError` into one line on stderr and a non-zero exit code; library callers can
catch the specific classes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GraftError(Exception):
    """Base class: the message is complete and meant for the user."""


class ConfigError(GraftError):
    """A configuration value or key is wrong."""


class DatasetError(GraftError):
    """The data folder's layout or its files are unusable."""


class ImageError(DatasetError):
    """One image file cannot be used; `path` and `reason` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class BackboneError(GraftError):
    """A backbone name, its weights or its blocks are unusable."""


class CheckpointError(GraftError):
    """A model or checkpoint file is missing, damaged or not graft's."""


def did_you_mean(value: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean: a, b?)' for the closest choices, or '' when none is close."""
    close = difflib.get_close_matches(value, list(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""
