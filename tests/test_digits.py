"""The embedded digits dataset: shapes, ranges, determinism, splits, pairing, speed."""

from __future__ import annotations

import time

import pytest
import torch

from advcal.data import MultiModalDataset, load_dataset
from advcal.data import digits as digits_mod
from advcal.data.digits import CLASS_NAMES, MODALITIES, TEMPLATES, digits

SHAPES = {
    "image": ((3, 32, 32), 0.0, 1.0),
    "video": ((4, 3, 32, 32), 0.0, 1.0),
    "audio": ((2048,), -1.0, 1.0),
    "depth": ((1, 32, 32), 0.0, 1.0),
    "thermal": ((1, 32, 32), 0.0, 1.0),
    "point": ((128, 3), -1.5, 1.5),
    "event": ((2, 32, 32), 0.0, 1.0),
}


@pytest.fixture(scope="module")
def train() -> MultiModalDataset:
    return digits("train")


@pytest.fixture(scope="module")
def test() -> MultiModalDataset:
    return digits("test")


def test_render_time_and_memory() -> None:
    digits_mod._render.cache_clear()
    t0 = time.perf_counter()
    inputs, labels = digits_mod._render(0)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, f"full render took {elapsed:.1f} s"  # ~3 s alone on 2 cores
    assert sum(x.numel() * x.element_size() for x in inputs.values()) < 300e6
    assert labels.shape == (1797,)


@pytest.mark.parametrize("m", MODALITIES)
def test_shapes_and_ranges(train: MultiModalDataset, m: str) -> None:
    shape, lo, hi = SHAPES[m]
    x = train.inputs[m]
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (len(train), *shape)
    assert torch.isfinite(x).all()
    assert x.min() >= lo and x.max() <= hi
    assert x.std() > 0.01  # not constant


def test_audio_is_quiet(train: MultiModalDataset) -> None:
    peak = train.inputs["audio"].abs().amax(1)
    assert peak.min() > 0.03 and peak.max() < 0.2  # 4/255 must be a real budget


def test_metadata(train: MultiModalDataset) -> None:
    assert train.class_names == CLASS_NAMES and len(CLASS_NAMES) == 10
    assert train.templates == TEMPLATES and all("{}" in t for t in TEMPLATES)
    assert set(train.modalities) == set(MODALITIES)


def test_determinism_across_calls() -> None:
    a = digits("test", limit=40)
    digits_mod._render.cache_clear()
    b = digits("test", limit=40)
    for m in MODALITIES:
        torch.testing.assert_close(a.inputs[m], b.inputs[m], rtol=0, atol=0)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.ids, b.ids)


def test_seed_changes_render() -> None:
    a, b = digits("all", limit=16, seed=0), digits("all", limit=16, seed=1)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs["image"], b.inputs["image"])


def test_split_disjoint_and_complete(train: MultiModalDataset, test: MultiModalDataset) -> None:
    tr, te = set(train.ids.tolist()), set(test.ids.tolist())
    assert not tr & te
    assert tr | te == set(range(1797))
    assert len(test) == pytest.approx(0.25 * 1797, abs=10)


def test_labels_balanced(train: MultiModalDataset, test: MultiModalDataset) -> None:
    for d in (train, test):
        counts = torch.bincount(d.labels, minlength=10).float()
        assert counts.min() >= 0.85 * counts.mean()


def test_ids_paired_with_source(test: MultiModalDataset) -> None:
    from sklearn.datasets import load_digits

    y = torch.as_tensor(load_digits().target)
    assert torch.equal(test.labels, y[test.ids])
    full = digits("all")
    # the same id holds the same tensors in every split
    for m in ("image", "audio", "point"):
        torch.testing.assert_close(test.inputs[m], full.inputs[m][test.ids], rtol=0, atol=0)


def test_limit_and_modalities() -> None:
    d = digits("train", limit=7, modalities=["audio", "point"])
    assert len(d) == 7 and d.modalities == ("audio", "point")
    assert torch.equal(d.ids, digits("train").ids[:7])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split"):
        digits("val")
    with pytest.raises(ValueError, match="modalities"):
        digits("train", modalities=["imu"])
    with pytest.raises(ValueError, match="limit"):
        digits("train", limit=0)


def test_load_dataset_entry() -> None:
    d = load_dataset("digits", split="test", limit=5)
    assert len(d) == 5 and d.name == "digits-test"


def test_cache_not_mutated_by_callers() -> None:
    d = digits("test", limit=3)
    d.inputs["image"].zero_()
    assert digits("test", limit=3).inputs["image"].abs().sum() > 0
