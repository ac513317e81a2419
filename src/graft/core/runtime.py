"""Runtime: device, precision and memory layout resolved once; seeding, signals, atomic writes."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: `graft --help` needs none of it
    import torch

from .errors import ConfigError, GraftError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_TMP_PREFIX = ".graft-tmp-"

Progress = Callable[[Iterable, str, int], Iterable]  # (iterable, label, total) -> iterable


def no_progress(it: Iterable, desc: str, total: int) -> Iterable:
    return it


@dataclass(frozen=True)
class Runtime:
    """Where tensors live and in which precision the forward pass runs; the loop never branches."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: plain fp32

    @property
    def precision(self) -> str:
        import torch

        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def channels_last(self) -> bool:
        # oneDNN and cuDNN convolutions are fastest in NHWC; MPS gains nothing from it.
        return self.device.type in ("cpu", "cuda")

    @property
    def memory_format(self) -> torch.memory_format:
        import torch

        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this device, in this runtime's memory layout (in place, returned)."""
        return model.to(self.device, memory_format=self.memory_format)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on this device; image batches (N, C, H, W) in this runtime's layout."""
        if x.dim() == 4:
            return x.to(self.device, memory_format=self.memory_format, non_blocking=True)
        return x.to(self.device, non_blocking=True)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def resolve_runtime(
    device: str = "auto", precision: str = "auto", training: bool = False, local_rank: int = 0
) -> Runtime:
    """Pick the device (cuda, then mps, then cpu) and the autocast dtype it supports.

    On a CPU, `auto` means bf16 for inference only where the CPU has native bf16: on a 2-core
    AVX512-BF16 EPYC (lite0) bf16 about doubled forward throughput but slowed training steps
    (17.3 vs 20.1 img/s at batch 16, `python bench/train_step.py`), so training stays fp32.

    >>> resolve_runtime("cpu", "fp32").device.type
    'cpu'
    """
    import torch

    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is visible; use cpu")
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError(
            "device 'mps' was asked for but this machine has no Apple GPU (MPS); use cpu or auto"
        )
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device(device)
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif dev.type == "cpu" and not training and cpu_has_fast_bf16():
            precision = "bf16"
        else:
            precision = "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype is torch.float16 and dev.type == "cpu":
        raise ConfigError("fp16 autocast is not supported on the CPU; use --precision bf16 or fp32")
    return Runtime(dev, dtype)


def default_workers() -> int:
    """DataLoader workers: leave one core to the main process, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


LOADER_TIMEOUT = 300  # seconds a loader worker may take for one batch before the run stops


def loader_workers(workers: int) -> dict:
    """DataLoader arguments for `workers` processes: a worker that hangs (a full disk, a stuck
    network drive) stops the run after LOADER_TIMEOUT instead of holding it forever."""
    return {"num_workers": workers, "timeout": LOADER_TIMEOUT if workers else 0}


@contextlib.contextmanager
def loader_errors() -> Iterator[None]:
    """A data-loading worker that died or timed out becomes one GraftError with the fix."""
    try:
        yield
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        first = lines[0] if lines else type(exc).__name__
        if first.startswith("Caught ImageError"):  # a file went bad after it was checked
            cause = lines[-1].split("ImageError: ", 1)[-1]
            raise GraftError(
                f"{cause}: the file changed or went missing during training; put "
                "it back, or remove it and train again"
            ) from exc
        if "DataLoader worker" in first or "DataLoader timed out" in first:
            raise GraftError(
                f"a data-loading worker failed ({first}); run again with --workers 0 to load "
                "in this process and see the cause"
            ) from exc
        raise


def default_cache_dir() -> Path:
    """Where cached features live: $GRAFT_CACHE_DIR, else ~/.cache/graft/features."""
    env = os.environ.get("GRAFT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "graft" / "features"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops like Ctrl-C (KeyboardInterrupt after the current batch), keeping what is
    saved. Only the main thread can install signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (the epoch's checkpoint and its row in
    metrics.csv are written together or not at all), then arrive as they would have. Off the main
    thread, or where the OS cannot hold signals, the block runs as it is."""
    hold = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "pthread_sigmask"
    ):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, hold)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, hold)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    A crash or an error leaves the previous file untouched and no half-written file behind.
    `durable=False` skips the fsyncs, for files that are checked on reading anyway (cache entries).
    A full disk is reported as "disk full while writing <path>", not as a library's internals.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a model must be readable like any file
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if durable:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if _is_disk_full(exc):
            raise GraftError(f"disk full while writing {path}; free some space and retry") from exc
        raise


def _umask() -> int:
    current = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(current)
    return current


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def clean_temp_files(folder: str | os.PathLike) -> int:
    """Remove temp files an interrupted atomic write left in `folder`; return how many."""
    removed = 0
    for p in Path(folder).glob(_TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed += 1
    return removed


def _is_disk_full(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "File too large" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def safe_filename(name: str, limit: int = 60) -> str:
    """A file-name part from any text (an image stem, a class name): no path separators, no
    leading dots, bounded length, so no name can make graft write outside its folder."""
    cleaned = re.sub(r"[^\w.-]+", "_", name, flags=re.UNICODE).lstrip(".")
    return cleaned[:limit] or "unnamed"
