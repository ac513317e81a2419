"""The one routine that writes a torch module to an ONNX file: graft's exported classifier
(inference/export.py) and the frozen extractor ONNX Runtime runs (frozen/runners.py) both use it.

torch's dynamo exporter, input `image` (N x 3 x size x size), any batch size up to 4096 unless
told otherwise, the weights inside the file, the exporter's warnings and progress kept quiet.
onnx and onnxscript come from the `graft[export]` extra.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..core.constants import ONNX_OPSET
from ..core.errors import ConfigError

log = logging.getLogger(__name__)

MAX_BATCH = 4096  # the dynamic batch dimension's upper bound, as the exporter asks for one


def supported_opsets() -> range:
    """The opsets an export can target: the dynamo exporter writes 18 and newer, up to what the
    installed onnx package knows."""
    import onnx

    return range(ONNX_OPSET, onnx.defs.onnx_opset_version() + 1)


def check_opset(opset: int) -> None:
    """Refuse an opset the exporter would not really write (it falls back to 18 silently)."""
    ok = supported_opsets()
    if opset not in ok:
        raise ConfigError(
            f"opset {opset} is not supported: choose {ok.start} to {ok.stop - 1} "
            f"(default {ONNX_OPSET})"
        )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    size: int,
    output: str | list[str],
    *,
    opset: int = ONNX_OPSET,
    dynamic_batch: bool = True,
) -> None:
    """Write `model` (eval, float32) to `path` as one self-contained ONNX file. The exporter's
    own exceptions propagate: callers say what failed in their terms."""
    check_opset(opset)
    x = torch.rand(2, 3, size, size)
    kw = {}
    if dynamic_batch:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter warns and prints its progress
        torch.onnx.export(
            model.float().eval(),
            (x,),
            str(path),
            dynamo=True,
            verbose=False,
            input_names=["image"],
            output_names=[output] if isinstance(output, str) else list(output),
            opset_version=opset,
            external_data=False,
            **kw,
        )
