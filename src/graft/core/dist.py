"""Many processes under torchrun: this process's place (rank, local rank, world size) from the
environment torchrun sets, the process group (NCCL on GPUs, gloo on CPUs) set up once and torn
down at the end and on errors, and the few collectives graft needs, each with a timeout so that
a dead process ends the others with a message instead of a hang. One process: all no-ops.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import GraftError

TIMEOUT_S = int(os.environ.get("GRAFT_DIST_TIMEOUT", "600"))  # a collective waits this long


class DistError(GraftError):
    """Another process of the job failed, or the group could not be formed."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder and prints."""
        return self.rank == 0


def from_env() -> Dist:
    """The place torchrun gave this process (RANK, LOCAL_RANK, WORLD_SIZE); one process without."""
    try:
        return Dist(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
        )
    except ValueError as exc:
        raise DistError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers ({exc})") from exc


@contextlib.contextmanager
def process_group(d: Dist) -> Iterator[None]:
    """The process group for the duration of a run (nothing when there is one process)."""
    import torch.distributed as dist

    if not d.enabled or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(d.local_rank)
    try:
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=TIMEOUT_S))
    except Exception as exc:  # rendezvous failures come in many types
        raise DistError(f"cannot form the process group ({backend}): {exc}") from exc
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def collective_errors(what: str) -> Iterator[None]:
    """A collective that fails (a peer died, a timeout) becomes one line saying so. Without a
    process group there is no peer to blame: errors pass through as they are."""
    import torch.distributed as dist

    try:
        yield
    except RuntimeError as exc:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DistError(
            f"another process of this torchrun job failed or stopped answering "
            f"while {what} ({first[:200]}); resume with the same torchrun command "
            "and --resume RUN"
        ) from exc


def barrier(d: Dist, what: str = "waiting for the others") -> None:
    if d.enabled:
        import torch.distributed as dist

        with collective_errors(what):
            dist.barrier()


def broadcast(d: Dist, value: Any, what: str = "sharing the config") -> Any:
    """Rank 0's value, on every rank (a picklable object from a trusted peer of this job)."""
    if not d.enabled:
        return value
    import torch.distributed as dist

    box = [value if d.is_main else None]
    with collective_errors(what):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(d: Dist, value: Any, what: str = "gathering results") -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    if not d.enabled:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world
    with collective_errors(what):
        dist.all_gather_object(out, value)
    return out


def wrap(d: Dist, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in DistributedDataParallel for training (its trainable parameters' gradients
    averaged across ranks, buffers such as BatchNorm statistics broadcast from rank 0 at each
    step); the model itself with one process. Wrap again when the trainable set changes."""
    if not d.enabled or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def sync_buffers(d: Dist, model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: DDP broadcasts them before
    each training step, but each rank's last step updates its own copy; validating with mixed
    statistics would score a model that no rank saves."""
    if not d.enabled:
        return
    import torch.distributed as dist

    with collective_errors("sharing BatchNorm statistics"):
        for buf in model.buffers():
            dist.broadcast(buf.data, src=0)


def shard(items: list, d: Dist) -> list:
    """This rank's share: every world-th item from its rank (disjoint, together all items)."""
    return items[d.rank :: d.world] if d.enabled else list(items)


def block(items: list, d: Dist) -> list:
    """This rank's share as one run of consecutive items (disjoint; in rank order, together all
    items in their order): what predict uses, so rank 0 merges the outputs by concatenation."""
    if not d.enabled:
        return list(items)
    per, extra = divmod(len(items), d.world)
    start = d.rank * per + min(d.rank, extra)
    return list(items[start : start + per + (d.rank < extra)])
