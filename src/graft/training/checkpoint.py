"""The resume point: `last.safetensors` + `last.json`, everything needed to continue a run after
its last finished epoch (`save_last`, `restore_last`), written atomically, read without pickle.
This module is the only one that knows the format; the model files are models/modelfile.py's.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import CheckpointError
from ..core.runfolder import LAST_META, LAST_WEIGHTS, MODEL_META, MODEL_WEIGHTS
from ..core.runtime import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "graft-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = MODEL_WEIGHTS
META_FILE = MODEL_META


def save_last(
    run_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    stage: int,
    state: Any,
    generator: torch.Generator,
    world: int = 1,
) -> None:
    """Everything needed to continue after the epoch just finished, without pickle: tensors
    (model, best weights, optimizer buffers, RNG states) in safetensors, the rest in JSON.
    `state` is the loop's FitState. Weights first, JSON second: the JSON names the epoch only
    once its tensors are on disk."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for k, v in (state.best_state or {}).items():
        tensors[f"best.{k}"] = v
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                opt_scalars.setdefault(str(pid), {})[k] = v
    rng = _get_rng(generator)
    for name, value in rng.items():
        if torch.is_tensor(value):
            tensors[f"rng.{name}"] = value
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(Path(run_dir) / LAST_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        "format": FORMAT + "-last",
        "epoch": state.epoch,
        "stage": stage,
        "history": state.history,
        "best": state.best,
        "bad_epochs": state.bad_epochs,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {k: v for k, v in rng.items() if not torch.is_tensor(v)},
        "world_size": world,  # torchrun processes: a resume must use as many
    }
    atomic_write_text(Path(run_dir) / LAST_META, json.dumps(meta) + "\n")


@dataclass
class Resume:
    """A run's `last` checkpoint, read and checked: where training stopped and how to go on."""

    epoch: int  # epochs completed
    stage: int
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_state: dict[str, torch.Tensor] | None
    bad_epochs: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def restore(self, model: torch.nn.Module, generator: torch.Generator) -> None:
        """The model's weights and every random state (torch, python, numpy, data order)."""
        model.load_state_dict(prefixed(self.tensors, "model."))
        torch.set_rng_state(self.tensors["rng.torch"])
        generator.set_state(self.tensors["rng.generator"])
        saved = self.meta["rng"]
        random.setstate((saved["python"][0], tuple(saved["python"][1]), saved["python"][2]))
        n = saved["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), int(n[2]), int(n[3]), n[4]))

    def restore_optimizer(
        self, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any = None
    ) -> None:
        """Optimizer buffers, scheduler position and AMP loss scale of the stage in progress."""
        state: dict[int, dict[str, Any]] = {}
        for key, value in self.tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for pid, scalars in self.meta["optimizer"]["scalars"].items():
            state.setdefault(int(pid), {}).update(scalars)
        optimizer.load_state_dict(
            {"state": state, "param_groups": self.meta["optimizer"]["param_groups"]}
        )
        scheduler.load_state_dict({**scheduler.state_dict(), **self.meta["scheduler"]})
        if scaler is not None and self.meta.get("scaler"):
            scaler.load_state_dict(self.meta["scaler"])


def restore_last(run_dir: str | Path) -> Resume:
    """The `last` checkpoint of `run_dir`, or CheckpointError saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path, weights = Path(run_dir) / LAST_META, Path(run_dir) / LAST_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{run_dir} has no resumable checkpoint ({LAST_META} + {LAST_WEIGHTS}); "
            "it finished, or never completed an epoch"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(str(weights))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"the checkpoint in {run_dir} is damaged: {exc}") from exc
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT + "-last"
        or not isinstance(meta.get("epoch"), int)
    ):
        raise CheckpointError(f"{meta_path} is not a graft checkpoint")
    best_state = prefixed(tensors, "best.") or None
    return Resume(
        meta["epoch"],
        meta["stage"],
        meta["history"],
        meta["best"],
        best_state,
        meta["bad_epochs"],
        meta,
        tensors,
    )


def discard_last(run_dir: str | Path) -> None:
    """A finished run needs no resume point."""
    for name in (LAST_WEIGHTS, LAST_META):
        (Path(run_dir) / name).unlink(missing_ok=True)


def _get_rng(g: torch.Generator) -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "generator": g.get_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
    }


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
