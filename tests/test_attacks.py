import pytest
import torch
import torch.nn.functional as F

from advcal.attacks import PGD, CrossMaxim, ZeroShotClassifier
from advcal.heads import CalibrationHeads


def _clf(toy, m="img", head=None):
    bb, centers, ds = toy
    return ZeroShotClassifier(bb, m, centers, head), ds.inputs[m][:32], ds.labels[:32]


@pytest.mark.parametrize("cls", [PGD, CrossMaxim])
@pytest.mark.parametrize("m", ["img", "vec"])  # img: L-inf in [0, 1]; vec: L2 in [-1, 1]
def test_stays_in_ball_and_range_and_raises_loss(toy, cls, m):
    clf, x, y = _clf(toy, m)
    spec = clf.spec
    atk = cls(clf, steps=10, restarts=2)
    x_adv = atk(x, y)
    d = (x_adv - x).flatten(1)
    if spec.norm == "linf":
        assert d.abs().max() <= spec.eps + 1e-6
    else:
        assert d.norm(dim=1).max() <= spec.eps + 1e-5
    assert x_adv.min() >= spec.lo and x_adv.max() <= spec.hi
    with torch.no_grad():
        assert atk.loss(clf, x_adv, y).mean() > atk.loss(clf, x, y).mean()
    assert not torch.equal(x_adv, x)


def test_attack_lowers_accuracy_and_large_eps_breaks(toy):
    clf, x, y = _clf(toy)
    with torch.no_grad():
        clean = (clf(x).argmax(1) == y).float().mean()
        weak = (clf(PGD(clf, steps=10)(x, y)).argmax(1) == y).float().mean()
        big = (clf(PGD(clf, eps=0.5, steps=20)(x, y)).argmax(1) == y).float().mean()
    assert clean > 0.9
    assert weak < clean
    assert big <= 0.05


def test_adaptive_through_head_and_no_side_effects(toy):
    bb, centers, ds = toy
    heads = CalibrationHeads(["img"], bb.embed_dim, kind="mlp")
    heads.train()
    clf, x, y = _clf(toy, head=heads["img"])
    before = [p.detach().clone() for p in heads.parameters()]
    x_adv = PGD(clf, steps=3)(x, y)
    assert heads.training, "the attack must restore the model's mode"
    assert all(p.grad is None for p in heads.parameters()), "no parameter gradients"
    assert all(torch.equal(a, b) for a, b in zip(before, heads.parameters(), strict=True))
    # the head is in the loop: a head that flips the embedding changes the adversarial example
    with torch.no_grad():
        heads["img"].fc2.weight.normal_()
    assert not torch.equal(PGD(clf, steps=3)(x, y), x_adv)


def test_seeded_and_multimodal_dict(toy):
    bb, centers, ds = toy
    clfs = {m: ZeroShotClassifier(bb, m, centers) for m in ("img", "vec")}
    xs = {m: ds.inputs[m][:16] for m in clfs}
    y = ds.labels[:16]
    a = PGD(clfs, steps=4, seed=3)(xs, y)
    b = PGD(clfs, steps=4, seed=3)(xs, y)
    assert set(a) == {"img", "vec"}
    assert all(torch.equal(a[m], b[m]) for m in a)
    # each modality alone gives the same result as together (independent per-modality updates)
    single = PGD(clfs["img"], steps=4, seed=3, random_start=False)(xs["img"], y)
    both = PGD(clfs, steps=4, seed=3, random_start=False)(xs, y)
    assert torch.equal(single, both["img"])


def test_crossmaxim_pushes_away_from_true_center(toy):
    clf, x, y = _clf(toy)
    x_adv = CrossMaxim(clf, steps=10)(x, y)
    with torch.no_grad():
        assert clf.target_cos(x_adv, y).mean() < clf.target_cos(x, y).mean()


def test_bad_inputs(toy):
    clf, x, y = _clf(toy)
    with pytest.raises(ValueError, match="larger than the valid range"):
        PGD(clf, eps=2.0)
    with pytest.raises(ValueError, match="eps must be finite"):
        PGD(clf, eps=-0.1)
    with pytest.raises(ValueError, match="shape"):
        PGD(clf)(x[:, :2], y)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        PGD(clf)(bad, y)
    with pytest.raises(ValueError, match="outside its valid range"):
        PGD(clf)(x + 2, y)
    with pytest.raises(ValueError, match="batch"):
        PGD(clf)(x, y[:3])
    with pytest.raises(TypeError, match="target_cos"):
        CrossMaxim(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4)),
                   spec=clf.spec)(x, y)
    bb, centers, _ = toy
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        ZeroShotClassifier(bb, "audio", centers)
    with pytest.raises(ValueError, match="centers must be"):
        ZeroShotClassifier(bb, "img", F.normalize(torch.randn(4, 5), dim=-1))
