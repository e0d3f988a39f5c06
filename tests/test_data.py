"""Dataset files: round trip, explicit splits, and the held-out test split of a file without
one (calibration must never see the samples it is evaluated on)."""

from __future__ import annotations

import pytest
import torch

from advcal.data import MultiModalDataset, holdout_split, load, load_dataset, save, save_splits


def _ds(n: int = 40, k: int = 4, seed: int = 0) -> MultiModalDataset:
    g = torch.Generator().manual_seed(seed)
    return MultiModalDataset(
        {"image": torch.rand(n, 3, 4, 4, generator=g), "audio": torch.rand(n, 16, generator=g)},
        torch.arange(n) % k,
        tuple("abcd"[:k]),
        torch.arange(100, 100 + n),
        name="mine",
        templates=("a {}.",),
    )


def test_round_trip(tmp_path):
    ds = _ds()
    save(ds, tmp_path / "d.safetensors")
    back = load(tmp_path / "d.safetensors")
    assert back.class_names == ds.class_names and back.templates == ds.templates
    assert torch.equal(back.ids, ds.ids) and torch.equal(back.labels, ds.labels)
    for m in ds.inputs:
        assert torch.equal(back.inputs[m], ds.inputs[m])


def test_file_without_split_holds_out_a_stratified_quarter(tmp_path):
    ds = _ds()
    save(ds, tmp_path / "d.safetensors")
    train = load_dataset(tmp_path / "d.safetensors", "train")
    test = load_dataset(tmp_path / "d.safetensors", "test")
    assert len(train) == 32 and len(test) == 8  # round(0.25 * 10) = 2 of each class
    assert not set(train.ids.tolist()) & set(test.ids.tolist()), "disjoint"
    assert set(train.ids.tolist()) | set(test.ids.tolist()) == set(ds.ids.tolist())
    assert torch.bincount(test.labels).tolist() == [2, 2, 2, 2]
    again = load_dataset(tmp_path / "d.safetensors", "test")
    assert torch.equal(again.ids, test.ids), "deterministic"
    # a class of one sample stays in train; a class of two gives one to test
    assert holdout_split(torch.tensor([0, 0, 1])).tolist().count(True) == 1


def test_explicit_splits(tmp_path):
    train, test = _ds(12, seed=1), _ds(8, seed=2)
    save_splits(tmp_path / "s.safetensors", train, test)
    a = load_dataset(tmp_path / "s.safetensors", "train")
    b = load_dataset(tmp_path / "s.safetensors", "test")
    assert torch.equal(a.inputs["image"], train.inputs["image"])
    assert torch.equal(b.inputs["audio"], test.inputs["audio"])
    assert len(load(tmp_path / "s.safetensors")) == 20
    with pytest.raises(ValueError, match="share modalities"):
        save_splits(tmp_path / "x.safetensors", train, train.select(["image"]))
    with pytest.raises(ValueError, match="split must be one of"):
        load(tmp_path / "s.safetensors", "val")
    with pytest.raises(ValueError, match="take no options"):
        load_dataset(tmp_path / "s.safetensors", "test", limit=3)
