"""FAB-T (Croce & Hein 2020, "Minimally distorted adversarial examples with a Fast Adaptive
Boundary attack"), targeted, L-inf and L2.

For each target ``t`` (the ``n_targets`` highest-scoring wrong classes at the clean input) and
iterate ``x``: linearise ``g = z_t - z_y`` at ``x`` and project both ``x`` and the original
``x0`` onto the hyperplane ``g(x) + grad g . (z - x) = 0`` inside the valid box, with the
smallest step in the threat model's norm (:func:`hyperplane_step`); move to the convex
combination ``(1 - a) (x + eta d_x) + a (x0 + eta d_x0)`` with ``a = |d_x| / (|d_x| + |d_x0|)``
capped at ``alpha_max`` (a bias toward the original point, so the adversarial example found is
close to it); when the iterate is adversarial, remember it if it is the closest so far and pull
it back toward ``x0`` by ``beta``. A sample counts as broken when some target reached an
adversarial example within ``eps``. Defaults are AutoAttack's (``steps=100``, ``eta=1.05``,
``beta=0.9``, ``alpha_max=0.1``, 9 targets, one restart without random start).

Targets run as rows of one batch (like APGD-T); ``early_stop`` drops a sample once it has an
adversarial example within ``eps``.
"""

from __future__ import annotations

import torch
from torch import nn

from advcal.attacks.base import Attack, bcast, norms, predict


def hyperplane_step(
    p: torch.Tensor, w: torch.Tensor, c: torch.Tensor, lo, hi, norm: str
) -> torch.Tensor:
    """The smallest ``d`` (in ``norm``) with ``w . d = c`` and ``lo <= p + d <= hi``, per row.

    ``p``, ``w``: ``(R, D)``; ``c``: ``(R,)``. When the box makes ``w . d = c`` unreachable the
    step goes as far as the box allows in the useful direction.

    L-inf: every coordinate moves by ``min(t, room_i)`` in the direction ``sign(c w_i)``, where
    ``room_i`` is its distance to the box in that direction; ``sum_i |w_i| min(t, room_i)`` is
    piecewise linear in ``t``, so the smallest feasible ``t`` is found exactly by sorting the
    rooms. L2: ``d_i = clip(lam w_i, lo - p_i, hi - p_i)`` (the KKT point), ``lam`` by bisection.
    """
    p, w, c = p.float(), w.float(), c.float()
    if norm == "linf":
        direction = torch.sign(c)[:, None] * torch.sign(w)
        a, target = w.abs(), c.abs()
        if lo is None and hi is None:
            t = target / a.sum(1).clamp_min(1e-30)
            return direction * t[:, None]
        up = (hi - p) if hi is not None else torch.full_like(p, float("inf"))
        down = (p - lo) if lo is not None else torch.full_like(p, float("inf"))
        room = torch.where(direction > 0, up, down).clamp_min(0)
        room = torch.where(direction == 0, torch.zeros_like(room), room)
        # fast path, exact: when no useful coordinate's room is below the unclamped step
        # t0 = |c| / sum|w|, the box does not bind and t0 is the answer (no sort: the sort of
        # every row cost FAB-T most of its time on 12k-dim video inputs)
        # (a coordinate with no room, e.g. a saturated pixel, contributes nothing: left out)
        a_free = torch.where(room > 0, a, torch.zeros_like(a))
        t0 = target / a_free.sum(1).clamp_min(1e-30)
        free = ((room >= t0[:, None]) | (a_free == 0)).all(1)
        if bool(free.all()):
            return direction * torch.minimum(t0[:, None], room)
        if bool(free.any()):
            out = direction * torch.minimum(t0[:, None], room)
            rest = (~free).nonzero().squeeze(1)
            out[rest] = hyperplane_step(p[rest], w[rest], c[rest], lo, hi, norm)
            return out
        return direction * torch.minimum(_linf_step(a, room, target)[:, None], room)
    # L2
    if lo is None and hi is None:
        return w * (c / (w * w).sum(1).clamp_min(1e-30))[:, None]
    low = (lo - p) if lo is not None else torch.full_like(p, -float("inf"))
    high = (hi - p) if hi is not None else torch.full_like(p, float("inf"))

    def reach(lam: torch.Tensor) -> torch.Tensor:
        return (w * torch.clamp(lam[:, None] * w, low, high)).sum(1)

    nz = w.abs() > 0
    span = torch.maximum(low.abs(), high.abs()).clamp(max=1e30)
    big = torch.where(nz, span / w.abs().clamp_min(1e-30), torch.zeros_like(w)).amax(1) + 1
    lo_l, hi_l = -big, big
    for _ in range(60):  # bisection: reach() is non-decreasing in lam
        mid = (lo_l + hi_l) / 2
        below = reach(mid) < c
        lo_l, hi_l = torch.where(below, mid, lo_l), torch.where(below, hi_l, mid)
    lam = (lo_l + hi_l) / 2
    return torch.clamp(lam[:, None] * w, low, high)


def _linf_step(a: torch.Tensor, room: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The smallest ``t`` with ``sum_i a_i min(t, room_i) = target`` per row (``inf`` when the
    rooms cannot reach it): ``G(t)`` is piecewise linear with breakpoints at the rooms.

    Exact, without sorting whole rows: a doubling search finds ``T`` with ``G(T) >= target``;
    only rooms below ``T`` are breakpoints under it, so only those few are sorted (``topk``),
    and every coordinate with room ``>= T`` adds slope ``a_i`` on ``[0, T]``."""
    rows = len(a)
    t = torch.full((rows,), float("inf"), device=a.device)
    reach = (a * torch.where(torch.isfinite(room), room, torch.zeros_like(room))).sum(1)
    unbounded = (a * ~torch.isfinite(room)).sum(1) > 0
    feasible = unbounded | (reach >= target)
    if not bool(feasible.any()):
        return t
    idx = feasible.nonzero().squeeze(1)
    a, room, target = a[idx], room[idx], target[idx]
    big = (target / a.sum(1).clamp_min(1e-30)).clamp_min(1e-12)  # G(big) <= target
    for _ in range(64):  # doubling: G(big) >= target after a few steps
        short = (a * torch.minimum(room, big[:, None])).sum(1) < target
        if not bool(short.any()):
            break
        big = torch.where(short, big * 2, big)
    below = room < big[:, None]
    k = max(int(below.sum(1).max()), 1)
    cand = torch.where(below, room, torch.full_like(room, float("inf")))
    r_k, order = cand.topk(k, dim=1, largest=False)  # the breakpoints under big, sorted
    a_k = torch.where(torch.isfinite(r_k), a.gather(1, order), torch.zeros_like(r_k))
    r_k = torch.where(torch.isfinite(r_k), r_k, big[:, None])
    slope_big = (a * ~below).sum(1)  # coordinates whose room is >= big: slope on [0, big]
    ar = a_k * r_k
    before = ar.cumsum(1) - ar  # sum_{j<m} a_j r_j
    tail = a_k.flip(1).cumsum(1).flip(1) + slope_big[:, None]  # slope on [r_(m-1), r_(m)]
    at = before + r_k * tail  # G at each breakpoint
    m = (at < target[:, None]).sum(1)  # first breakpoint reaching the target
    m_c = m.clamp(max=k - 1)[:, None]
    t_in = (target - before.gather(1, m_c).squeeze(1)) / tail.gather(1, m_c).squeeze(1)
    # past the last breakpoint: only the slope of the big rooms remains
    t_out = (target - ar.sum(1)) / slope_big.clamp_min(1e-30)
    t[idx] = torch.where(m < k, t_in, t_out)
    return t


class FAB(Attack):
    """Targeted FAB (FAB-T): see the module docstring."""

    name = "fab-t"
    multi_modal = False

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None = None,
        norm: str | None = None,
        spec=None,
        steps: int = 100,
        n_targets: int | None = None,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        early_stop: bool = True,
        max_rows: int = 4096,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, spec=spec, seed=seed)
        for name, v, low in (
            ("steps", steps, 1),
            ("restarts", restarts, 1),
            ("max_rows", max_rows, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if n_targets is not None and (isinstance(n_targets, bool) or n_targets < 1):
            raise ValueError(f"n_targets must be an int >= 1 or None, got {n_targets!r}")
        if not (0 <= alpha_max <= 1 and eta >= 1 and 0 < beta <= 1):
            raise ValueError("FAB needs 0 <= alpha_max <= 1, eta >= 1, 0 < beta <= 1")
        self.steps, self.n_targets, self.restarts = steps, n_targets, restarts
        self.alpha_max, self.eta, self.beta = alpha_max, eta, beta
        self.early_stop, self.max_rows = bool(early_stop), max_rows

    def _run(self, x0: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.targets[""]
        model, x = t.model, x0[""]
        n = len(y)
        out = x.clone()
        if n == 0:
            return {"": out}
        gen = self._generator(y.device)
        logits = predict(model, x)
        k = logits.shape[1]
        n_t = min(self.n_targets or 9, k - 1)
        if self.n_targets is not None and self.n_targets > k - 1:
            raise ValueError(f"n_targets={self.n_targets} but the model has only {k} classes")
        targets = logits.scatter(1, y[:, None], -float("inf")).topk(n_t, 1).indices
        res = torch.full((n,), float("inf"), device=y.device)  # smallest adversarial norm found
        for restart in range(self.restarts):
            first = 0
            while first < n_t:
                live = (
                    (res > t.eps).nonzero().squeeze(1)
                    if self.early_stop
                    else torch.arange(n, device=y.device)
                )
                if len(live) == 0:
                    return {"": out}
                per = max(1, min(n_t - first, self.max_rows // len(live)))
                cols = torch.arange(first, first + per, device=y.device)
                first += per
                pos = live.repeat_interleave(per)
                tt = targets[live][:, cols].reshape(-1)
                self._pass(model, x, y, pos, tt, res, out, gen, restart > 0, salt=restart)
        return {"": out}

    def _pass(self, model, x, y, pos, tt, res, out, gen, random_start: bool, salt: int = 0):
        t = self.targets[""]
        x0, yy = x[pos], y[pos]
        xc = x0.clone()
        if random_start:  # inside half the smallest distance found so far (AutoAttack)
            r = torch.minimum(res[pos], torch.full_like(res[pos], t.eps)).clamp(max=t.eps)
            draw = torch.rand if t.norm == "linf" else torch.randn
            if self._keys is None:
                u = draw(x0.shape, generator=gen, device=x.device)
            else:  # per sample, from its key (independent of the batch)
                u = torch.stack(
                    [
                        draw(x0.shape[1:], generator=self._keyed(int(self._keys[p]), salt))
                        for p in pos.tolist()
                    ]
                ).to(x.device)
            if t.norm == "linf":
                u = 2 * u - 1
            u = u / bcast(norms(u, t.norm).clamp_min(1e-12), u)
            xc = self._clamp(x0 + 0.5 * bcast(r, u) * u)
        flat = x0.reshape(len(pos), -1)
        for _ in range(self.steps):
            if len(pos) == 0:
                return
            xg = xc.detach().requires_grad_(True)
            with torch.enable_grad():
                z = model(xg).float()
                g = z.gather(1, tt[:, None]).squeeze(1) - z.gather(1, yy[:, None]).squeeze(1)
                (w,) = torch.autograd.grad(g.sum(), xg)
            w = w.reshape(len(pos), -1).float()
            cur = xc.reshape(len(pos), -1).float()
            c = -g.detach()  # w . (z - x) = -g(x): reach the linearised boundary
            d1 = hyperplane_step(cur, w, c, t.lo, t.hi, t.norm)
            d2 = hyperplane_step(flat.float(), w, c + (w * (cur - flat)).sum(1), t.lo, t.hi, t.norm)
            a1 = norms(d1, t.norm).clamp_min(1e-8)
            a2 = norms(d2, t.norm).clamp_min(1e-8)
            a = (a1 / (a1 + a2)).clamp(0, self.alpha_max)[:, None]
            step = (cur + self.eta * d1) * (1 - a) + (flat + self.eta * d2) * a
            xc = self._clamp(step.reshape(xc.shape).to(xc.dtype))
            adv = predict(model, xc).argmax(1) != yy
            if bool(adv.any()):
                dist = norms(xc - x0, t.norm)
                closer = adv & (dist < res[pos])
                if bool(closer.any()):
                    self._record(pos, closer, dist, xc, res, out)
                xc = torch.where(bcast(adv, xc), x0 + self.beta * (xc - x0), xc)
            if self.early_stop:
                keep = res[pos] > t.eps
                if not bool(keep.all()):
                    pos, tt, x0, yy, xc, flat = (
                        pos[keep],
                        tt[keep],
                        x0[keep],
                        yy[keep],
                        xc[keep],
                        flat[keep],
                    )

    def _record(self, pos, closer, dist, xc, res, out) -> None:
        """Keep, per sample, the closest adversarial example (returned when within eps)."""
        eps = self.targets[""].eps
        idx = closer.nonzero().squeeze(1)
        # several rows of one sample may improve at once: take the smallest distance
        best = torch.full_like(res, float("inf"))
        best.scatter_reduce_(0, pos[idx], dist[idx], reduce="amin")
        win = idx[dist[idx] == best[pos[idx]]]
        p = pos[win]
        first = torch.ones_like(p, dtype=torch.bool)
        first[1:] = p[1:] != p[:-1]
        win, p = win[first], p[first]
        res[p] = dist[win]
        inside = dist[win] <= eps
        out[p[inside]] = xc[win[inside]]

    def _clamp(self, v: torch.Tensor) -> torch.Tensor:
        t = self.targets[""]
        return v if t.lo is None and t.hi is None else v.clamp(t.lo, t.hi)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "steps": self.steps,
            "n_targets": self.n_targets or "min(9, K-1)",
            "restarts": self.restarts,
            "alpha_max": self.alpha_max,
            "eta": self.eta,
            "beta": self.beta,
        }


__all__ = ["FAB", "hyperplane_step"]
