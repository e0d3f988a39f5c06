import dataclasses

import pytest
import torch
from conftest import requires_cuda

from advcal.calibrate import CHECKPOINT, CalibConfig, Calibrator
from advcal.data import MultiModalDataset
from advcal.objectives import Objective

CFG = CalibConfig(
    epochs=3,
    batch_size=32,
    attack_steps=2,
    head_kind="residual_linear",
    objective=Objective(consistency=0.5),
)


def _fit(toy, out=None, **kw):
    bb, centers, ds = toy
    cal = Calibrator(bb, centers, ["img", "vec"], CFG, out_dir=out)
    return cal, cal.fit(ds, progress=False, **kw)


def test_heads_move_and_backbone_stays_frozen(toy):
    bb, _, _ = toy
    frozen = {k: v.clone() for k, v in bb.state_dict().items()}
    cal, heads = _fit(toy)
    assert any(p.abs().sum() > 0 for p in heads.parameters()), "heads were trained"
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in frozen.items())
    assert not any(p.requires_grad for p in bb.parameters())
    assert len(cal.history) == 3 and {"ce", "l2", "infonce", "consistency"} <= set(cal.history[0])


def test_resume_after_interruption_matches_uninterrupted(toy, tmp_path):
    _, straight = _fit(toy, tmp_path / "a")
    _, first = _fit(toy, tmp_path / "b", stop_after=1)  # "interrupted" after epoch 1
    assert (tmp_path / "b" / CHECKPOINT).is_file()
    assert not all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), straight.state_dict().values(), strict=True)
    )
    _, resumed = _fit(toy, tmp_path / "b", resume=True)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_errors(toy, tmp_path):
    bb, centers, ds = toy
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    cal = Calibrator(bb, centers, ["img"], CFG, out_dir=tmp_path)
    with pytest.raises(ValueError, match="corrupt"):
        cal.fit(ds, resume=True, progress=False)
    _fit(toy, tmp_path / "c", stop_after=1)
    other = Calibrator(bb, centers, ["img", "vec"], CalibConfig(epochs=4), out_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="different config"):
        other.fit(ds, resume=True, progress=False)


def test_bad_inputs(toy):
    bb, centers, ds = toy
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        Calibrator(bb, centers, ["audio"])
    with pytest.raises(ValueError, match="centers must be"):
        Calibrator(bb, torch.randn(4, 3), ["img"])
    with pytest.raises(ValueError, match="epochs"):
        CalibConfig(epochs=0)
    with pytest.raises(ValueError, match="is empty"):
        MultiModalDataset({"img": ds.inputs["img"][:0]}, ds.labels[:0], ds.class_names)
    cal = Calibrator(bb, centers, ["img"], CFG)
    with pytest.raises(ValueError, match="lacks modalities"):
        cal.fit(ds.select(["vec"]), progress=False)
    bad = ds.select(["img"])
    bad.inputs["img"] = bad.inputs["img"].clone()
    bad.inputs["img"][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        cal.fit(bad, progress=False)


def test_cuda_graph_needs_a_cuda_device(toy):
    bb, centers, _ = toy
    with pytest.raises(ValueError, match=r"cuda_graph=True\) needs a CUDA device"):
        Calibrator(bb, centers, ["img"], dataclasses.replace(CFG, cuda_graph=True))


@requires_cuda
def test_cuda_graph_calibration_equals_eager(toy):
    bb, centers, ds = toy
    fits = []
    for graph in (False, True):
        cfg = dataclasses.replace(CFG, epochs=2, cuda_graph=graph)
        cal = Calibrator(bb, centers.cuda(), ["img", "vec"], cfg, device="cuda")
        fits.append(cal.fit(ds, progress=False).state_dict())
    for k, v in fits[0].items():
        assert torch.equal(v, fits[1][k]), k


@requires_cuda
def test_cuda_graph_runs_dlr_t_batches_eagerly(toy):
    """The default mix (CE and targeted DLR by turns) under cuda_graph: the CE attack is
    captured, the dlr_t attack (a target drawn per sample outside the step) runs eagerly,
    and the config says so instead of refusing --cuda-graph."""
    bb, centers, ds = toy
    cfg = dataclasses.replace(CFG, epochs=1, attack=("ce", "dlr_t"), cuda_graph=True)
    with pytest.warns(UserWarning, match=r"dlr_t training attack batches run eagerly"):
        cal = Calibrator(bb, centers.cuda(), ["img"], cfg, device="cuda")
    cal.fit(ds, progress=False)
    graphed = {k[0]: a.cuda_graph for k, a in cal._attacks.items()}
    assert graphed == {"ce": True, "dlr_t": False}


def test_dlr_t_turns_use_ce_with_fewer_than_4_classes(toy):
    """The default mix on a 3-class dataset (LLVIP has 2, N-Caltech101 miniatures 3): the
    targeted margin needs 4 scores, so its turns use the CE attack, said once, and the
    calibration runs instead of refusing the default config."""
    bb, centers, ds = toy
    three = ds.subset([i for i in range(len(ds)) if int(ds.labels[i]) < 3])
    cfg = dataclasses.replace(CFG, epochs=1, attack=("ce", "dlr_t"))
    cal = Calibrator(bb, centers[:3], ["img"], cfg)
    with pytest.warns(UserWarning, match=r"dlr_t training attack needs >= 4 classes") as rec:
        cal.fit(three, progress=False)
    assert sum("dlr_t" in str(w.message) for w in rec) == 1
    attacks = {k[0]: a for k, a in cal._attacks.items()}
    assert attacks["dlr_t"] is attacks["ce"] and attacks["ce"].loss_name == "ce"


def test_alternating_training_attack_uses_both(toy):
    bb, centers, ds = toy
    cfg = dataclasses.replace(CFG, epochs=1, attack="alternate")
    assert cfg.attack == ("ce", "cos")  # the old name of CE and CrossMaxim by turns
    cal = Calibrator(bb, centers, ["img"], cfg)
    heads = cal.fit(ds, progress=False)
    assert sorted(k[0] for k in cal._attacks) == ["ce", "cos"]
    assert any(p.abs().sum() > 0 for p in heads.parameters())
    with pytest.raises(ValueError, match=r"unknown training attack"):
        CalibConfig(attack="fgsm")
