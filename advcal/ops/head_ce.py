"""Head projection + L2 normalisation + logits against fixed centers (+ cross-entropy).

``z = e + e W^T + b`` (residual) or ``z = e W^T + b``; ``logits = normalize(z) C^T / tau``;
loss = cross-entropy(logits, labels). Centers ``C`` (K, D) are unit-norm rows, frozen.

(Reference implementation; the fused Triton path lands behind the same functions.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12


def project_ref(
    e: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: bool
) -> torch.Tensor:
    """The head: ``e + e W^T + b`` (residual) or ``e W^T + b``; identity when weight is None."""
    z = e if weight is None else F.linear(e, weight, bias)
    if weight is None and bias is not None:
        z = z + bias
    if residual and weight is not None:
        z = e + z
    return z


def head_logits_ref(
    e: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    centers: torch.Tensor,
    tau: float,
    *,
    residual: bool = True,
) -> torch.Tensor:
    """Logits ``(B, K)`` in fp32 of the calibrated embedding against the centers."""
    z = project_ref(e, weight, bias, residual).float()
    return F.normalize(z, dim=-1, eps=NORM_EPS) @ centers.float().T / tau


def head_ce_ref(
    e: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    centers: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    *,
    residual: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    logits = head_logits_ref(e, weight, bias, centers, tau, residual=residual)
    return F.cross_entropy(logits, labels, reduction=reduction)


def head_logits(e, weight, bias, centers, tau, *, residual=True):
    return head_logits_ref(e, weight, bias, centers, tau, residual=residual)


def head_ce(e, weight, bias, centers, labels, tau, *, residual=True, reduction="mean"):
    return head_ce_ref(
        e, weight, bias, centers, labels, tau, residual=residual, reduction=reduction
    )
