"""The store of frozen-network outputs: one checksummed safetensors file per image content, in a
folder named by a key (`output_key`) of everything that changes the output: the weights (below
the cut, for trunk activations), the preprocessing, the precision, the views' augmentation and
the cut. Pooled features (features.py) and trunk activations (activations.py) are both stored
here; views.py fills it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.errors import GraftError
from ..core.runtime import Runtime, atomic_path
from ..models.backbones import Backbone

log = logging.getLogger(__name__)

STORE_DTYPE = torch.float16  # pooled features are well inside fp16's range; halves the cache


def output_key(
    backbone: Backbone, runtime: Runtime, rotation: float = 0.0, trunk: Sequence[str] = ()
) -> str:
    """The store's key: a hash of everything that changes a network output: weights,
    preprocessing, precision, format, and the augmentation of the cached views (`rotation`).
    Pooled features by default; with `trunk` (the top blocks, which train), the key of the
    activations entering the first of them: only the weights below count. The key's text is
    what it was before the store had this name: caches made before stay valid."""
    h = hashlib.sha256()
    what = {
        "backbone": backbone.name,
        "spec": backbone.spec.to_dict(),
        "precision": runtime.precision,
        "v": 2,
    }  # v2: BatchNorm folded
    if rotation:  # absent when 0, so caches made before rotation was keyed stay valid
        what["rotation"] = rotation
    if trunk:  # training views cropped from the image decoded at the eval resize side
        what["activations_of"] = trunk[0]
        what["views_from"] = backbone.spec.resize_size
    h.update(json.dumps(what, sort_keys=True).encode())
    top = tuple(f"{b}." for b in trunk)
    for name, tensor in backbone.model.features.state_dict().items():
        if top and name.startswith(top):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


_UNWRITABLE: set[Path] = set()  # cache roots already reported as unwritable


class OutputStore:
    """One folder per model key; one checksummed safetensors file per image content.

    A speed-up, never a reason to fail: a cache that cannot be read or written (read-only, full,
    a folder where a file should be, or the reverse) is reported once and training goes on
    without it. The checksum covers the digest an entry is stored under, so an entry copied to
    another image's name is refused rather than trained on.
    """

    def __init__(self, root: str | Path, key: str, dtype: torch.dtype | None = STORE_DTYPE):
        self.dir = Path(root) / key
        self.enabled = True
        self.dtype = dtype  # None: stored as computed

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def get(
        self, digest: str, views: int, need_eval: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """(eval (*S), aug (views, *S)) or None when absent, damaged, holding fewer views or no
        eval view when one is needed; S is (D,) for pooled features."""
        from safetensors import safe_open

        path = self._path(digest)
        try:
            if not self.enabled or not path.is_file():
                return None
            with safe_open(str(path), framework="pt") as f:
                checksum = (f.metadata() or {}).get("sha256")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if checksum != _checksum(digest, tensors):
                raise ValueError("checksum mismatch")
        except Exception as exc:  # unreadable, truncated header, bad bytes, wrong dtype...
            log.warning("feature cache entry %s is unusable (%s): recomputing", path, exc)
            return None
        ev = tensors.get("eval")
        if need_eval and ev is None:
            return None
        aug = tensors["aug"] if "aug" in tensors else ev.new_zeros(0, *ev.shape)
        if aug.shape[0] < views:
            return None
        return ev, aug[:views]

    def has(self, digest: str) -> bool:
        """Whether an entry for `digest` is on disk (not read: a cheap count for choosing an
        engine; `get` still checks it)."""
        return self.enabled and self._path(digest).is_file()

    def put(self, digest: str, eval_feat: torch.Tensor | None, aug: torch.Tensor) -> None:
        from safetensors.torch import save_file

        if not self.enabled:
            return
        tensors = {} if eval_feat is None else {"eval": self._stored(eval_feat)}
        if aug.shape[0]:
            tensors["aug"] = self._stored(aug)
        try:
            with atomic_path(self._path(digest), durable=False) as tmp:  # checksummed on reading
                save_file(tensors, str(tmp), metadata={"sha256": _checksum(digest, tensors)})
        except (OSError, GraftError) as exc:  # read-only, full, a file in place of a folder...
            self.enabled = False
            if self.dir.parent in _UNWRITABLE:
                return  # said once per cache folder and process (train and val share it)
            _UNWRITABLE.add(self.dir.parent)
            log.warning(
                "the feature cache in %s cannot be written (%s); going on without it "
                "(set --cache-dir to a writable folder to keep features)",
                self.dir.parent,
                getattr(exc, "strerror", None) or exc,
            )

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        return (t if self.dtype is None else t.to(self.dtype)).contiguous()

    def writable(self) -> bool:
        """Whether entries can be written here (a probe file, removed)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            return False
        return self.enabled


def _checksum(digest: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(digest.encode())  # bound to the image the entry claims to describe
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
