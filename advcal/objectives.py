"""The calibration objectives, on adversarial inputs (``e_clean`` is the frozen clean embedding,
a constant; ``z`` the calibrated adversarial embedding; ``C`` the fixed unit-norm centers).

* :func:`fixed_center_ce`: cross-entropy of ``cos(z, C) / tau`` against the label.
* :func:`l2_alignment`: ``|| normalize(z) - normalize(e_clean) ||^2`` (mean over the batch).
* :func:`infonce`: contrastive loss between ``z_i`` and ``normalize(e_clean_j)`` over the batch.
* :func:`modality_consistency`: ``KL(p_clean || p_adv)`` over the centers: keeps each calibrated
  modality's predictions consistent with the frozen shared space (the reference prediction can be
  the same instance's prediction in the *other* modalities, when a batch pairs them).

:class:`Objective` is their weighted sum; a weight of 0 drops a term (ablations).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from advcal import ops
from advcal.centers import Centers, MultiCenters, zero_shot_logits
from advcal.heads import Head
from advcal.validation import check_fields


def _check(z: torch.Tensor, centers: Centers | None = None, labels=None) -> None:
    if z.dim() != 2:
        raise ValueError(f"embeddings must be (B, D), got {tuple(z.shape)}")
    if centers is not None and tuple(centers.shape)[1:] != (z.shape[1],):
        raise ValueError(
            f"centers must be (K, {z.shape[1]}) to match the embeddings, got {tuple(centers.shape)}"
        )
    if labels is not None and labels.shape != (z.shape[0],):
        raise ValueError(f"labels must be ({z.shape[0]},), got {tuple(labels.shape)}")


def fixed_center_ce(
    z: torch.Tensor, centers: Centers, labels: torch.Tensor, tau: float = 0.07
) -> torch.Tensor:
    """Mean CE of ``normalize(z) @ C^T / tau``. ``z`` (B, D), ``C`` (K, D) unit rows (or
    MultiCenters: the logit of a class is that of its nearest center)."""
    _check(z, centers, labels)
    if isinstance(centers, MultiCenters):
        return F.cross_entropy(zero_shot_logits(z, centers, tau), labels)
    return ops.head_ce(z, None, None, centers, labels, tau, residual=False)


def l2_alignment(z: torch.Tensor, e_clean: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``||normalize(z) - normalize(e_clean)||^2`` (in [0, 4])."""
    _check(z)
    target = F.normalize(e_clean.detach().float(), dim=-1)
    return (F.normalize(z.float(), dim=-1) - target).pow(2).sum(-1).mean()


def infonce(z: torch.Tensor, e_clean: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Clean-adversarial InfoNCE: row ``i`` of ``z`` must pick ``e_clean[i]`` among the batch."""
    _check(z)
    return ops.infonce(z, e_clean.detach(), tau)


def modality_consistency(
    z: torch.Tensor,
    reference: torch.Tensor,
    centers: Centers,
    tau: float = 0.07,
    *,
    reference_is_prob: bool = False,
) -> torch.Tensor:
    """``KL(p_ref || p_adv)``, batch mean. ``reference`` is the frozen clean embedding (B, D),
    or already a distribution over the K centers (``reference_is_prob=True``)."""
    _check(z, centers)
    log_p_adv = F.log_softmax(zero_shot_logits(z, centers, tau), -1)
    if reference_is_prob:
        p_ref = reference.detach().float()
    else:
        p_ref = F.softmax(zero_shot_logits(reference.detach(), centers, tau), -1)
    return F.kl_div(log_p_adv, p_ref, reduction="batchmean")


@dataclass(frozen=True)
class Objective:
    """Weighted sum of the four objectives. Weights >= 0; at least one positive."""

    ce: float = 1.0
    l2: float = 1.0
    infonce: float = 0.5
    consistency: float = 0.5
    tau: float = 0.07

    def __post_init__(self) -> None:
        check_fields(self)  # types first: a bool or a str weight refused by name
        weights = (self.ce, self.l2, self.infonce, self.consistency)
        if any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
            raise ValueError(f"Objective weights must be finite, >= 0, one positive; got {weights}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")

    def as_dict(self) -> dict:
        return asdict(self)

    def __call__(
        self,
        head: Head,
        e_adv: torch.Tensor,
        e_clean: torch.Tensor,
        centers: Centers,
        labels: torch.Tensor,
        *,
        cross_probs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of ``head`` on frozen adversarial embeddings ``e_adv`` (B, D): the batch mean
        of :meth:`per_sample` (InfoNCE contrasts the batch with itself).

        ``cross_probs`` (B, K): the frozen clean prediction of the same instances in the other
        modalities, when the batch pairs them; it adds the paired cross-modal consistency term.
        Returns the loss and its parts (detached 0-dim tensors, for logging: reading them
        with ``float()`` is the caller's choice of when to synchronise with the device).
        """
        pos = torch.arange(e_adv.shape[0], device=e_adv.device)
        loss, parts = self.per_sample(
            head, e_adv, e_clean, pos, centers, labels, cross_probs=cross_probs
        )
        return loss.mean(), {k: v.mean().detach() for k, v in parts.items()}

    def per_sample(
        self,
        head: Head,
        e_adv: torch.Tensor,
        e_batch: torch.Tensor,
        pos: torch.Tensor,
        centers: Centers,
        labels: torch.Tensor,
        *,
        cross_probs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample loss ``(b,)`` and parts ``(b,)`` for ``b`` samples of a larger batch.

        ``e_adv`` (b, D): the frozen adversarial embeddings of these samples; ``e_batch``
        (B, D): the frozen clean embeddings of the whole (global) batch, ``pos`` (b,) the rows
        of these samples in it. InfoNCE contrasts each sample with every clean embedding of
        the batch (its positive at ``pos``); the other terms use the sample's own row.
        Summing over every part of the batch and dividing by B gives :meth:`__call__`.
        """
        _check(e_adv, centers, labels)
        if pos.shape != labels.shape:
            raise ValueError(f"pos must be {tuple(labels.shape)}, got {tuple(pos.shape)}")
        e_clean = e_batch[pos]
        z = head(e_adv)
        parts: dict[str, torch.Tensor] = {}
        if self.ce:
            fused = None if isinstance(centers, MultiCenters) else head.fused()
            if fused is not None:  # one kernel: projection + normalisation + CE
                w, b, residual = fused
                parts["ce"] = ops.head_ce(
                    e_adv, w, b, centers, labels, self.tau, residual=residual, reduction="none"
                )
            else:
                logits = zero_shot_logits(z, centers, self.tau)
                parts["ce"] = F.cross_entropy(logits, labels, reduction="none")
        if self.l2:
            target = F.normalize(e_clean.detach().float(), dim=-1)
            parts["l2"] = (F.normalize(z.float(), dim=-1) - target).pow(2).sum(-1)
        if self.infonce:
            b = z.shape[0]
            if b == e_batch.shape[0] and bool((pos == torch.arange(b, device=pos.device)).all()):
                # the whole batch, in order: the tiled op (no B x B matrix), its mean spread
                parts["infonce"] = ops.infonce(z, e_batch.detach(), self.tau).expand(b)
            else:
                sim = (
                    F.normalize(z.float(), dim=-1) @ F.normalize(e_batch.detach().float(), dim=-1).T
                )
                parts["infonce"] = F.cross_entropy(sim / self.tau, pos, reduction="none")
        if self.consistency:
            log_p = F.log_softmax(zero_shot_logits(z, centers, self.tau), -1)
            p_ref = F.softmax(zero_shot_logits(e_clean.detach(), centers, self.tau), -1)
            term = F.kl_div(log_p, p_ref, reduction="none").sum(-1)
            if cross_probs is not None:
                term = term + F.kl_div(log_p, cross_probs.detach().float(), reduction="none").sum(
                    -1
                )
            parts["consistency"] = term
        weights = {
            "ce": self.ce,
            "l2": self.l2,
            "infonce": self.infonce,
            "consistency": self.consistency,
        }
        loss = sum(weights[k] * v.float() for k, v in parts.items())
        return loss, {k: v.detach() for k, v in parts.items()}
