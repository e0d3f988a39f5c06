"""Fused PGD update with eps-ball projection, over lists of tensors (all modalities at once).

L-inf: ``x <- clamp(clamp(x + alpha * sign(g), x0 - eps, x0 + eps), lo, hi)``.
L2:    ``x <- proj_{||x - x0||_2 <= eps}(x + alpha * g / ||g||_2)`` per sample, then clamp.

(Reference implementation; the C++/CUDA extension lands behind the same function.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NORM_EPS = 1e-12


def _as_list(v, n: int, name: str) -> list:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"{name} has {len(v)} entries for {n} tensors")
        return list(v)
    return [v] * n


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    n = t.flatten(1).float().norm(dim=1).clamp_min(NORM_EPS)
    return n.view(-1, *([1] * (t.dim() - 1)))


def pgd_step_ref_(
    x_adv: Sequence[torch.Tensor],
    grad: Sequence[torch.Tensor],
    x_orig: Sequence[torch.Tensor],
    *,
    alpha,
    eps,
    lo=None,
    hi=None,
    norm: str = "linf",
) -> None:
    n = len(x_adv)
    alphas, epss = _as_list(alpha, n, "alpha"), _as_list(eps, n, "eps")
    los, his = _as_list(lo, n, "lo"), _as_list(hi, n, "hi")
    for x, g, x0, a, e, l, h in zip(x_adv, grad, x_orig, alphas, epss, los, his, strict=True):
        if norm == "linf":
            x.add_(torch.sign(g), alpha=a)
            x.copy_(torch.minimum(torch.maximum(x, x0 - e), x0 + e))
        elif norm == "l2":
            x.add_((g.float() / _per_sample_norm(g)).to(x.dtype), alpha=a)
            d = (x - x0).float()
            d = d * torch.clamp(e / _per_sample_norm(d), max=1.0)
            x.copy_(x0 + d.to(x.dtype))
        else:
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if l is not None or h is not None:
            x.clamp_(min=l, max=h)


def random_start_ref_(
    x_adv: Sequence[torch.Tensor],
    x_orig: Sequence[torch.Tensor],
    *,
    eps,
    lo=None,
    hi=None,
    norm: str = "linf",
    generator: torch.Generator | None = None,
) -> None:
    """``x_adv <- clamp(x0 + delta)``: delta ~ U(-eps, eps) (L-inf) or uniform in the L2 ball."""
    n = len(x_adv)
    epss, los, his = _as_list(eps, n, "eps"), _as_list(lo, n, "lo"), _as_list(hi, n, "hi")
    for x, x0, e, l, h in zip(x_adv, x_orig, epss, los, his, strict=True):
        if norm == "linf":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            x.copy_(x0 + ((2 * u - 1) * e).to(x.dtype))
        else:
            d = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            r = torch.rand(
                (x.shape[0],) + (1,) * (x.dim() - 1),
                generator=generator,
                device=x.device,
                dtype=torch.float32,
            )
            d = d / _per_sample_norm(d) * e * r
            x.copy_(x0 + d.to(x.dtype))
        if l is not None or h is not None:
            x.clamp_(min=l, max=h)


def pgd_step_(x_adv, grad, x_orig, *, alpha, eps, lo=None, hi=None, norm="linf") -> None:
    if isinstance(x_adv, torch.Tensor):
        x_adv, grad, x_orig = [x_adv], [grad], [x_orig]
    pgd_step_ref_(x_adv, grad, x_orig, alpha=alpha, eps=eps, lo=lo, hi=hi, norm=norm)


def random_start_(x_adv, x_orig, *, eps, lo=None, hi=None, norm="linf", generator=None) -> None:
    if isinstance(x_adv, torch.Tensor):
        x_adv, x_orig = [x_adv], [x_orig]
    random_start_ref_(x_adv, x_orig, eps=eps, lo=lo, hi=hi, norm=norm, generator=generator)
