"""Per-sample attack losses from logits, every one *maximised* by the attack.

``logits`` ``(R, K)`` fp32, ``y`` ``(R,)`` int64 true labels, ``t`` ``(R,)`` int64 targets (the
targeted losses), ``ref`` ``(R, K)`` reference logits (TRADES' clean logits). Each returns ``(R,)``.

* ``ce``: cross-entropy (PGD, APGD-CE). Its gradient fades once the true class is far behind,
  and heads trained against it learn to flatten it: it overstates robustness on its own.
* ``dlr``: Croce & Hein's difference-of-logits ratio, ``-(z_y - max_{j!=y} z_j) / (z_pi1 -
  z_pi3)``: a margin, invariant to the logits' scale and shift (so a temperature or a
  calibrated head cannot hide behind a saturated softmax). Needs K >= 3.
* ``dlr_t``: targeted DLR, ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (APGD-T). K >= 4.
* ``margin``: ``max_{j!=y} z_j - z_y`` (the black-box Square attack's objective; > 0: fooled).
* ``cos``: ``-z_y``; for zero-shot logits ``cos(z, c_y) / tau`` this is CrossMaxim's push away
  from the true class's (nearest) center, up to the constant ``tau``.
* ``kl``: ``KL(softmax(ref) || softmax(logits))`` (TRADES' inner maximisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DLR_EPS = 1e-12


def _other_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j`` per row."""
    return logits.scatter(1, y[:, None], -float("inf")).amax(1)


def ce(logits: torch.Tensor, y: torch.Tensor, **_) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def dlr(logits: torch.Tensor, y: torch.Tensor, **_) -> torch.Tensor:
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    top = logits.topk(3, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return -(z_y - _other_max(logits, y)) / (top[:, 0] - top[:, 2] + DLR_EPS)


def dlr_t(logits: torch.Tensor, y: torch.Tensor, *, t: torch.Tensor, **_) -> torch.Tensor:
    if logits.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {logits.shape[1]}")
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, t[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + DLR_EPS)


def margin(logits: torch.Tensor, y: torch.Tensor, **_) -> torch.Tensor:
    return _other_max(logits, y) - logits.gather(1, y[:, None]).squeeze(1)


def cos(logits: torch.Tensor, y: torch.Tensor, **_) -> torch.Tensor:
    return -logits.gather(1, y[:, None]).squeeze(1)


def kl(logits: torch.Tensor, y: torch.Tensor, *, ref: torch.Tensor, **_) -> torch.Tensor:
    return F.kl_div(
        F.log_softmax(logits, 1), F.log_softmax(ref, 1), log_target=True, reduction="none"
    ).sum(1)


LOSSES = {"ce": ce, "dlr": dlr, "dlr_t": dlr_t, "margin": margin, "cos": cos, "kl": kl}
TARGETED = ("dlr_t",)
MIN_CLASSES = {"dlr": 3, "dlr_t": 4}


def check(name: str, num_classes: int | None = None) -> str:
    """Validate a loss name (and the class count it needs); returns it."""
    if name not in LOSSES:
        raise ValueError(f"unknown attack loss {name!r}; choose from {sorted(LOSSES)}")
    need = MIN_CLASSES.get(name, 2)
    if num_classes is not None and num_classes < need:
        raise ValueError(f"the {name!r} loss needs at least {need} classes, got {num_classes}")
    return name


__all__ = ["LOSSES", "TARGETED", "ce", "check", "cos", "dlr", "dlr_t", "kl", "margin"]
