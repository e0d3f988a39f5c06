"""What an attack may do to one modality's input: the `InputSpec`.

Every backbone declares one spec per modality. Attacks read the valid range, the default
budget and the norm from it; data and backbones validate inputs against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from advcal.validation import check_fields

Norm = Literal["linf", "l2"]

MODALITIES = ("image", "video", "audio", "depth", "thermal", "point", "event", "imu", "text")


@dataclass(frozen=True)
class InputSpec:
    """One modality's input convention and threat model.

    Attributes:
        shape: per-sample shape, batch dimension excluded; ``-1`` marks a free size.
        lo, hi: valid input range (``None`` = unbounded on that side).
        eps: default attack budget, in input units (``4/255`` for pixels in [0, 1]).
        norm: ``"linf"`` or ``"l2"``.
        space: what the attack perturbs: ``"pixels"``, ``"waveform"``, ``"fbank"``, ``"points"``.
        description: one line for reports (units, layout).
    """

    shape: tuple[int, ...]
    lo: float | None = 0.0
    hi: float | None = 1.0
    eps: float = 4 / 255
    norm: Norm = "linf"
    space: str = "pixels"
    description: str = ""

    def __post_init__(self) -> None:
        check_fields(self)  # types first: shape=[3, "32"], norm="l1", eps=nan refused by name
        if not all(isinstance(s, int) and (s > 0 or s == -1) for s in self.shape):
            raise ValueError(f"InputSpec.shape must hold positive ints or -1, got {self.shape}")
        if self.lo is not None and self.hi is not None and not self.lo < self.hi:
            raise ValueError(f"InputSpec needs lo < hi, got lo={self.lo}, hi={self.hi}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"InputSpec.eps must be finite and >= 0, got {self.eps}")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"InputSpec.norm must be 'linf' or 'l2', got {self.norm!r}")
        self.check_eps(self.eps, "InputSpec.eps")

    @property
    def range(self) -> float | None:
        """Width of the valid range, or None when unbounded."""
        if self.lo is None or self.hi is None:
            return None
        return self.hi - self.lo

    def with_eps(self, eps: float) -> InputSpec:
        return replace(self, eps=float(eps))

    def eps_sweep(self, multipliers: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)) -> list[float]:
        """Budgets of an eps sweep, as multiples of this spec's default eps.

        With the pixel default ``4/255`` this is ``{1, 2, 4, 8}/255``; modalities with their own
        scale (points, L2 waveforms) sweep the same multiples of their own default.
        """
        return [self.eps * k for k in multipliers]

    def check_eps(self, eps: float, name: str = "eps") -> float:
        """Validate an attack budget against this spec; returns it as a float."""
        eps = float(eps)
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {eps}")
        if self.norm == "linf" and self.range is not None and eps > self.range:
            raise ValueError(
                f"{name}={eps:g} is larger than the valid range [{self.lo}, {self.hi}] of "
                f"'{self.space}' inputs; an L-inf budget above {self.range:g} is meaningless"
            )
        return eps

    def check_input(self, x: torch.Tensor, name: str = "x", modality: str = "") -> None:
        """Raise a clear error if ``x`` (a batch) does not fit this spec."""
        where = f" for modality '{modality}'" if modality else ""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}{where} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}{where} must be a floating tensor, got dtype {x.dtype}")
        if x.dim() != len(self.shape) + 1 or any(
            s != -1 and s != d for s, d in zip(self.shape, x.shape[1:], strict=False)
        ):
            want = "(B, " + ", ".join("*" if s == -1 else str(s) for s in self.shape) + ")"
            raise ValueError(f"{name}{where} must have shape {want}, got {tuple(x.shape)}")
        if x.numel() and not torch.isfinite(x).all():
            raise ValueError(f"{name}{where} contains NaN or Inf")
