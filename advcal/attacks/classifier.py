"""The calibrated chain as a classifier: ``x -> logits`` through the frozen backbone, the head and
the fixed centers. Attacks built on it are adaptive: they differentiate through backbone AND head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advcal import ops
from advcal.backbones.base import Backbone
from advcal.centers import Centers, class_logits, split
from advcal.heads import Head
from advcal.profiling import nvtx_range


class ZeroShotClassifier(nn.Module):
    """``x -> logits``: frozen ``backbone.encode(m, x)`` -> ``head`` -> cos vs ``centers`` / tau.

    ``centers``: ``(K, D)`` (one per class) or :class:`advcal.centers.MultiCenters` (many per
    class; a class scores its nearest center). ``head=None`` gives the frozen model. Logits are
    fp32 ``(B, K)``.
    """

    def __init__(
        self,
        backbone: Backbone,
        modality: str,
        centers: Centers,
        head: Head | None = None,
        tau: float = 0.07,
    ) -> None:
        super().__init__()
        self.spec = backbone.spec(modality)  # validates the modality
        try:
            c, labels, self.num_classes = split(centers, backbone.embed_dim)
        except ValueError as err:
            raise ValueError(f"{err} (backbone '{backbone.name}')") from err
        self.backbone, self.modality, self.head, self.tau = backbone, modality, head, tau
        self.register_buffer("centers", c, persistent=False)
        self.register_buffer("center_labels", labels, persistent=False)

    @property
    def multi_center(self) -> bool:
        return self.center_labels is not None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen backbone embedding (before the head), ``(B, D)``."""
        with nvtx_range("backbone_forward"):
            return self.backbone.encode(self.modality, x, check=False)

    def _head_args(self, e: torch.Tensor):
        """``(input, weight, bias, residual)`` for the fused ops: linear heads go into the op;
        an MLP head runs first and the op sees its output."""
        if self.head is None:
            return e, None, None, False
        fused = self.head.fused()
        if fused is None:
            return self.head(e), None, None, False
        return (e, *fused)

    def logits_from_embedding(self, e: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        x, w, b, residual = self._head_args(e)
        tau = self.tau if tau is None else tau
        logits = ops.head_logits(x, w, b, self.centers, tau, residual=residual)
        return class_logits(logits, self.center_labels, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_embedding(self.embed(x))

    def cross_entropy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample cross-entropy ``(B,)`` fp32 of the logits (PGD's objective): one fused op
        (projection + normalisation + logits + CE), no ``(B, K)`` logits written out."""
        e = self.embed(x)
        with nvtx_range("head_loss"):
            if self.multi_center:  # per-class max over centers first, then CE
                return F.cross_entropy(self.logits_from_embedding(e), y, reduction="none")
            inp, w, b, residual = self._head_args(e)
            return ops.head_ce(
                inp, w, b, self.centers, y, self.tau, residual=residual, reduction="none"
            )

    def target_cos(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``cos(z, c_y)`` per sample (CrossMaxim's objective), one fused op; with many centers
        per class, the cosine to the nearest center of class ``y``."""
        e = self.embed(x)
        with nvtx_range("head_loss"):
            if self.multi_center:
                return self.logits_from_embedding(e, tau=1.0).gather(1, y[:, None]).squeeze(1)
            inp, w, b, residual = self._head_args(e)
            return ops.head_target_cos(inp, w, b, self.centers, y, residual=residual)


__all__ = ["ZeroShotClassifier"]
