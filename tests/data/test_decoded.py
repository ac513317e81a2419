"""Training loaders: decoded once in memory, or from disk past the memory budget; same contract."""

from __future__ import annotations

import pytest
import torch

from graft.data.decoded import DecodedDataset, ImageDataset, build_datasets, decode_to_tensor
from graft.data.discovery import discover
from graft.data.transforms import PreprocessSpec

from ..conftest import make_shapes

SPEC = PreprocessSpec(48, (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("budget, kind", [(1 << 30, DecodedDataset), (0, ImageDataset)])
def test_both_paths_give_the_same_items_and_bad_files(tmp_path, budget, kind):
    data = make_shapes(tmp_path, n_train=3, n_val=2)
    (data / "train" / "circle" / "bad.png").write_bytes(b"")
    split = discover(data)
    train, val, bad = build_datasets(split.train, split.val, SPEC, memory_budget=budget)
    assert isinstance(train, kind) and isinstance(val, kind)
    assert [b.path.rsplit("/", 1)[-1] for b in bad] == ["bad.png"]
    assert len(train) == 9 and sorted(train.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x, y = val[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and y == 0
    torch.manual_seed(0)
    a = train[0][0]
    torch.manual_seed(1)
    assert a.shape == (3, 48, 48) and not torch.equal(a, train[0][0])  # augmented per read


def test_decode_keeps_aspect_and_never_enlarges(tmp_path):
    from PIL import Image

    Image.new("RGB", (400, 200)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "b.png")
    assert decode_to_tensor(str(tmp_path / "a.png"), 64).shape == (3, 64, 128)
    assert decode_to_tensor(str(tmp_path / "b.png"), 64).shape == (3, 20, 30)
    assert decode_to_tensor(str(tmp_path / "a.png"), 64).dtype == torch.uint8


class _Dies(torch.utils.data.Dataset):
    def __init__(self, how: str):
        self.how = how

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import os
        import time

        if self.how == "exit":
            os._exit(3)  # as a worker killed by a signal or a resource limit
        time.sleep(30)  # as a worker stuck on a dead network drive
        return torch.zeros(1)


@pytest.mark.parametrize(
    "how, message", [("exit", "exited unexpectedly"), ("hang", "timed out after 1 seconds")]
)
def test_a_failing_loader_worker_ends_the_run_with_a_message(how, message, monkeypatch):
    import graft.core.runtime as runtime
    from graft.core.errors import GraftError

    monkeypatch.setattr(runtime, "LOADER_TIMEOUT", 1)
    loader = torch.utils.data.DataLoader(_Dies(how), **runtime.loader_workers(1))
    with pytest.raises(GraftError) as err, runtime.loader_errors():
        list(loader)
    assert "a data-loading worker failed (" in str(err.value) and message in str(err.value)
    assert "run again with --workers 0" in str(err.value)
