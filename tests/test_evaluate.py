import pytest
import torch
from conftest import Toy

from advcal.evaluate import (
    EvalConfig,
    EvalResult,
    ModalityResult,
    evaluate,
    recall_at_k,
    sanity_checks,
    stratified_subset,
    topk_correct,
)


def test_topk_correct_constructed():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.2, 0.3, 0.5]])
    y = torch.tensor([1, 2, 0])
    assert topk_correct(logits, y, 1).tolist() == [True, False, False]
    assert topk_correct(logits, y, 2).tolist() == [True, True, False]
    assert topk_correct(logits, y, 5).tolist() == [True, True, True]  # k clipped to K


def test_recall_at_k_constructed():
    q = torch.eye(4)
    g = torch.eye(4)[[1, 0, 2, 3]]  # gallery item i is query perm[i]
    g_ids = torch.tensor([1, 0, 2, 3])
    ids = torch.arange(4)
    assert recall_at_k(q, g, ids, g_ids, ks=(1,)) == {"R@1": 1.0}
    g = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.0, 0.0, 1.0]])
    r = recall_at_k(torch.eye(3), g, torch.arange(3), torch.tensor([1, 0, 2]), ks=(1, 2))
    assert r["R@1"] == pytest.approx(1 / 3) and r["R@2"] == 1.0


def _rec(clean, robust, weak, large, sweep, black_box=0, n=100):
    return ModalityResult(
        n=n,
        eps=0.01,
        norm="linf",
        space="pixels",
        clean_top1=clean,
        clean_top5=1.0,
        robust_top1=robust,
        robust_top5=1.0,
        attacks={},
        broken_by={},
        compare={},
        weak_top1=weak,
        sweep={str(e): a for e, a in sweep.items()},
        large_eps=0.16,
        large_eps_top1=large,
        black_box_broke=black_box,
    )


def test_sanity_checks_can_fail():
    cfg = EvalConfig()
    good = _rec(0.9, 0.4, 0.42, 0.0, {0.01: 0.7, 0.02: 0.5, 0.04: 0.4})
    bad = _rec(0.5, 0.6, 0.9, 0.5, {0.01: 0.3, 0.02: 0.6, 0.04: 0.6}, black_box=5)
    s = sanity_checks({"good": good, "bad": bad}, cfg)
    assert all(v for k, v in s.items() if k.endswith(".good"))
    for check in (
        "robust_le_clean",
        "monotone_in_eps",
        "large_eps_breaks",
        "no_gradient_masking",
        "black_box_not_better",
    ):
        assert s[f"{check}.bad"] is False, check
    s = sanity_checks({"x": _rec(0.9, 0.5, 0.3, 0.0, {0.1: 0.5})}, cfg)
    assert s["more_steps_not_higher.x"] is False
    # 1 of 100 samples found by the black box alone is within noise (1%); no black box: not run
    s = sanity_checks({"x": _rec(0.9, 0.5, 0.5, 0.0, {0.1: 0.5}, black_box=1)}, cfg)
    assert s["black_box_not_better.x"] is True
    s = sanity_checks({"x": _rec(0.9, 0.5, 0.5, 0.0, {0.1: 0.5}, black_box=None)}, cfg)
    assert s["black_box_not_better.x"] is None


CHEAP = {
    "suite": ("apgd-ce:10", "apgd-t:10", "fab-t:5", "square:100"),
    "sweep_suite": ("apgd-ce:5",),
    "weak": ("pgd:5", "crossmaxim:5"),
    "retrieval_steps": 5,
    "batch_size": 40,
}


def test_evaluate_on_toy(toy):
    bb, centers, ds = toy
    cfg = EvalConfig(**CHEAP)
    r = evaluate(bb, ds, centers, None, config=cfg, progress=False)
    assert isinstance(r, EvalResult)
    for m in ("img", "vec"):
        rec = r.modalities[m]
        assert rec.n == len(ds)
        assert 0 <= rec.robust_top1 <= rec.clean_top1 <= 1
        assert rec.robust_top1 == min(rec.attacks.values())  # the cascade's last value
        assert list(rec.attacks.values()) == sorted(rec.attacks.values(), reverse=True)
        assert set(rec.sweep) == {f"{bb.spec(m).eps * k:.6g}" for k in cfg.sweep}
        assert set(rec.compare) == {"legacy"}
        assert rec.robust_top1 <= rec.compare["legacy"] + 1e-9 or rec.compare["legacy"] < 0.05
    assert "square-100q" in r.modalities["img"].attacks
    assert "square-100q" not in r.modalities["vec"].attacks  # L2: no Square
    assert r.sanity["black_box_not_better.vec"] is None
    assert r.modalities["img"].clean_top1 > 0.9
    assert {"img->vec", "text->img", "text->vec"} <= set(r.retrieval)
    assert set(r.sanity) >= {"robust_le_clean.img", "no_gradient_masking.vec"}
    again = EvalResult.from_dict(r.to_dict())
    assert again.to_dict() == r.to_dict()


def test_evaluate_on_a_fixed_stratified_subset(toy):
    bb, centers, ds = toy
    cfg = EvalConfig(**{**CHEAP, "samples": 10, "retrieval": False})
    r = evaluate(bb, ds, centers, None, config=cfg, progress=False)
    assert r.modalities["img"].n == 10
    assert r.data["n"] == 10 and r.data["of"] == len(ds) and "stratified" in r.data["subset"]
    idx = stratified_subset(ds.labels, 10)
    assert torch.bincount(ds.labels[idx], minlength=4).tolist() == [3, 3, 2, 2]
    assert torch.equal(idx, stratified_subset(ds.labels, 10)), "fixed"


def test_masked_gradients_are_flagged():
    """A model that quantises its input hides its gradients: the white-box attacks stall and
    the report must say so (the black-box attack finds what they missed)."""
    from torch import nn

    from advcal import backbones
    from advcal.data import MultiModalDataset
    from advcal.specs import InputSpec

    class Quantise(nn.Module):
        def forward(self, x):  # a zero gradient everywhere (round), no straight-through
            return torch.round(x * 4) / 4

    bb0, centers, ds = Toy.build()
    enc = nn.Sequential(Quantise(), bb0.encoders["img"])
    spec = InputSpec((3, 8, 8), 0.0, 1.0, 16 / 255)
    bb = backbones.wrap({"img": enc}, {"img": spec}, embed_dim=Toy.D)
    data = MultiModalDataset({"img": ds.inputs["img"]}, ds.labels, ds.class_names, name="q")
    cfg = EvalConfig(
        suite=("apgd-ce:20", "apgd-t:20", "square:300"),
        compare=(),
        sweep_suite=("apgd-ce:20",),
        weak=("pgd:10",),
        retrieval=False,
    )
    r = evaluate(bb, data, centers, None, config=cfg, progress=False)
    flagged = [k for k, v in r.sanity.items() if v is False]
    assert "black_box_not_better.img" in flagged, r.sanity
    assert r.modalities["img"].black_box_broke > 0


def test_evaluate_bad_inputs(toy):
    bb, centers, ds = toy
    with pytest.raises(ValueError, match="unknown attack"):
        EvalConfig(suite=("fgsm",))
    with pytest.raises(ValueError, match="unknown suite"):
        EvalConfig(suite="strongest")
    with pytest.raises(ValueError, match="is a black-box attack"):
        EvalConfig(weak=("square:100",))
    with pytest.raises(ValueError, match="unknown modality"):
        evaluate(bb, ds, centers, modalities=["audio"], progress=False)
    with pytest.raises(ValueError, match="centers must be"):
        evaluate(bb, ds, torch.randn(4, 3), progress=False)
    with pytest.raises(ValueError, match="cuda_graph"):
        EvalConfig(cuda_graph=True)
    with pytest.raises(ValueError, match="bf16 autocast is for CUDA"):
        evaluate(bb, ds, centers, config=EvalConfig(**CHEAP, amp=True), progress=False)


def test_weak_top1_is_the_worst_case_of_the_training_strength_attacks(toy):
    """weak_top1 with both attacks <= with either alone (same seeds, per-sample AND)."""
    bb, centers, ds = toy
    ds = ds.select(["vec"])
    base = {**CHEAP, "retrieval": False, "compare": ()}
    both = evaluate(bb, ds, centers, config=EvalConfig(**base), progress=False)
    pgd_only = evaluate(
        bb, ds, centers, config=EvalConfig(**{**base, "weak": ("pgd:5",)}), progress=False
    )
    assert both.modalities["vec"].weak_top1 <= pgd_only.modalities["vec"].weak_top1


def test_results_do_not_depend_on_the_batch_split(toy):
    """Every random draw is keyed by the sample, so a sample's attacks (random starts, Square's
    windows, the ranking attack) are the same whatever batch or torchrun rank it is in."""
    bb, centers, ds = toy
    a = evaluate(bb, ds, centers, config=EvalConfig(**{**CHEAP, "batch_size": 40}), progress=False)
    b = evaluate(bb, ds, centers, config=EvalConfig(**{**CHEAP, "batch_size": 13}), progress=False)
    for m in ("img", "vec"):
        ra, rb = a.modalities[m], b.modalities[m]
        for f in ("clean_top1", "robust_top1", "robust_top5", "attacks", "compare", "weak_top1"):
            assert getattr(ra, f) == getattr(rb, f), (m, f)
        assert ra.broken_by == rb.broken_by and ra.sweep == rb.sweep
    assert a.retrieval == b.retrieval
