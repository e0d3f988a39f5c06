"""Multi-center scoring (advcal.centers) through the classifier, objectives, attacks, evaluator
and Calibrator: one center per class must reproduce the plain (K, D) path exactly; many centers
score a class by its nearest one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advcal import centers as ac
from advcal.attacks import PGD, CrossMaxim, ZeroShotClassifier
from advcal.calibrate import CalibConfig, Calibrator
from advcal.evaluate import EvalConfig, evaluate
from advcal.heads import CalibrationHeads
from advcal.objectives import Objective


def _one_per_class(centers: torch.Tensor, names) -> ac.MultiCenters:
    return ac.MultiCenters(centers, torch.arange(centers.shape[0]), list(names))


def _spread(centers: torch.Tensor, names, per_class: int = 3, seed: int = 0) -> ac.MultiCenters:
    """``per_class`` noisy copies of every center, shuffled (labels not sorted)."""
    g = torch.Generator().manual_seed(seed)
    k, d = centers.shape
    c = centers.repeat_interleave(per_class, 0) + 0.3 * torch.randn(k * per_class, d, generator=g)
    labels = torch.arange(k).repeat_interleave(per_class)
    perm = torch.randperm(k * per_class, generator=g)
    return ac.MultiCenters(F.normalize(c[perm], dim=-1), labels[perm], list(names))


def test_class_logits_is_the_nearest_center_per_class():
    logits = torch.tensor([[0.1, 0.9, 0.3, -0.2], [0.5, -1.0, 0.4, 0.8]])
    labels = torch.tensor([0, 1, 0, 2])
    got = ac.class_logits(logits, labels, 4)
    want = torch.tensor([[0.3, 0.9, -0.2, -float("inf")], [0.5, -1.0, 0.8, -float("inf")]])
    assert torch.equal(got, want)
    assert ac.class_logits(logits, None, 4) is logits


def test_one_center_per_class_reproduces_the_plain_classifier(toy):
    bb, centers, ds = toy
    heads = CalibrationHeads(["img"], bb.embed_dim, kind="residual_linear")
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = ds.inputs["img"][:24], ds.labels[:24]
    plain = ZeroShotClassifier(bb, "img", centers, heads["img"])
    multi = ZeroShotClassifier(bb, "img", _one_per_class(centers, ds.class_names), heads["img"])
    assert multi.multi_center and not plain.multi_center
    with torch.no_grad():
        torch.testing.assert_close(multi(x), plain(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            multi.cross_entropy(x, y), plain.cross_entropy(x, y), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            multi.target_cos(x, y), plain.target_cos(x, y), rtol=1e-6, atol=1e-6
        )
    obj = Objective(consistency=0.5)
    e = bb.encode("img", x)
    a, _ = obj(heads["img"], e, e.flip(0), centers, y)
    b, _ = obj(heads["img"], e, e.flip(0), _one_per_class(centers, ds.class_names), y)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_many_centers_score_by_the_nearest_and_attacks_use_them(toy):
    bb, centers, ds = toy
    mc = _spread(centers, ds.class_names)
    clf = ZeroShotClassifier(bb, "img", mc)
    x, y = ds.inputs["img"][:24], ds.labels[:24]
    with torch.no_grad():
        z = F.normalize(bb.encode("img", x), dim=-1)
        cos = z @ mc.centers.T  # (B, M)
        want = torch.stack([cos[:, mc.labels == k].max(1).values for k in range(4)], 1)
        torch.testing.assert_close(clf(x), want / clf.tau, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clf.target_cos(x, y), want.gather(1, y[:, None]).squeeze(1))
    for cls in (PGD, CrossMaxim):
        atk = cls(clf, steps=5)
        x_adv = atk(x, y)
        assert (x_adv - x).abs().max() <= clf.spec.eps + 1e-6
        with torch.no_grad():
            assert atk.loss(clf, x_adv, y).mean() > atk.loss(clf, x, y).mean()


def test_evaluate_and_calibrate_with_multi_centers(toy):
    bb, centers, ds = toy
    mc = _spread(centers, ds.class_names)
    cfg = EvalConfig(
        suite=("apgd-ce:3", "apgd-t:3"), sweep_suite=("apgd-ce:2",), weak=("pgd:2",), compare=()
    )
    rep = evaluate(bb, ds, mc, None, config=cfg, progress=False)
    clf = ZeroShotClassifier(bb, "img", mc)
    with torch.no_grad():
        clean = (clf(ds.inputs["img"]).argmax(1) == ds.labels).float().mean().item()
    assert rep.modalities["img"].clean_top1 == pytest.approx(clean)
    assert set(rep.retrieval) >= {"text->img", "img->vec"}
    cal = Calibrator(bb, mc, ["img", "vec"], CalibConfig(epochs=1, batch_size=32, attack_steps=2))
    heads = cal.fit(ds, progress=False)
    assert any(p.abs().sum() > 0 for p in heads.parameters())


def test_save_load_and_relabel(tmp_path, toy):
    _, centers, ds = toy
    mc = _spread(centers, ds.class_names)
    path = ac.save_centers(tmp_path / "c.safetensors", mc.centers, mc.labels, mc.class_names)
    back = ac.load_centers(path)
    assert torch.equal(back.labels, mc.labels) and back.class_names == mc.class_names
    torch.testing.assert_close(back.centers, mc.centers)
    # a file holding the classes in another order, plus one the dataset lacks
    names = ["d", "c", "b", "a", "extra"]
    other = ac.MultiCenters(
        torch.cat([mc.centers, mc.centers[:2]]),
        torch.cat([3 - mc.labels, torch.tensor([4, 4])]),
        names,
    )
    fixed = ac.for_classes(other, ds.class_names)
    assert fixed.class_names == list(ds.class_names)
    assert torch.equal(fixed.labels, mc.labels)  # "a" is class 0 again, "extra" dropped
    torch.testing.assert_close(fixed.centers, mc.centers)
    with pytest.raises(ValueError, match=r"no centers for classes \['e'\]"):
        ac.for_classes(mc, [*ds.class_names, "e"])


def test_bad_centers(tmp_path, toy):
    bb, centers, ds = toy
    with pytest.raises(TypeError, match="centers must be a"):
        ac.split([[1.0, 0.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"labels must be \(4,\) int64"):
        ac.split(ac.MultiCenters(centers, torch.arange(3), list(ds.class_names)))
    with pytest.raises(ValueError, match="centers must be"):
        ZeroShotClassifier(bb, "img", ac.MultiCenters(centers[:, :5], torch.arange(4), ["a"] * 4))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable centers file"):
        ac.load_centers(bad)
    with pytest.raises(FileNotFoundError):
        ac.load_centers(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="is a pickle"):
        ac.load_centers(tmp_path / "c.pkl")
    with pytest.raises(ValueError, match="cover 3 classes"):
        evaluate(bb, ds, centers[:3], None, config=EvalConfig(suite=("apgd-ce:1",)), progress=False)
