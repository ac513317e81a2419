"""Partial fine-tuning from cached trunk activations: the same training as running the trunk live
on the same views, a cache invalidated by what changes an activation, damaged entries recomputed,
the memory budget honoured, and live training where the cut does not pay or does not hold."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from graft.core.config import make_config
from graft.core.runtime import resolve_runtime, seed_everything
from graft.data.discovery import discover
from graft.data.images import file_digest
from graft.frozen.activations import cached_activations, view_choice
from graft.frozen.networks import TopNet, cut_backbone
from graft.frozen.store import output_key
from graft.frozen.views import _ImageViews
from graft.models.backbones import create_backbone
from graft.models.freezing import apply_freezing, epoch_plan, trainable_blocks
from graft.training.jobs import Job, prepare_job
from graft.training.loop import fit

from ..conftest import draw_shape, make_shapes

SIZE = 64  # small images: the same code, a fraction of the time
RT = resolve_runtime("cpu", "fp32")


def _backbone(name="efficientnet_lite0", classes=4):
    torch.manual_seed(0)
    bb = create_backbone(name, classes, pretrained=False)
    return dataclasses.replace(bb, spec=bb.spec.with_size(SIZE))


def _cfg(data, tmp_path, **kw):
    options = dict(
        strategy="partial",
        unfreeze_last=3,
        epochs=3,
        batch_size=8,
        cache_views=2,
        cache_dir=str(tmp_path / "cache"),
        workers=0,
        seed=0,
        image_size=SIZE,
    )
    return make_config(data, **{**options, **kw}).resolve(input_size=SIZE)


def _cached_fit(cfg, split, bb):
    blocks = trainable_blocks(bb, "partial", unfreeze_last=cfg.unfreeze_last)
    apply_freezing(bb, blocks)
    seed_everything(0)
    job = prepare_job(cfg, bb, split, RT, lambda it, *a: it)
    state = fit(job, epoch_plan(cfg, blocks, SIZE), cfg)
    return job, state


class _LiveViews(torch.utils.data.Dataset):
    """The same views as the cache holds, as images: the whole network runs on them."""

    def __init__(self, images, labels, seed):
        self.images, self.labels, self.seed = images, labels, seed

    def set_epoch(self, epoch):
        self.choice = view_choice(self.seed, epoch, len(self.labels), self.images.shape[1])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i, self.choice[i]], self.labels[i]


def _views(bb, samples, views):
    paths = [p for p, _ in samples]
    ds = _ImageViews(
        paths,
        [file_digest(p) for p in paths],
        bb,
        views,
        eval_view=not views,
        views_side=bb.spec.resize_size,
    )
    return torch.stack([ds[i][1] for i in range(len(ds))])


def _live_fit(cfg, split, bb):
    blocks = trainable_blocks(bb, "partial", unfreeze_last=cfg.unfreeze_last)
    apply_freezing(bb, blocks)
    labels = torch.tensor([y for _, y in split.train])
    train_ds = _LiveViews(_views(bb, split.train, cfg.cache_views), labels, cfg.seed)
    val = torch.utils.data.TensorDataset(
        _views(bb, split.val, 0)[:, 0], torch.tensor([y for _, y in split.val])
    )
    g = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g, drop_last=True
    )
    job = Job(
        backbone=bb,
        model=RT.prepare(bb.model),
        train_loader=loader,
        val_loader=torch.utils.data.DataLoader(val, batch_size=8),
        criterion=torch.nn.CrossEntropyLoss(),
        runtime=RT,
        generator=g,
        classes=split.classes,
        sampler=train_ds,
    )
    seed_everything(0)
    return fit(job, epoch_plan(cfg, blocks, SIZE), cfg)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("acts"), n_train=10, n_val=4)


def test_cached_training_equals_live_training_on_the_same_views(shapes, tmp_path):
    split = discover(shapes)
    cfg = _cfg(shapes, tmp_path)
    bb = _backbone()
    live_bb = dataclasses.replace(bb, model=copy.deepcopy(bb.model))
    job, cached = _cached_fit(cfg, split, bb)
    assert isinstance(job.model, TopNet) and job.trunk.cached
    live = _live_fit(cfg, split, live_bb)
    for a, b in zip(cached.history, live.history, strict=True):
        for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    want = live_bb.model.state_dict()
    for name, value in bb.model.state_dict().items():  # trained in place, through TopNet
        assert torch.allclose(value.float(), want[name].float(), atol=1e-4), name
    moved = [
        n
        for n, v in bb.model.features.state_dict().items()
        if n.startswith("blocks.6") and v.dtype.is_floating_point
    ]
    assert moved  # and the top did train: its weights left the initial ones
    start = _backbone().model.features.state_dict()
    assert any(not torch.equal(bb.model.features.state_dict()[n], start[n]) for n in moved)

    # a memory budget of a few bytes: read back from the cache files every epoch, same numbers
    spill_bb = _backbone()
    spill_job, spilled = _cached_fit(dataclasses.replace(cfg, memory_gb=1e-9), split, spill_bb)
    assert spill_job.train_loader.dataset.acts.memory is None
    assert [r["train_loss"] for r in spilled.history] == [r["train_loss"] for r in cached.history]


def test_the_activation_cache_is_keyed_by_trunk_weights_preprocessing_and_blocks(shapes, tmp_path):
    bb = _backbone()
    top = trainable_blocks(bb, "partial", unfreeze_last=3)
    key = output_key(bb, RT, trunk=top)
    assert key != output_key(bb, RT)  # not the pooled features' key
    assert key != output_key(bb, RT, trunk=trainable_blocks(bb, "partial", unfreeze_last=4))
    smaller = dataclasses.replace(bb, spec=bb.spec.with_size(SIZE - 8))
    assert key != output_key(smaller, RT, trunk=top)
    assert key != output_key(bb, RT, rotation=10.0, trunk=top)
    with torch.no_grad():
        bb.model.features.get_submodule("blocks.6").parameters().__next__().add_(1.0)
    assert key == output_key(bb, RT, trunk=top)  # the top's weights train: they do not count
    with torch.no_grad():
        bb.model.features.conv_stem.weight.add_(1.0)
    assert key != output_key(bb, RT, trunk=top)


def test_changed_files_and_damaged_entries_are_recomputed(shapes, tmp_path):
    data = make_shapes(tmp_path / "d", n_train=3, n_val=1)
    samples = discover(data).train[:4]
    bb = _backbone()
    cut = cut_backbone(bb, "blocks.6")
    kw = dict(cache_dir=tmp_path / "c")
    first = cached_activations(bb, cut, samples, RT, 2, **kw)
    assert (first.hits, first.memory.shape) == (0, (4, 2, *cut.shape))
    assert cached_activations(bb, cut, samples, RT, 2, **kw).hits == 4
    assert cached_activations(bb, cut, samples, RT, 1, **kw).hits == 4  # fewer views: a prefix
    assert cached_activations(bb, cut, samples, RT, 3, **kw).hits == 0  # more: recomputed

    entries = sorted((tmp_path / "c").rglob("*.safetensors"))
    entries[0].write_bytes(entries[0].read_bytes()[:-50])  # truncated
    blob = bytearray(entries[1].read_bytes())
    blob[-8] ^= 0xFF  # one flipped byte in the data
    entries[1].write_bytes(bytes(blob))
    again = cached_activations(bb, cut, samples, RT, 3, **kw)
    assert again.hits == 2
    third = cached_activations(bb, cut, samples, RT, 3, **kw)
    assert third.hits == 4 and torch.equal(third.memory, again.memory)

    import random

    draw_shape("circle", random.Random(99)).save(samples[0][0])  # an edited picture
    assert cached_activations(bb, cut, samples, RT, 3, **kw).hits == 3
    # the same images as validation (eval view): their own entries, the views' ones kept
    assert cached_activations(bb, cut, samples, RT, 0, **kw).hits == 0
    assert cached_activations(bb, cut, samples, RT, 0, **kw).hits == 4
    assert cached_activations(bb, cut, samples, RT, 3, **kw).hits == 4


def test_partial_runs_live_where_caching_does_not_pay_or_the_cut_does_not_hold(shapes, tmp_path):
    split = discover(shapes)
    for options, why in [
        ({"cache_views": 0}, "--cache-views 0"),
        ({"cache_views": 3}, "3 cached views cost as many trunk passes as 3 live"),
        ({"progressive": True, "epochs": 4}, "--progressive changes the image size"),
    ]:
        cfg = _cfg(shapes, tmp_path, **options)
        bb = _backbone()
        apply_freezing(bb, trainable_blocks(bb, "partial", unfreeze_last=3))
        job = prepare_job(cfg, bb, split, RT, lambda it, *a: it)
        assert not isinstance(job.model, TopNet)
        assert not job.trunk.cached and job.trunk.reason.startswith(why)
    cfg = _cfg(shapes, tmp_path, epochs=4)
    assert isinstance(prepare_job(cfg, _backbone(), split, RT, lambda it, *a: it).model, TopNet)


@pytest.mark.parametrize("name,first", [("resnet18", "layer3"), ("efficientnet_lite0", "bn1")])
def test_the_cut_is_exact_on_other_networks_and_at_a_folded_batchnorm(name, first):
    bb = _backbone(name)
    cut = cut_backbone(bb, first)
    assert cut is not None and cut.blocks[0] == first
    x = torch.randn(2, 3, SIZE, SIZE)
    bb.model.eval()
    with torch.no_grad():
        want = bb.model.features(x)
        assert torch.allclose(cut.top(cut.trunk(x)), want, rtol=1e-4, atol=1e-5)


def test_the_view_an_epoch_trains_on_depends_on_seed_and_epoch_alone():
    a, b = view_choice(0, 3, 50, 4), view_choice(0, 3, 50, 4)
    assert torch.equal(a, b) and not torch.equal(a, view_choice(0, 4, 50, 4))
    assert set(a.tolist()) == {0, 1, 2, 3}
    assert not torch.equal(a, view_choice(1, 3, 50, 4))
