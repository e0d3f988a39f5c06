"""APGD, APGD-T, FAB-T, Square, the ranking attack and the suites.

The reference points: a linear classifier without a range clamp, whose exact robustness is known
in closed form (L-inf: a sample is robust iff for every j != y,
``(w_y - w_j) . x + b_y - b_j > eps * ||w_y - w_j||_1``; L2: the same with ``||.||_2``), and
torchattacks' APGD / APGD-T (an attack library written elsewhere) on the same classifier.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advcal import InputSpec
from advcal.attacks import (
    APGD,
    APGDT,
    FAB,
    PGD,
    AttackSpec,
    AttackSuite,
    CrossMaxim,
    RankAttack,
    Square,
    UnitBox,
)
from advcal.attacks.iterative import apgd_checkpoints
from advcal.attacks.retrieval import competitors
from advcal.attacks.square import _layout, p_schedule

K, D, EPS = 10, 20, 0.1


def _linear(seed: int = 0, n: int = 600):
    """A linear classifier and correctly classified points, with the exact robust set for
    L-inf and L2 budgets (no range clamp), and each sample's distance to the boundary."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(D, K)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(K, D, generator=g))
        lin.bias.copy_(torch.randn(K, generator=g))
    x = torch.randn(n, D, generator=g)
    y = lin(x).argmax(1).detach()
    with torch.no_grad():
        dw = lin.weight[y][:, None, :] - lin.weight[None]  # (n, K, D): w_y - w_j
        margin = (dw * x[:, None, :]).sum(-1) + lin.bias[y][:, None] - lin.bias[None]
        own = F.one_hot(y, K).bool()
        dist = {
            "linf": (margin / dw.abs().sum(-1)).masked_fill(own, float("inf")).amin(1),
            "l2": (margin / dw.norm(dim=-1)).masked_fill(own, float("inf")).amin(1),
        }
    return lin, x, y, dist


def _spec(norm: str, eps: float = EPS) -> InputSpec:
    return InputSpec((D,), None, None, eps, norm, "values")


def _robust(model, xa, y):
    with torch.no_grad():
        return model(xa).argmax(1) == y


def test_apgd_checkpoints_follow_autoattack():
    # 0.22 N, then intervals shrinking by 0.03 N down to 0.06 N
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.3)])
def test_apgd_t_is_exact_on_a_linear_classifier(norm, eps):
    lin, x, y, dist = _linear()
    exact = dist[norm] > eps
    assert 0.2 < exact.float().mean() < 0.8, "the case must be mixed"
    xa = APGDT(lin, spec=_spec(norm, eps))(x, y)
    assert torch.equal(_robust(lin, xa, y), exact)
    d = (xa - x).abs().amax(1) if norm == "linf" else (xa - x).norm(dim=1)
    assert d.max() <= eps * (1 + 1e-5)


def test_cross_entropy_attacks_overstate_robustness_on_a_linear_classifier():
    """Why the suite has a targeted margin attack: CE-driven attacks miss samples it breaks."""
    lin, x, y, dist = _linear()
    exact = dist["linf"] > EPS
    ce = _robust(lin, APGD(lin, spec=_spec("linf"))(x, y), y)
    assert (ce >= exact).all(), "an attack never breaks a robust sample"
    assert (ce & ~exact).any(), "APGD-CE misses vulnerable samples that APGD-T breaks"


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.3)])
def test_fab_t_finds_every_sample_clearly_inside_the_budget(norm, eps):
    lin, x, y, dist = _linear()
    xa = FAB(lin, spec=_spec(norm, eps))(x, y)
    robust = _robust(lin, xa, y)
    assert not (~robust & (dist[norm] > eps)).any(), "never breaks a robust sample"
    # a minimum-norm attack approaches the boundary from outside: exact up to 0.5% of eps
    assert robust[dist[norm] < 0.995 * eps].sum() == 0
    d = (xa - x).abs().amax(1) if norm == "linf" else (xa - x).norm(dim=1)
    assert d.max() <= eps * (1 + 1e-5)


def test_square_black_box_nearly_matches_the_closed_form():
    lin, x, y, dist = _linear(n=300)
    robust = _robust(lin, Square(lin, spec=_spec("linf"), queries=1000)(x, y), y)
    exact = dist["linf"] > EPS
    assert (robust >= exact).all()
    assert (robust & ~exact).sum() <= 0.05 * len(y)


def test_square_refuses_l2():
    lin = _linear(n=4)[0]
    with pytest.raises(ValueError, match="L-inf"):
        Square(lin, spec=_spec("l2"))


def test_early_stop_gives_the_same_robust_set():
    lin, x, y, _ = _linear(n=300)
    for cls in (APGD, APGDT):
        a = _robust(lin, cls(lin, spec=_spec("linf"), early_stop=True, seed=3)(x, y), y)
        b = _robust(lin, cls(lin, spec=_spec("linf"), early_stop=False, seed=3)(x, y), y)
        assert torch.equal(a, b), cls.__name__


def test_apgd_t_default_targets_follow_the_class_count():
    lin, x, y, _ = _linear(n=8)
    atk = APGDT(lin, spec=_spec("linf"), steps=2)
    atk(x, y)
    assert atk.n_targets == 9
    four = nn.Linear(D, 4)
    atk = APGDT(four, spec=_spec("linf"), steps=2)
    atk(x, four(x).argmax(1).detach())
    assert atk.n_targets == 3
    with pytest.raises(ValueError, match="only 4 classes"):
        APGDT(four, spec=_spec("linf"), n_targets=5, steps=2)(x, four(x).argmax(1).detach())
    with pytest.raises(ValueError, match="at least 4 classes"):
        three = nn.Linear(D, 3)
        APGDT(three, spec=_spec("linf"), steps=2)(x, three(x).argmax(1).detach())


# -- ranges: audio's [-1, 1] and unbounded points -----------------------------------------


class _Audio(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 9, stride=4)
        self.fc = nn.Linear(8, K)

    def forward(self, x):
        return self.fc(self.conv(x[:, None]).relu().mean(-1) * 10)


class _Points(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 32))
        self.fc = nn.Linear(32, K)

    def forward(self, x):
        return self.fc(self.mlp(x).amax(1))


ATTACKS = {
    "apgd-ce": lambda m, s: APGD(m, spec=s, steps=20),
    "apgd-t": lambda m, s: APGDT(m, spec=s, steps=10, n_targets=3),
    "fab-t": lambda m, s: FAB(m, spec=s, steps=10, n_targets=3),
    "square": lambda m, s: Square(m, spec=s, queries=200),
    "pgd": lambda m, s: PGD(m, spec=s, steps=10),
    "crossmaxim": lambda m, s: CrossMaxim(m, spec=s, steps=10),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_audio_range_respected(name):
    torch.manual_seed(0)
    model = _Audio()
    spec = InputSpec((256,), -1.0, 1.0, 0.05, "linf", "waveform")
    x = (torch.rand(16, 256) * 2 - 1).clamp(-1, 1)
    x[:, :8] = 1.0  # samples on the range's edges: the attack must not leave it
    x[:, 8:16] = -1.0
    y = model(x).argmax(1).detach()
    xa = ATTACKS[name](model, spec)(x, y)
    assert xa.min() >= -1.0 and xa.max() <= 1.0
    assert (xa - x).abs().max() <= 0.05 + 1e-6
    assert not torch.equal(xa, x) or name == "fab-t"


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_points_are_not_clamped(name):
    torch.manual_seed(0)
    model = _Points()
    spec = InputSpec((64, 3), None, None, 0.05, "linf", "points")
    x = F.normalize(torch.randn(16, 64, 3), dim=-1)  # on the unit sphere: |x_i| <= 1
    y = model(x).argmax(1).detach()
    xa = ATTACKS[name](model, spec)(x, y)
    assert (xa - x).abs().max() <= 0.05 + 1e-6
    if name != "fab-t":  # FAB moves only when it finds a boundary close enough
        assert xa.abs().max() > 1.0, "an unbounded input is never clamped to the data's range"


# -- a second opinion: torchattacks -------------------------------------------------------


def _small_cnn(seed: int = 0):
    """A quickly trained 10-class CNN on 8x8 RGB blobs: accurate, not robust."""
    g = torch.Generator().manual_seed(seed)
    protos = 0.4 + 0.2 * torch.rand(K, 3, 8, 8, generator=g)
    y = torch.arange(400) % K
    x = (protos[y] + 0.1 * torch.randn(400, 3, 8, 8, generator=g)).clamp(0, 1)
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, K)
    )
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), x, y


def test_agrees_with_torchattacks_apgd_and_apgd_t():
    torchattacks = pytest.importorskip("torchattacks")
    net, x, y = _small_cnn()
    spec = InputSpec((3, 8, 8), 0.0, 1.0, 10 / 255)
    with torch.no_grad():
        assert (net(x).argmax(1) == y).float().mean() > 0.9

    def acc(xa):
        return float(_robust(net, xa, y).float().mean())

    ours_ce = acc(APGD(net, spec=spec, steps=50)(x, y))
    ours_t = acc(APGDT(net, spec=spec, steps=50)(x, y))
    theirs_ce = acc(torchattacks.APGD(net, eps=10 / 255, steps=50, loss="ce", seed=0)(x, y))
    theirs_t = acc(torchattacks.APGDT(net, eps=10 / 255, steps=50, n_classes=K, seed=0)(x, y))
    assert 0.1 < theirs_ce < 0.9, "the case must be mixed for the comparison to mean anything"
    assert abs(ours_ce - theirs_ce) <= 0.02
    assert abs(ours_t - theirs_t) <= 0.02


@pytest.mark.parametrize("kind", ["audio", "points", "video"])
def test_unit_box_is_the_modalitys_threat_model(kind):
    """UnitBox maps a classifier onto image batches in [0, 1] (what torchattacks takes):
    the same logits, the budget scaled exactly, an unbounded input's eps-ball inside the box."""
    torch.manual_seed(0)
    if kind == "audio":
        model, spec = _Audio(), InputSpec((256,), -1.0, 1.0, 0.05, "linf", "waveform")
        x = torch.rand(8, 256) * 2 - 1
    elif kind == "points":
        model, spec = _Points(), InputSpec((64, 3), None, None, 0.05, "linf", "points")
        x = 3 * torch.randn(8, 64, 3)
    else:
        net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 4 * 4, K))
        model, spec = net, InputSpec((2, 3, 4, 4), 0.0, 1.0, 4 / 255)
        x = torch.rand(8, 2, 3, 4, 4)
    box = UnitBox(model, x, spec=spec)
    u = box.to_unit(x)
    assert u.shape == (8, 1, 1, x[0].numel()) and u.min() >= 0 and u.max() <= 1
    assert torch.allclose(box.from_unit(u), x, atol=1e-5)  # fp32 of an affine map, |x| < 20
    assert torch.allclose(box(u), model(x), atol=1e-5)
    step = box.from_unit((u + box.eps).clamp(0, 1)) - x  # the budget's corner, back in x
    corner = step.abs().amax()
    if kind == "points":  # never clamped: every coordinate moved by eps exactly
        assert torch.allclose(step, torch.full_like(step, spec.eps), atol=1e-5)
        assert (u - box.eps).min() > 0 and (u + box.eps).max() < 1
    else:
        assert corner <= spec.eps + 1e-6


@pytest.mark.parametrize("kind", ["audio", "points"])
def test_torchattacks_through_a_unit_box_agrees_off_the_image_range(kind):
    """torchattacks' APGD-T through UnitBox on audio's [-1, 1] and on unbounded points finds
    what advcal's APGD-T finds there (within 2 samples of 40), inside the modality's ball."""
    torchattacks = pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    if kind == "audio":  # a waveform MLP (the _Audio conv net is robust at any small eps)
        model = nn.Sequential(nn.Linear(256, 32), nn.Tanh(), nn.Linear(32, K)).eval()
        spec = InputSpec((256,), -1.0, 1.0, 0.02, "linf", "waveform")
        x = torch.rand(40, 256) * 2 - 1
    else:
        model, spec = _Points().eval(), InputSpec((64, 3), None, None, 0.01, "linf", "points")
        x = F.normalize(torch.randn(40, 64, 3), dim=-1)
    for p in model.parameters():
        p.requires_grad_(False)
    y = model(x).argmax(1).detach()
    box = UnitBox(model, x, spec=spec)
    ua = torchattacks.APGDT(box, eps=box.eps, steps=30, n_classes=K, seed=0)(box.to_unit(x), y)
    theirs = box.from_unit(ua)
    assert (theirs - x).abs().max() <= spec.eps + 1e-5
    if spec.lo is not None:
        assert theirs.min() >= spec.lo and theirs.max() <= spec.hi
    ours = APGDT(model, spec=spec, steps=30, n_targets=K - 1)(x, y)
    n_theirs, n_ours = int(_robust(model, theirs, y).sum()), int(_robust(model, ours, y).sum())
    assert 0 < n_ours < 40, "the case must be mixed for the comparison to mean anything"
    assert abs(n_theirs - n_ours) <= 2


# -- the ranking attack --------------------------------------------------------------------


def test_rank_attack_pushes_the_paired_item_down_its_ranking():
    torch.manual_seed(0)
    embed = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, 16)).eval()
    spec = InputSpec((D,), None, None, 0.3, "linf", "values")
    x = torch.randn(64, D)
    with torch.no_grad():
        g = embed(x)
    q = g + 0.3 * torch.randn_like(g)  # paired queries, close to their items
    comp = competitors(q, g, k=10)
    xa = RankAttack(embed, spec=spec, steps=30)(x, q, comp)
    with torch.no_grad():
        own = lambda v: F.cosine_similarity(embed(v), q)  # noqa: E731
        clean_r1 = (own(x) > comp[:, 0]).float().mean()
        adv_r1 = (own(xa) > comp[:, 0]).float().mean()
    assert clean_r1 > 0.5
    assert adv_r1 < clean_r1 - 0.3
    assert (xa - x).abs().max() <= 0.3 + 1e-6


# -- suites --------------------------------------------------------------------------------


def test_suite_cascade_and_bookkeeping():
    lin, x, y, dist = _linear(n=300)
    suite = AttackSuite(lin, ["apgd-ce:50", "apgd-t:50", "square:200"], spec=_spec("linf"))
    assert suite.labels == ["apgd-ce-50", "apgd-t-50", "square-200q"]
    res = suite.run(x, y)
    exact = dist["linf"] > EPS
    assert torch.equal(res.robust, exact)
    after = list(res.after.values())
    assert all((b <= a).all() for a, b in itertools.pairwise(after)), "cumulative"
    assert sum(res.broken_by.values()) == int((~exact).sum())
    assert res.broken_by["apgd-t-50"] > 0, "APGD-T breaks what APGD-CE left"
    assert torch.equal(_robust(lin, res.worst, y), res.robust)


def test_suite_refuses_an_attack_that_leaves_the_ball():
    lin, x, y, _ = _linear(n=20)
    suite = AttackSuite(lin, ["apgd-ce:5"], spec=_spec("linf"))
    atk = suite.attacks["apgd-ce-5"]
    atk._run = lambda x0, yy: {"": x0[""] + 1.0}
    with pytest.raises(RuntimeError, match="outside the eps-ball"):
        suite.run(x, y)


def test_attack_spec_parsing_and_errors():
    assert AttackSpec.parse("apgd-t:100") == AttackSpec("apgd-t", 100)
    assert AttackSpec.parse({"name": "fab-t", "steps": 10, "n_targets": 3}).n_targets == 3
    with pytest.raises(ValueError, match="unknown attack"):
        AttackSpec.parse("apgd-x")
    with pytest.raises(ValueError, match="name:steps"):
        AttackSpec.parse("apgd-t:many")
    with pytest.raises(ValueError, match="n_targets applies"):
        AttackSpec("apgd-ce", n_targets=3)
    with pytest.raises(ValueError, match="unknown suite"):
        AttackSuite(nn.Linear(D, K), "strongest", spec=_spec("linf"))


def test_square_layouts_and_schedule():
    assert _layout((3, 32, 32)) == ((3, 32, 32), False)
    assert _layout((4, 3, 32, 32)) == ((12, 32, 32), False)
    assert _layout((2048,)) == ((1, 2048), False)
    assert _layout((128, 3)) == ((3, 128), True)
    assert p_schedule(0.8, 0, 5000) == 0.8
    assert p_schedule(0.8, 20, 5000) == 0.4  # past 0.1% of the queries
    assert p_schedule(0.8, 100, 5000) == 0.2  # past 1%
    assert p_schedule(0.8, 4999, 5000) == pytest.approx(0.8 / 512)


def _linf_step_brute(p, w, c, lo, hi):
    """The smallest L-inf step onto ``w.d = c`` inside ``[lo, hi]``, one row at a time by a
    full sort of the rooms (the textbook way), for checking :func:`hyperplane_step`."""
    out = []
    for pr, wr, cr in zip(p.double(), w.double(), c.double(), strict=True):
        direction = torch.sign(cr) * torch.sign(wr)
        room = torch.where(direction > 0, hi - pr, pr - lo).clamp_min(0)
        room = torch.where(direction == 0, torch.zeros_like(room), room)
        a, target = wr.abs(), cr.abs()
        t, done = float("inf"), False
        rs, order = room.sort()
        acc, slope = 0.0, float(a.sum())
        prev = 0.0
        for r, ai in zip(rs.tolist(), a[order].tolist(), strict=True):
            if acc + slope * (r - prev) >= target:  # reached inside [prev, r]
                t, done = prev + (float(target) - acc) / slope, True
                break
            acc += slope * (r - prev)
            slope -= ai
            prev = r
        out.append(direction * torch.minimum(torch.tensor(t, dtype=torch.float64), room) if done
                   else direction * room)  # fmt: skip
    return torch.stack(out).float()


@pytest.mark.parametrize("saturated", [0.0, 0.3])
def test_fab_linf_step_is_the_exact_minimum(saturated):
    from advcal.attacks.fab import hyperplane_step

    g = torch.Generator().manual_seed(1)
    p = torch.rand(40, 300, generator=g)
    sat = torch.rand(40, 300, generator=g) < saturated
    p = torch.where(sat, (torch.rand(40, 300, generator=g) > 0.5).float(), p)
    w = torch.randn(40, 300, generator=g)
    w[:, :10] = 0  # coordinates the hyperplane does not see
    c = torch.randn(40, generator=g) * torch.linspace(0.1, 40, 40)  # up to unreachable
    ours = hyperplane_step(p, w, c, 0.0, 1.0, "linf")
    ref = _linf_step_brute(p, w, c, 0.0, 1.0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    reach = (w * ours).sum(1)
    ok = (reach - c).abs() <= 1e-3 * c.abs().clamp_min(1)
    saturated_rows = (ours.abs().amax(1) > 0) & ~ok
    assert ok.any() and (ok | saturated_rows).all()
