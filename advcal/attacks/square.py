"""Square (Andriushchenko et al. 2020, "Square Attack: a query-efficient black-box adversarial
attack via random search"), L-inf: score-based, no gradients — the gradient-masking check.

Start from vertical stripes of ``+-eps``; then, ``queries - 1`` times, redraw the signs of one
random window (a square over the two spatial dims, or a segment of a 1-D signal or point list)
to ``x0 +- eps`` and keep the change if the margin loss ``max_{j!=y} z_j - z_y`` rose. The window
covers a fraction ``p`` of the spatial size, ``p`` halving on AutoAttack's schedule (``p_init``
at the start, ``p_init / 512`` after 80% of the queries). Unlike AutoAttack, which draws one
window and sign pattern for the whole batch per query, every sample draws its own (the same
number of queries, more diverse).

Layouts: a per-sample shape ``(..., H, W)`` has spatial dims ``(H, W)`` and every leading dim
a channel (video ``(T, C, H, W)``: T*C channels); ``(L,)`` (a waveform) is one channel of
length L; ``(N, c)`` with ``c <= 4`` (a point cloud) has N positions of c channels; any other
``(C, L)`` has C channels of length L. Each window draws one sign per channel.

``early_stop`` (default) drops a sample once fooled; the query budget counts per sample.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from advcal.attacks import losses
from advcal.attacks.base import Attack, predict


def p_schedule(p_init: float, i: int, queries: int) -> float:
    """AutoAttack's window-fraction schedule at query ``i`` of ``queries``: ``p_init`` for the
    first 0.1%, then halved at 0.5%, 2%, 5%, 10%, 20%, 40%, 60% and 80% of the queries."""
    it = int(i / queries * 10000)
    if it <= 10:
        return p_init
    for bound, div in (
        (50, 2),
        (200, 4),
        (500, 8),
        (1000, 16),
        (2000, 32),
        (4000, 64),
        (6000, 128),
        (8000, 256),
    ):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _layout(shape: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
    """``(channels_first_shape, transpose)``: the per-sample shape as ``(C, *spatial)`` with one
    or two spatial dims, and whether the input's last two dims must be swapped to get it."""
    if len(shape) >= 3:
        return (math.prod(shape[:-2]), shape[-2], shape[-1]), False
    if len(shape) == 1:
        return (1, shape[0]), False
    n, c = shape
    if c <= 4 < n:  # a point list (N, xyz): N positions of c channels
        return (c, n), True
    return (n, c), False


class Square(Attack):
    """Score-based random-search attack (L-inf). ``queries`` per sample (AutoAttack: 5000),
    ``p_init`` the initial window fraction (0.8)."""

    name = "square"
    multi_modal = False

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None = None,
        norm: str | None = None,
        spec=None,
        queries: int = 5000,
        p_init: float = 0.8,
        early_stop: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, spec=spec, seed=seed)
        t = self.targets[""]
        if t.norm != "linf":
            raise ValueError(
                f"Square here implements the L-inf threat model; this input's norm is {t.norm!r}. "
                "Evaluate L2 inputs with the gradient attacks (the suite reports the black-box "
                "check as not run)"
            )
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise ValueError(f"queries must be an int >= 1, got {queries!r}")
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init}")
        self.queries, self.p_init, self.early_stop = queries, p_init, bool(early_stop)

    def _run(self, x0: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.targets[""]
        model, eps, lo, hi = t.model, t.eps, t.lo, t.hi
        x = x0[""]
        n = len(y)
        if n == 0:
            return {"": x.clone()}
        shape, transpose = _layout(tuple(x.shape[1:]))

        def to_cs(v: torch.Tensor) -> torch.Tensor:  # (R, *input) -> (R, C, *spatial)
            return (v.transpose(-1, -2) if transpose else v).reshape(len(v), *shape)

        def from_cs(v: torch.Tensor) -> torch.Tensor:
            if transpose:
                return v.reshape(len(v), *x.shape[-1:], x.shape[-2]).transpose(-1, -2)
            return v.reshape(len(v), *x.shape[1:])

        def clamp(v: torch.Tensor) -> torch.Tensor:
            return v if lo is None and hi is None else v.clamp(lo, hi)

        def score(v: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
            return losses.margin(predict(model, from_cs(v)), yy)

        c, spatial = shape[0], shape[1:]
        stripes_u, query_u = self._draws(n, c, spatial, x.device)
        base = to_cs(x).clone()
        # vertical stripes: one sign per (channel, column) over the last spatial dim
        stripes = (stripes_u < 0.5).float().mul_(2).sub_(1)
        stripes = stripes.view(n, c, *([1] * (len(spatial) - 1)), spatial[-1])
        best = clamp(base + eps * stripes)
        best_loss = score(best, y)
        live = torch.arange(n, device=x.device)
        if self.early_stop:
            live = live[best_loss <= 0]
        area = math.prod(spatial)
        for i in range(1, self.queries):
            if len(live) == 0:
                break
            p = p_schedule(self.p_init, i, self.queries)
            u = query_u[live, i - 1]  # (R, 2 + C): window start(s), then one sign per channel
            if len(spatial) == 2:
                h, w = spatial
                s = min(max(round(math.sqrt(p * area)), 1), max(min(h, w) - 1, 1))
            else:
                s = min(max(round(p * area), 1), max(area - 1, 1))
            mask = _window(u[:, : len(spatial)], spatial, s)
            signs = (
                (u[:, 2:] < 0.5).float().mul_(2).sub_(1).view(len(live), c, *([1] * len(spatial)))
            )
            cand = torch.where(mask[:, None], clamp(base[live] + eps * signs), best[live])
            loss = score(cand, y[live])
            better = loss > best_loss[live]
            idx = live[better]
            best[idx] = cand[better]
            best_loss[idx] = loss[better]
            if self.early_stop:
                live = live[best_loss[live] <= 0]
        return {"": from_cs(best)}

    def _draws(self, n: int, c: int, spatial, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every uniform number each sample's search uses, drawn up front per row: the
        stripes ``(n, C * W)`` and, per query, ``(n, queries - 1, 2 + C)`` (window starts,
        signs). With keys, row ``i``'s come from its own generator: a sample's search does not
        depend on its batch."""
        width, per_query = c * spatial[-1], 2 + c
        if self._keys is None:
            g = self._generator(device)
            stripes = torch.rand((n, width), generator=g, device=device)
            queries = torch.rand((n, self.queries - 1, per_query), generator=g, device=device)
            return stripes, queries
        stripes, queries = [], []
        for key in self._keys.tolist():
            g = self._keyed(int(key), 0)
            stripes.append(torch.rand(width, generator=g))
            queries.append(torch.rand((self.queries - 1, per_query), generator=g))
        return torch.stack(stripes).to(device), torch.stack(queries).to(device)

    def describe(self) -> dict:
        return {**super().describe(), "queries": self.queries, "p_init": self.p_init}


def _window(u: torch.Tensor, spatial: tuple[int, ...], s: int) -> torch.Tensor:
    """``(R, *spatial)`` bool: per row, an ``s``-wide window (square or segment) starting at
    ``floor(u_d * (size_d - s + 1))`` along each spatial dim ``d`` (``u`` ``(R, len(spatial))``
    uniform in [0, 1))."""
    rows = len(u)
    mask = None
    for d, size in enumerate(spatial):
        start = (u[:, d] * (size - s + 1)).long().clamp(max=size - s)
        ar = torch.arange(size, device=u.device)
        m = (ar >= start[:, None]) & (ar < start[:, None] + s)  # (rows, size)
        view = [rows] + [1] * len(spatial)
        view[1 + d] = size
        m = m.view(view)
        mask = m if mask is None else mask & m
    return mask


__all__ = ["Square", "p_schedule"]
