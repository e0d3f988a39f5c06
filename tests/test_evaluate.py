import pytest
import torch
from conftest import Toy

from advcal.evaluate import EvalConfig, evaluate, recall_at_k, sanity_checks, topk_correct


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


def _rec(clean, robust, weak, large, sweep):
    return {
        "clean_top1": clean,
        "robust_top1": robust,
        "weak_top1": weak,
        "large_eps_top1": large,
        "sweep": {str(e): a for e, a in sweep.items()},
    }


def test_sanity_checks_can_fail():
    cfg = EvalConfig()
    good = _rec(0.9, 0.4, 0.42, 0.0, {0.01: 0.7, 0.02: 0.5, 0.04: 0.4})
    bad = _rec(0.5, 0.6, 0.9, 0.5, {0.01: 0.3, 0.02: 0.6, 0.04: 0.6})
    s = sanity_checks({"good": good, "bad": bad}, cfg)
    assert all(v for k, v in s.items() if k.endswith(".good"))
    for check in ("robust_le_clean", "monotone_in_eps", "large_eps_breaks", "no_gradient_masking"):
        assert s[f"{check}.bad"] is False, check
    s = sanity_checks({"x": _rec(0.9, 0.5, 0.3, 0.0, {0.1: 0.5})}, cfg)
    assert s["more_steps_not_higher.x"] is False


def test_evaluate_on_toy(toy):
    bb, centers, ds = toy
    cfg = EvalConfig(steps=5, restarts=1, sweep_steps=5, weak_steps=5, batch_size=40)
    r = evaluate(bb, ds, centers, None, config=cfg, progress=False)
    for m in ("img", "vec"):
        rec = r["modalities"][m]
        assert 0 <= rec["robust_top1"] <= rec["clean_top1"] <= 1
        assert rec["robust_top1"] <= min(rec["attacks"].values())
        assert set(rec["sweep"]) == {f"{bb.spec(m).eps * k:.6g}" for k in cfg.sweep}
    assert r["modalities"]["img"]["clean_top1"] > 0.9
    assert {"img->vec", "text->img", "text->vec"} <= set(r["retrieval"])
    assert set(r["sanity"]) >= {"robust_le_clean.img", "no_gradient_masking.vec"}


def test_evaluate_bad_inputs(toy):
    bb, centers, ds = toy
    with pytest.raises(ValueError, match="unknown attacks"):
        EvalConfig(attacks=("fgsm",))
    with pytest.raises(ValueError, match="unknown modality"):
        evaluate(bb, ds, centers, modalities=["audio"], progress=False)
    with pytest.raises(ValueError, match="centers must be"):
        evaluate(bb, ds, torch.randn(4, 3), progress=False)


def test_protocol_config_per_attack_restarts_and_weak_attacks():
    cfg = EvalConfig(restarts=(2, 1))
    assert cfg.restarts == (2, 1) and EvalConfig(restarts=3).restarts == (3, 3)
    with pytest.raises(ValueError, match="2 values for 1 attacks"):
        EvalConfig(attacks=("pgd",), restarts=(2, 1))
    with pytest.raises(ValueError, match="restarts"):
        EvalConfig(restarts=(2, 0))
    with pytest.raises(ValueError, match="weak_attacks: unknown attacks"):
        EvalConfig(weak_attacks=("pgd", "fgsm"))
    with pytest.raises(ValueError, match=r"cuda_graph=True\) needs a CUDA device"):
        bb, c, ds = Toy.build()
        evaluate(bb, ds, c, None, config=EvalConfig(cuda_graph=True), progress=False)


def test_weak_top1_is_the_worst_case_of_the_training_strength_attacks(toy):
    """weak_top1 with both attacks <= with either alone (same seeds, per-sample AND)."""
    bb, centers, ds = toy
    ds = ds.select(["vec"])
    base = {"steps": 3, "restarts": 1, "sweep_steps": 2, "weak_steps": 3, "retrieval": False}
    both = evaluate(bb, ds, centers, config=EvalConfig(**base), progress=False)
    pgd_only = evaluate(
        bb, ds, centers, config=EvalConfig(**base, weak_attacks=("pgd",)), progress=False
    )
    w_both = both["modalities"]["vec"]["weak_top1"]
    assert w_both <= pgd_only["modalities"]["vec"]["weak_top1"]
