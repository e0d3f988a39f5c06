"""An attack on a retrieval ranking, as strong as the classification attacks.

Instance retrieval ``anchor -> m``: the clean anchor embedding ``q_i`` of instance ``i`` queries
the gallery of modality ``m``, and ranks its paired item ``g_i`` among all gallery items. The
adversary perturbs ``x_i`` (the gallery input) so that ``g_i`` drops in ``q_i``'s ranking: the
row's logits are ``[cos(q_i, z(x_i)), s_i1, ..., s_iC] / tau`` where ``s_ij`` are ``q_i``'s ``C``
highest similarities to the *other* (clean) gallery items, and the paired item is class 0. So
"misclassified" means "some other item now ranks above the paired one" (R@1 broken), and the
margin between the paired item and the best wrong one is exactly the DLR/CE margin of those
logits. APGD on the DLR loss (scale-free), every step, no early stop: the attack keeps pushing
the paired item down the ranking (R@5, R@10) after it leaves the top.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advcal.attacks.iterative import IterativeAttack


class RankAttack(IterativeAttack):
    """Push each gallery item below the other items in its paired query's ranking.

    Args:
        embed: module ``x -> z`` (the calibrated embedding of the gallery modality).
        eps, spec, steps, restarts, seed: as for :class:`~advcal.attacks.APGD`.
        loss: ``"dlr"`` (default) or ``"ce"`` on the ranking logits.
        tau: the temperature of the ranking logits (the margins are what matter).

    Call ``atk(x, queries, competitors)``: ``queries`` ``(B, D)`` the paired clean queries,
    ``competitors`` ``(B, C)`` each query's ``C`` highest cosine similarities to other gallery
    items (``C >= 2`` for DLR, ``>= 1`` for CE).
    """

    name = "rank"
    multi_modal = False
    skip_wrong_clean = False  # the model gives embeddings; and the ranking matters past R@1

    def __init__(
        self,
        embed: nn.Module,
        *,
        loss: str = "dlr",
        steps: int = 100,
        tau: float = 0.07,
        **kw,
    ) -> None:
        if loss not in ("dlr", "ce"):
            raise ValueError(f"RankAttack takes loss 'dlr' or 'ce', got {loss!r}")
        kw.setdefault("early_stop", False)
        super().__init__(embed, loss=loss, steps=steps, schedule="apgd", **kw)
        self.tau = float(tau)
        self._query: torch.Tensor | None = None
        self._competitors: torch.Tensor | None = None

    def __call__(
        self,
        x: torch.Tensor,
        queries: torch.Tensor,
        competitors: torch.Tensor,
        *,
        keys: torch.Tensor | None = None,
    ):
        if queries.dim() != 2 or queries.shape[0] != x.shape[0]:
            raise ValueError(
                f"queries must be (B, D) with B={x.shape[0]}, got {tuple(queries.shape)}"
            )
        need = 2 if self.loss_name == "dlr" else 1  # DLR ranks three logits
        if (
            competitors.dim() != 2
            or competitors.shape[0] != x.shape[0]
            or competitors.shape[1] < need
        ):
            raise ValueError(
                f"competitors must be (B, C) with B={x.shape[0]} and C >= {need} for the "
                f"{self.loss_name!r} loss, got {tuple(competitors.shape)}"
            )
        self._query = F.normalize(queries.float(), dim=-1)
        self._competitors = competitors.float()
        try:
            y = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
            return super().__call__(x, y, keys=keys)
        finally:
            self._query = self._competitors = None

    def _aux(self, x0, y):
        return {"": {"q": self._query, "comp": self._competitors}}

    def _logits(self, out: torch.Tensor, rows) -> torch.Tensor:
        own = (F.normalize(out.float(), dim=-1) * rows.q).sum(-1, keepdim=True)
        return torch.cat([own, rows.comp], 1) / self.tau


def competitors(query: torch.Tensor, gallery: torch.Tensor, k: int = 10) -> torch.Tensor:
    """``(N, k)``: row ``i``'s ``k`` highest cosine similarities to gallery items other than
    ``i`` (query ``i`` is paired with gallery item ``i``)."""
    sim = F.normalize(query.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(min(k, sim.shape[1] - 1), dim=1).values


__all__ = ["RankAttack", "competitors"]
