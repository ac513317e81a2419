"""The feature cache: reused when valid, recomputed when a file or the cache entry changes."""

from __future__ import annotations

import pytest
import torch

from graft.core.runtime import resolve_runtime
from graft.data.discovery import discover
from graft.frozen.features import extract_features
from graft.frozen.store import OutputStore, output_key
from graft.models.backbones import create_backbone

from ..conftest import draw_shape, make_shapes


def _setup(tmp_path):
    data = make_shapes(tmp_path / "data", n_train=3, n_val=1)
    split = discover(data)
    bb = create_backbone("efficientnet_lite0", len(split.classes))
    return data, split, bb, resolve_runtime("cpu", "fp32")


def test_cached_features_equal_fresh_ones(tmp_path):
    data, split, bb, rt = _setup(tmp_path)
    first = extract_features(bb, split.train, rt, cache_dir=tmp_path / "c")
    assert (first.hits, first.computed) == (0, 9)
    again = extract_features(bb, split.train, rt, cache_dir=tmp_path / "c")
    assert (again.hits, again.computed) == (9, 0)
    fresh = extract_features(bb, split.train, rt, cache_dir=tmp_path / "other")
    # cache stores fp16: equal to fresh features at that precision
    assert torch.equal(again.features, first.features)
    assert torch.allclose(again.features, fresh.features, rtol=1e-3, atol=1e-3)
    with torch.inference_mode():
        from graft.data.images import load_image
        from graft.data.transforms import build_transforms

        x = build_transforms(bb.spec, False)(load_image(split.train[0][0]))
        direct = bb.model.features.eval()(x[None])[0]
    assert torch.allclose(first.features[0], direct, rtol=1e-2, atol=1e-2)


def test_changed_file_is_recomputed(tmp_path):
    import random

    data, split, bb, rt = _setup(tmp_path)
    before = extract_features(bb, split.train, rt, cache_dir=tmp_path / "c")
    draw_shape("circle", random.Random(99)).save(split.train[0][0])
    after = extract_features(bb, split.train, rt, cache_dir=tmp_path / "c")
    assert (after.hits, after.computed) == (8, 1)
    assert not torch.allclose(after.features[0], before.features[0])


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path):
    data, split, bb, rt = _setup(tmp_path)
    first = extract_features(bb, split.train[:2], rt, cache_dir=tmp_path / "c")
    entries = sorted((tmp_path / "c").rglob("*.safetensors"))
    assert len(entries) == 2
    raw = bytearray(entries[0].read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the tensor data: only the checksum can tell
    entries[0].write_bytes(bytes(raw))
    entries[1].write_bytes(entries[1].read_bytes()[:40])  # truncated
    again = extract_features(bb, split.train[:2], rt, cache_dir=tmp_path / "c")
    assert (again.hits, again.computed) == (0, 2)
    assert torch.equal(again.features, first.features)


def test_key_changes_with_weights_and_precision(tmp_path):
    bb = create_backbone("efficientnet_lite0", 2)
    k = output_key(bb, resolve_runtime("cpu", "fp32"))
    assert k != output_key(bb, resolve_runtime("cpu", "bf16"))
    with torch.no_grad():
        bb.model.features.conv_stem.weight[0, 0, 0, 0] += 1
    assert k != output_key(bb, resolve_runtime("cpu", "fp32"))
    assert OutputStore(tmp_path, k).get("ab" * 32, 0) is None


def test_augmented_views_are_cached_and_deterministic(tmp_path):
    data, split, bb, rt = _setup(tmp_path)
    a = extract_features(bb, split.train[:2], rt, cache_dir=tmp_path / "c1", views=2)
    b = extract_features(bb, split.train[:2], rt, cache_dir=tmp_path / "c2", views=2)
    assert a.aug.shape == (2, 2, bb.model.num_features)
    assert torch.allclose(a.aug, b.aug, atol=1e-3)
    assert not torch.allclose(a.aug[:, 0], a.aug[:, 1])


def test_rotation_is_part_of_the_cached_views_key():
    bb = create_backbone("efficientnet_lite0", num_classes=2, pretrained=False)
    rt = resolve_runtime("cpu", "fp32")
    assert output_key(bb, rt) == output_key(bb, rt, rotation=0.0)
    assert output_key(bb, rt, rotation=15.0) != output_key(bb, rt)


# batch size changes the kernels (one image recomputed alone, two computed together), so the
# last bits move: fp32 rounding stays below one step of the fp16 the cache stores, bf16 ~1e-2
_RECOMPUTE_TOLERANCE = {"fp32": 2e-3, "bf16": 3e-2}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_entry_copied_to_another_images_name_is_refused(tmp_path, precision):
    data, split, bb, _ = _setup(tmp_path)
    rt = resolve_runtime("cpu", precision)
    first = extract_features(bb, split.train[:2], rt, cache_dir=tmp_path / "c")
    a, b = sorted((tmp_path / "c").rglob("*.safetensors"))
    b.write_bytes(a.read_bytes())  # b's name, a's features: passes any checksum of the bytes
    again = extract_features(bb, split.train[:2], rt, cache_dir=tmp_path / "c")
    assert (again.hits, again.computed) == (1, 1)
    scale = float(first.features.abs().max())
    diff = (again.features - first.features).abs().max(dim=1).values / scale
    assert diff.max() <= _RECOMPUTE_TOLERANCE[precision], diff
    # each image got its own features back, not the other one's (which the copy held)
    apart = float((first.features[0] - first.features[1]).abs().max()) / scale
    assert apart > 3 * _RECOMPUTE_TOLERANCE[precision]


def test_a_broken_cache_never_stops_extraction(tmp_path, caplog):
    data, split, bb, rt = _setup(tmp_path)
    want = extract_features(bb, split.train[:3], rt, cache_dir=tmp_path / "ok").features
    (tmp_path / "file").write_text("")
    key = output_key(bb, rt)
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / key).write_text("a file where the key folder belongs")
    entry_as_folder = tmp_path / "c2"
    extract_features(bb, split.train[:1], rt, cache_dir=entry_as_folder)
    [entry] = entry_as_folder.rglob("*.safetensors")
    entry.unlink()
    entry.mkdir()
    for cache in (tmp_path / "file" / "cache", tmp_path / "c1", entry_as_folder):
        caplog.clear()
        got = extract_features(bb, split.train[:3], rt, cache_dir=cache)
        assert torch.equal(got.features, want) and got.bad == []
        warned = [r.message for r in caplog.records if "cannot be written" in r.message]
        assert len(warned) <= 1  # once, not once per image


def test_a_full_cache_volume_is_reported_once(tmp_path, monkeypatch, caplog):
    import graft.frozen.store as viewcache
    from graft.core.errors import GraftError

    data, split, bb, rt = _setup(tmp_path)

    def full(*a, **k):
        raise GraftError("disk full while writing x; free some space and retry")

    monkeypatch.setattr(viewcache, "atomic_path", full)
    got = extract_features(bb, split.train[:3], rt, cache_dir=tmp_path / "c")
    assert got.computed == 3
    extract_features(bb, split.val, rt, cache_dir=tmp_path / "c")  # a run reads val next
    assert sum("cannot be written" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "densenet121"])
def test_batchnorm_folded_extractor_computes_the_same_features(name):
    from graft.frozen.networks import fold_batchnorm

    bb = create_backbone(name, 2, pretrained=name == "efficientnet_lite0")
    size = 128
    folded = fold_batchnorm(bb.model.features, size)
    left = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m for m in bb.model.features.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(left) < len(before)  # folded, on a copy:
    assert [m for m in bb.model.features.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.rand(3, 3, size, size)
    with torch.inference_mode():
        want, got = bb.model.features.eval()(x), folded(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_features_that_are_not_finite_numbers_are_refused_naming_an_image(tmp_path):
    """Damaged weights (or ones whose pooled features overflow the cache's float16) would make
    every head NaN: extraction refuses their features, naming the backbone and an image."""
    from graft.core.errors import BackboneError

    data, split, bb, rt = _setup(tmp_path)
    with torch.no_grad():
        bb.model.features.conv_head.weight[0, 0] = float("nan")  # a damaged tensor
    with pytest.raises(BackboneError) as err:
        extract_features(bb, split.train, rt, cache_dir=tmp_path / "c")
    assert str(err.value).startswith(
        "efficientnet_lite0's features of 9 of 9 images are not finite numbers (NaN or infinity; "
        f"the first: {split.train[0][0]}): its weights overflow float16 or are damaged"
    )
