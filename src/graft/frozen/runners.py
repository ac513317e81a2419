"""The engine a frozen extractor runs in: PyTorch (eager, BatchNorm folded) or ONNX Runtime.

On a CPU, ONNX Runtime runs the frozen lite0 in fp32 a little faster than PyTorch runs it in
bf16 now that BatchNorm is folded (3,000 small PNGs, cold, 2 cores: 100.9 against 94.4 images/s;
`python bench/extract_engines.py`; 108.1 against 58.4 on the demo before the folding).
`--engine auto` (the default) takes it when the images to extract pay for its one-time export
(features.choose_engine: from about 3,800 uncached images here); the network is exported once
per weights and preprocessing (2.6-5.3 s, kept beside the features), and its fp32 features are
cached under another key than PyTorch's bf16 ones. Each export is checked against eager PyTorch
fp32 on a probe batch (1e-4 relative), and any failure (an operator the exporter cannot handle,
a mismatch) falls back to PyTorch with one warning.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..core.config import ENGINES
from ..core.constants import FP32_PARITY
from ..core.errors import ConfigError
from ..core.runtime import Runtime, atomic_path

log = logging.getLogger(__name__)


def onnxruntime_available() -> bool:
    return all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript", "onnx"))


def resolve_engine(engine: str, runtime: Runtime, precision: str = "auto") -> str:
    """`engine` checked against the run: onnxruntime runs fp32 on the CPU and must be installed."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "torch":
        return engine
    if runtime.device.type != "cpu":
        raise ConfigError(
            f"--engine onnxruntime runs on the CPU; this run is on "
            f"{runtime.device.type}: leave --engine at torch"
        )
    if precision not in ("auto", "fp32"):
        raise ConfigError(
            f"--engine onnxruntime computes in fp32, not {precision}: drop "
            "--precision or use --engine torch"
        )
    if not onnxruntime_available():
        raise ConfigError(
            "--engine onnxruntime needs onnx, onnxruntime and onnxscript: "
            "pip install 'graft[export]', or use --engine torch"
        )
    return engine


def engine_runtime(engine: str, runtime: Runtime) -> Runtime:
    """The runtime features are computed in: ONNX Runtime's is the CPU in fp32 (so its features
    share the cache with PyTorch fp32 ones: the same numbers to well under the fp16 they are
    stored in)."""
    return Runtime(torch.device("cpu"), None) if engine == "onnxruntime" else runtime


def frozen_runner(
    net: nn.Module, size: int, runtime: Runtime, engine: str, export_dir: Path, key: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`net` (frozen, eval) as a function of an image batch, in `engine`."""
    if engine == "onnxruntime":
        try:
            return _OrtRunner(net, size, export_dir / f"{key}.onnx")
        except Exception as exc:  # the exporter and the runtime raise many types
            log.warning(
                "ONNX Runtime cannot run this network (%s); extracting with PyTorch",
                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
            )
    return runtime.prepare(net)


class _OrtRunner:
    """An ONNX Runtime session of `net`, exported to `path` once, checked against eager."""

    def __init__(self, net: nn.Module, size: int, path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception:  # not exported yet, or a damaged file: (re-)export it
            _export(net, size, path)
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            want = net.float()(x)
        err = float((self(x) - want).abs().max() / want.abs().max().clamp_min(1e-6))
        if not err <= FP32_PARITY:
            path.unlink(missing_ok=True)
            raise ValueError(f"its output differs from PyTorch's by {err:.1e} (relative)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()  # NCHW, as exported
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


def _export(net: nn.Module, size: int, path: Path) -> None:
    from ..models.onnx import export_onnx

    log.info("exporting the extractor to ONNX once (%s)", path.name)
    with atomic_path(path, durable=False) as tmp:
        export_onnx(net, tmp, size, "features")
