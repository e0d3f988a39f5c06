"""Clean-adversarial InfoNCE over a batch.

``loss = mean_i CE(normalize(z_adv_i) . normalize(z_clean_j) / tau over j, target i)``;
``symmetric=True`` averages with the transposed direction.

(Reference implementation; the tiled Triton path lands behind the same function.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12


def infonce_ref(
    z_adv: torch.Tensor, z_clean: torch.Tensor, tau: float, *, symmetric: bool = False
) -> torch.Tensor:
    a = F.normalize(z_adv.float(), dim=-1, eps=NORM_EPS)
    c = F.normalize(z_clean.float(), dim=-1, eps=NORM_EPS)
    logits = a @ c.T / tau
    target = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def infonce(z_adv, z_clean, tau, *, symmetric=False):
    return infonce_ref(z_adv, z_clean, tau, symmetric=symmetric)
