import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

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
    bb = toy[0]
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
    with pytest.raises(ValueError, match="loss is 'cos'"):
        CrossMaxim(clf, loss="ce")
    bb, centers, _ = toy
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        ZeroShotClassifier(bb, "audio", centers)
    with pytest.raises(ValueError, match="centers must be"):
        ZeroShotClassifier(bb, "img", F.normalize(torch.randn(4, 5), dim=-1))


def test_parameters_frozen_only_during_the_attack(toy):
    bb = toy[0]
    heads = CalibrationHeads(["img"], bb.embed_dim, kind="mlp")  # forward() runs in the loop
    clf, x, y = _clf(toy, head=heads["img"])
    seen = []
    hook = heads["img"].register_forward_pre_hook(
        lambda mod, args: seen.append(mod.fc1.weight.requires_grad)
    )
    PGD(clf, steps=2)(x, y)
    hook.remove()
    assert seen and not any(seen), "no weight gradient may be computed inside the attack"
    assert all(p.requires_grad for p in heads.parameters()), "requires_grad is restored"


def test_cuda_graph_needs_cuda_inputs(toy):
    clf, x, y = _clf(toy)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA inputs"):
        PGD(clf, steps=2, cuda_graph=True)(x, y)


def test_nvtx_ranges_cover_the_attack(toy, monkeypatch):
    from advcal import profiling

    names: list[str] = []
    monkeypatch.setattr(profiling, "enabled", lambda: True)
    monkeypatch.setattr(profiling, "_nvtx", None)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: names.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: None)
    clf, x, y = _clf(toy)
    PGD(clf, steps=2)(x, y)
    for want in ("attack/pgd", "backbone_forward", "head_loss", "backward", "update"):
        assert f"advcal:{want}" in names, (want, sorted(set(names)))


@requires_cuda
@pytest.mark.parametrize("cls", [PGD, CrossMaxim])
def test_cuda_graph_gives_the_eager_adversarial_examples(toy, cls):
    bb, centers, ds = toy
    bb = bb.to("cuda")
    heads = CalibrationHeads(["img", "vec"], bb.embed_dim, kind="residual_linear").cuda()
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    clfs = {
        m: ZeroShotClassifier(bb, m, centers.cuda(), heads[m]) for m in ("img", "vec")
    }  # L-inf and L2 modalities in one call
    xs = {m: ds.inputs[m][:32].cuda() for m in clfs}
    y = ds.labels[:32].cuda()
    eager = cls(clfs, steps=5, restarts=1, seed=7)(xs, y)
    graphed_atk = cls(clfs, steps=5, restarts=1, seed=7, cuda_graph=True)
    graphed = graphed_atk(xs, y)
    again = graphed_atk(xs, y)  # replays the captured graph with refilled buffers
    for m in clfs:
        assert torch.equal(eager[m], graphed[m]), m
        assert torch.equal(eager[m], again[m]), m
        assert not torch.equal(eager[m], xs[m])
    assert len(graphed_atk._graphs) == 1
    graphed_atk({m: v[:16] for m, v in xs.items()}, y[:16])  # a new shape: a second graph
    assert len(graphed_atk._graphs) == 2


@requires_cuda
def test_cuda_graph_restarts_keep_the_worst_case(toy):
    """With a graph (training semantics), every restart runs the full batch and the per-sample
    worst case is kept: a sample broken once stays broken."""
    bb, centers, ds = toy
    clf = ZeroShotClassifier(bb.to("cuda"), "img", centers.cuda())
    x, y = ds.inputs["img"][:32].cuda(), ds.labels[:32].cuda()
    one = PGD(clf, eps=0.08, steps=3, restarts=1, seed=5, cuda_graph=True)(x, y)
    two = PGD(clf, eps=0.08, steps=3, restarts=2, seed=5, cuda_graph=True)(x, y)
    with torch.no_grad():
        broken_one = clf(one).argmax(1) != y
        broken_two = clf(two).argmax(1) != y
    assert (broken_two | ~broken_one).all()


def test_training_restarts_keep_the_worst_case(toy):
    clf, x, y = _clf(toy)
    one = PGD(clf, eps=0.08, steps=3, restarts=1, seed=5)(x, y)
    two = PGD(clf, eps=0.08, steps=3, restarts=2, seed=5)(x, y)
    with torch.no_grad():
        broken_one = clf(one).argmax(1) != y
        broken_two = clf(two).argmax(1) != y
        loss_one, loss_two = (F.cross_entropy(clf(v), y, reduction="none") for v in (one, two))
    assert (broken_two | ~broken_one).all(), "a second restart never un-breaks a sample"
    both = broken_one == broken_two
    assert (loss_two[both] >= loss_one[both] - 1e-6).all(), "nor lowers its loss"


def test_later_restarts_attack_only_the_survivors(toy):
    clf, x, y = _clf(toy)
    one = PGD(clf, eps=0.08, steps=3, restarts=1, seed=5, early_stop=True)(x, y)
    # restart 1 is the same attack; restart 2 only re-attacks what it left unbroken
    two = PGD(clf, eps=0.08, steps=3, restarts=2, seed=5, early_stop=True)(x, y)
    with torch.no_grad():
        broken_one = clf(one).argmax(1) != y
        broken_two = clf(two).argmax(1) != y
    assert broken_one.any() and (~broken_one).any(), "the toy case must be mixed"
    assert (broken_two | ~broken_one).all(), "a second restart never un-breaks a sample"
    assert torch.equal(two[broken_one], one[broken_one]), "broken samples are not re-attacked"
    d = (two - x).abs().flatten(1).max(1).values
    assert (d <= 0.08 + 1e-6).all()
