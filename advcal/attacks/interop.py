"""Attack an advcal classifier with a library that assumes image batches in [0, 1].

torchattacks and AutoAttack clamp every iterate to [0, 1] and shape their buffers for
``(B, C, H, W)`` batches. advcal's modalities are not all like that: audio lies in [-1, 1],
point clouds are unbounded, video is ``(B, T, C, H, W)``, audio ``(B, L)``. :class:`UnitBox`
re-expresses a classifier over the unit box with every sample flattened to ``(B, 1, 1, n)``,
and gives the L-inf budget in those coordinates, so such a library attacks exactly the
modality's threat model:

* bounded inputs: ``x = lo + (hi - lo) u``, budget ``eps / (hi - lo)``;
* unbounded inputs: ``x = c + s (u - 1/2)`` with ``s`` wide enough around the given samples
  that the library's clamp never reaches their eps-ball.

    box = UnitBox(run.classifier("audio"), x)        # x: the samples you will attack
    u_adv = torchattacks.APGDT(box, eps=box.eps, steps=100)(box.to_unit(x), y)
    x_adv = box.from_unit(u_adv)                      # back in the modality's own layout
"""

from __future__ import annotations

import torch
from torch import nn


class UnitBox(nn.Module):
    """``u`` of shape ``(B, 1, 1, n)`` in [0, 1] -> the modality's input -> ``model``'s logits.

    Args:
        model: a classifier with a ``spec`` (:class:`~advcal.InputSpec`), e.g.
            :class:`~advcal.ZeroShotClassifier`.
        x: samples in the modality's layout; their shape, and for unbounded inputs their
            extent, fix the box.
        spec: overrides ``model.spec``.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, spec=None) -> None:
        super().__init__()
        spec = spec if spec is not None else model.spec
        if spec.norm != "linf":
            raise ValueError(f"UnitBox maps the L-inf threat model; this spec is {spec.norm}")
        if (spec.lo is None) != (spec.hi is None):
            raise ValueError("UnitBox maps a range bounded on both sides or on neither")
        self.model, self.shape = model, tuple(x.shape[1:])
        if spec.lo is not None and spec.hi is not None:
            self.offset, self.scale = float(spec.lo), float(spec.hi - spec.lo)
        else:  # the clamp at [0, 1] stays 2 eps away from every sample's eps-ball
            reach = float(x.detach().abs().max()) + 4 * spec.eps
            self.offset, self.scale = -reach, 2 * reach
        self.eps = float(spec.eps) / self.scale

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        return self.offset + self.scale * u.reshape(len(u), *self.shape)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.offset) / self.scale).clamp(0, 1).reshape(len(x), 1, 1, -1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(self.from_unit(u))


__all__ = ["UnitBox"]
