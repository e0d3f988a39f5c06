"""advcal.cuda_graph.GraphedStep and advcal.profiling: CPU errors; CUDA capture vs eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

from advcal import profiling
from advcal.cuda_graph import GraphedStep
from advcal.ops import pgd_step_, random_start_


def test_cpu_tensors_raise_a_clear_error():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"static_tensors\[0\] is on cpu: CUDA graphs"):
        GraphedStep(lambda: x.add_(1), [x])
    assert torch.equal(x, torch.zeros(3))  # nothing ran


def test_bad_arguments():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(lambda: None, [torch.zeros(1)], warmup=0)
    with pytest.raises(ValueError, match="static_tensors is empty"):
        GraphedStep(lambda: None, [])
    with pytest.raises(TypeError, match="step_fn must be callable"):
        GraphedStep(None, [torch.zeros(1)])  # type: ignore[arg-type]


def test_nvtx_range_is_a_noop_without_cuda():
    with profiling.range("attack"), profiling.nvtx_range("inner"):
        y = torch.ones(2) * 2
    assert y.sum() == 4


def _pgd(model, x0, y, steps, alpha, eps, graph: bool):
    x_adv = x0.clone()
    random_start_(
        x_adv, x0, eps=eps, lo=0.0, hi=1.0, generator=torch.Generator(x0.device).manual_seed(0)
    )

    def step():
        x = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), y)
        (g,) = torch.autograd.grad(loss, x)
        pgd_step_(x_adv, g, x0, alpha=alpha, eps=eps, lo=0.0, hi=1.0)

    if graph:
        graphed = GraphedStep(step, [x_adv, x0, y])
        for _ in range(steps):
            graphed.replay()
    else:
        for _ in range(steps):
            step()
    torch.cuda.synchronize()
    return x_adv


@requires_cuda
def test_graph_replay_gives_identical_adversarial_examples():
    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(3 * 16 * 16, 64),
            torch.nn.GELU(),
            torch.nn.Linear(64, 10),
        )
        .cuda()
        .requires_grad_(False)
    )
    x0 = torch.rand(64, 3, 16, 16, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    eager = _pgd(model, x0, y, 10, 2 / 255, 8 / 255, graph=False)
    graphed = _pgd(model, x0, y, 10, 2 / 255, 8 / 255, graph=True)
    assert torch.equal(eager, graphed)
    assert ((eager - x0).abs() <= 8 / 255 + 1e-6).all()
    assert not torch.equal(eager, x0)


@requires_cuda
def test_warmup_state_is_restored():
    x = torch.zeros(4, device="cuda")
    graphed = GraphedStep(lambda: x.add_(1), [x], warmup=3)
    assert torch.equal(x, torch.zeros(4, device="cuda"))
    graphed.replay()
    graphed.replay()
    torch.cuda.synchronize()
    assert torch.equal(x, torch.full((4,), 2.0, device="cuda"))
