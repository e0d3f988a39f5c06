import math

import pytest
import torch
import torch.nn.functional as F

from advcal.heads import CalibrationHeads
from advcal.objectives import (
    Objective,
    fixed_center_ce,
    infonce,
    l2_alignment,
    modality_consistency,
)

# Hand-built case: D = 2, centers e1, e2; tau = 0.5.
C = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TAU = 0.5


def test_fixed_center_ce_by_hand():
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # cos: (1, 0) and (1/sqrt2, 1/sqrt2)
    y = torch.tensor([0, 1])
    # row 0: logits (2, 0) -> -log(e^2 / (e^2 + 1)); row 1: equal logits -> log 2
    want = 0.5 * (math.log(1 + math.exp(-2)) + math.log(2))
    assert fixed_center_ce(z, C, y, TAU).item() == pytest.approx(want, rel=1e-6)


def test_l2_alignment_by_hand():
    z = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    e = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    # row 0: |(1,0) - (0,1)|^2 = 2; row 1: 0
    assert l2_alignment(z, e).item() == pytest.approx(1.0)


def test_infonce_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    e = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    # similarity matrix I / tau -> each row: -log(e^2 / (e^2 + 1))
    assert infonce(z, e, TAU).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_modality_consistency_by_hand():
    z = torch.tensor([[1.0, 0.0]])
    ref = torch.tensor([[1.0, 1.0]])  # uniform prediction
    p_adv = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    want = sum(0.5 * math.log(0.5 / p) for p in p_adv.tolist())
    assert modality_consistency(z, ref, C, TAU).item() == pytest.approx(want, rel=1e-6)
    probs = torch.tensor([[0.5, 0.5]])
    got = modality_consistency(z, probs, C, TAU, reference_is_prob=True)
    assert got.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("fn", ["ce", "l2", "infonce", "consistency"])
def test_gradients_match_finite_differences(fn):
    torch.manual_seed(0)
    z = torch.randn(5, 7, dtype=torch.double, requires_grad=True)
    e = torch.randn(5, 7, dtype=torch.double)
    c = F.normalize(torch.randn(3, 7, dtype=torch.double), dim=-1)
    y = torch.randint(0, 3, (5,))
    f = {
        "ce": lambda z: F.cross_entropy(F.normalize(z, dim=-1) @ c.T / TAU, y),
        "l2": lambda z: (F.normalize(z, dim=-1) - F.normalize(e, dim=-1)).pow(2).sum(-1).mean(),
        "infonce": lambda z: F.cross_entropy(
            F.normalize(z, dim=-1) @ F.normalize(e, dim=-1).T / TAU, torch.arange(5)
        ),
        "consistency": lambda z: F.kl_div(
            F.log_softmax(F.normalize(z, dim=-1) @ c.T / TAU, -1),
            F.softmax(F.normalize(e, dim=-1) @ c.T / TAU, -1),
            reduction="batchmean",
        ),
    }[fn]
    assert torch.autograd.gradcheck(f, (z,))
    # the public objective (fp32 internally) has the same gradient as the fp64 formula
    public = {
        "ce": lambda z: fixed_center_ce(z, c.float(), y, TAU),
        "l2": lambda z: l2_alignment(z, e.float()),
        "infonce": lambda z: infonce(z, e.float(), TAU),
        "consistency": lambda z: modality_consistency(z, e.float(), c.float(), TAU),
    }[fn]
    z32 = z.detach().float().requires_grad_(True)
    (g32,) = torch.autograd.grad(public(z32), z32)
    (g64,) = torch.autograd.grad(f(z), z)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["residual_linear", "mlp"])
def test_objective_weighted_sum_and_fused_ce(kind):
    torch.manual_seed(1)
    heads = CalibrationHeads(["m"], 6, kind=kind)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    e_adv, e_clean = torch.randn(8, 6), torch.randn(8, 6)
    c = F.normalize(torch.randn(3, 6), dim=-1)
    y = torch.randint(0, 3, (8,))
    obj = Objective(ce=1.0, l2=2.0, infonce=0.5, consistency=0.25, tau=0.1)
    loss, parts = obj(heads["m"], e_adv, e_clean, c, y)
    z = heads("m", e_adv)
    want = (
        fixed_center_ce(z, c, y, 0.1)
        + 2 * l2_alignment(z, e_clean)
        + 0.5 * infonce(z, e_clean, 0.1)
        + 0.25 * modality_consistency(z, e_clean, c, 0.1)
    )
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert set(parts) == {"ce", "l2", "infonce", "consistency"}
    loss.backward()
    assert all(p.grad is not None for p in heads.parameters())


def test_objective_validation():
    with pytest.raises(ValueError, match="weights"):
        Objective(ce=0, l2=0, infonce=0, consistency=0)
    with pytest.raises(ValueError, match="tau"):
        Objective(tau=0)
    with pytest.raises(ValueError, match="centers must be"):
        fixed_center_ce(torch.randn(2, 4), torch.randn(3, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be"):
        fixed_center_ce(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0]))
