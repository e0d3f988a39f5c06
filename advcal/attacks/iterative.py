"""The one gradient loop behind PGD, CrossMaxim, APGD, APGD-T and the training attacks.

Per iteration and modality: forward the current iterates, the per-sample loss from the logits
(:mod:`advcal.attacks.losses`), the input gradient (parameters frozen: no weight gradient), then
the update. Two update rules share the loop:

* ``constant`` (PGD, Madry et al.): ``x <- P(x + alpha * sign(g))`` (L2: ``g / ||g||``), every
  modality of a norm group in one fused :func:`advcal.ops.pgd_step_` call.
* ``apgd`` (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble
  of diverse parameter-free attacks"): per-sample step size starting at ``2 eps``, momentum
  ``0.75``, halved at checkpoints ``w_j`` (at 22% of the iterations, then intervals shrinking
  by 3% to at least 6%) when fewer than ``rho = 75%`` of the steps since the last checkpoint
  raised the loss, or when the step was not halved at the last checkpoint and the best loss
  has not improved since; a halving restarts from the best point found so far.

Two ways to end, by ``early_stop``:

* ``early_stop=True`` (evaluation): every iterate is checked; a sample that is misclassified at
  any iterate is done — its rows leave the batch (exactly the same robust accuracy, for a
  fraction of the work when most samples break early) and that iterate is returned. A sample
  never fooled returns its highest-loss iterate; one misclassified when clean is returned as
  it is, unattacked. Restarts (and target groups) run only on the samples still unbroken, as
  AutoAttack runs its attacks. (APGD checks every iterate this way with or without early
  stopping; ``early_stop`` only decides whether broken samples keep running.)
* ``early_stop=False`` (training, Madry-style): every sample runs every step and the final
  iterate is returned (for APGD: the best-loss iterate, or a fooling one); with several
  restarts the per-sample worst case (misclassified first, then the higher loss) is kept. This
  path has static shapes and no host syncs, so ``cuda_graph=True`` can capture its step.

APGD-T (``n_targets > 0``) runs every target of a sample as its own row in one batch (targets:
the ``n_targets`` highest-scoring wrong classes at the clean input), at most ``max_rows`` rows
at a time; a sample fooled under any target leaves with all its rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from advcal import ops
from advcal.attacks import losses
from advcal.attacks.base import Attack, bcast, by_norm, norms, predict, project
from advcal.profiling import nvtx_range
from advcal.specs import InputSpec

SCHEDULES = ("constant", "apgd")


class _Rows:
    """The rows one modality still attacks in a pass: ``pos`` (sample position in the batch)
    and per-row state; :meth:`keep` drops rows from every tensor at once."""

    def __init__(self, **state) -> None:
        self.__dict__.update(state)

    def __len__(self) -> int:
        return int(self.pos.shape[0])

    def keep(self, mask: torch.Tensor) -> None:
        for k, v in list(vars(self).items()):
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == mask.shape[0]:
                setattr(self, k, v[mask])


def apgd_checkpoints(steps: int) -> list[int]:
    """Iteration counts after which APGD checks its step size: ``0.22 N``, then intervals
    shrinking by ``0.03 N`` down to ``0.06 N`` (AutoAttack's integer rounding)."""
    k, decr, k_min = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at = [], k
    while at <= steps:
        out.append(at)
        k = max(k - decr, k_min)
        at += k
    return out


class IterativeAttack(Attack):
    """The shared loop (see the module docstring). Use :class:`PGD`, :class:`CrossMaxim`,
    :class:`APGD` or :class:`APGDT`; this class takes every knob.

    Args:
        loss: a name in :data:`advcal.attacks.losses.LOSSES` (maximised).
        alpha: constant step size (``schedule="constant"``); default ``alpha_ratio * eps``.
        steps, restarts: iterations per pass; independent random starts.
        schedule: ``"constant"`` (PGD) or ``"apgd"``.
        momentum, rho: APGD's momentum and checkpoint threshold.
        n_targets: > 0 makes the loss targeted (``dlr_t``) over that many wrong classes.
        sample_targets: one row per sample, its target drawn uniformly among the
            ``n_targets`` highest-scoring wrong classes (a training attack), instead of a row
            per target.
        early_stop: see the module docstring.
        random_start: start uniformly inside the ball (True) or at ``x``.
        max_rows: cap on rows per forward pass (APGD-T: samples x targets).
        cuda_graph: capture the step in a CUDA graph (``early_stop=False`` and the constant
            schedule only: static shapes, no host syncs).
        compile: run each model through ``torch.compile`` (dynamic batch size, compiled once
            per input shape family, forward and backward); where compilation fails the attack
            warns once and runs eagerly. Eager is the reference; tests run both.
    """

    name = "iterative"
    skip_wrong_clean = True  # evaluation: samples misclassified when clean are not attacked

    def __init__(
        self,
        model: nn.Module | Mapping[str, nn.Module],
        *,
        loss: str = "ce",
        eps: float | Mapping[str, float] | None = None,
        alpha: float | None = None,
        alpha_ratio: float = 0.25,
        steps: int = 10,
        restarts: int = 1,
        norm: str | None = None,
        spec: InputSpec | Mapping[str, InputSpec] | None = None,
        schedule: str = "constant",
        momentum: float = 0.75,
        rho: float = 0.75,
        n_targets: int = 0,
        sample_targets: bool = False,
        early_stop: bool = False,
        random_start: bool = True,
        seed: int = 0,
        max_rows: int = 4096,
        cuda_graph: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, spec=spec, seed=seed)
        for name, v, lo in (
            ("steps", steps, 0),
            ("restarts", restarts, 1),
            ("max_rows", max_rows, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if isinstance(n_targets, bool) or not isinstance(n_targets, int) or n_targets < 0:
            raise ValueError(f"n_targets must be an int >= 0, got {n_targets!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not 0 < alpha_ratio <= 4:
            raise ValueError(f"alpha_ratio must be in (0, 4], got {alpha_ratio}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not (0 < momentum <= 1 and 0 < rho <= 1):
            raise ValueError(f"momentum and rho must be in (0, 1], got {momentum}, {rho}")
        self.loss_name = losses.check(loss)
        if (loss in losses.TARGETED) != (n_targets > 0):
            raise ValueError(
                f"loss {loss!r} and n_targets={n_targets}: a targeted loss needs n_targets > 0 "
                "and n_targets > 0 needs a targeted loss ('dlr_t')"
            )
        self.alphas = {
            m: float(alpha) if alpha is not None else t.eps * alpha_ratio
            for m, t in self.targets.items()
        }
        self.steps, self.restarts, self.schedule = steps, restarts, schedule
        self.momentum, self.rho, self.n_targets = momentum, rho, n_targets
        self.sample_targets = bool(sample_targets)
        self.early_stop, self.random_start = bool(early_stop), bool(random_start)
        self.max_rows = max_rows
        self.auto_targets = 0  # APGDT: n_targets = min(auto_targets, K - 1) per model
        self.cuda_graph = bool(cuda_graph)
        self.compile = bool(compile)
        self._compiled: dict[str, nn.Module] = {}
        if self.cuda_graph and (
            self.early_stop or schedule != "constant" or n_targets or loss == "kl"
        ):
            raise ValueError(
                "cuda_graph=True captures the constant-step loop without early stopping "
                "(static shapes, no host syncs): use early_stop=False, schedule='constant', an "
                "untargeted loss other than 'kl', or cuda_graph=False"
            )
        self._graphs: dict[tuple, _CapturedStep] = {}
        self._pool = None

    # -- the objective ------------------------------------------------------------------
    @property
    def tracks_iterates(self) -> bool:
        """Every iterate is checked (evaluation) rather than only the final one."""
        return self.early_stop or self.schedule == "apgd"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
        """The per-sample loss at ``x`` (no gradient), e.g. for reports and tests."""
        with torch.no_grad():
            return self._loss(model(x).float(), y, **kw)

    def _loss(self, logits, y, t=None, ref=None) -> torch.Tensor:
        return losses.LOSSES[self.loss_name](logits, y, t=t, ref=ref)

    def _evaluate(self, m: str, rows: _Rows, x: torch.Tensor, need_grad: bool):
        """``(logits or None, loss, grad or None)`` at ``x`` for ``rows``."""
        model = self._model(m)
        t, ref = getattr(rows, "t", None), getattr(rows, "ref", None)
        if not need_grad:
            with torch.no_grad():
                logits = self._logits(model(x).float(), rows)
                return logits, self._loss(logits, rows.y, t, ref), None
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            fused = (
                None if self.tracks_iterates or self.compile else _fused_loss(model, self.loss_name)
            )
            if fused is not None:  # one op: head + normalise + CE / cos, no logits written
                logits, loss = None, fused(x, rows.y)
            else:
                logits = self._logits(model(x).float(), rows)
                loss = self._loss(logits, rows.y, t, ref)
            with nvtx_range("backward"):
                (g,) = torch.autograd.grad(loss.sum(), x)
        return (None if logits is None else logits.detach()), loss.detach().float(), g

    def _model(self, m: str) -> nn.Module:
        """The model of modality ``m``: compiled once (``compile=True``), else as given."""
        model = self.targets[m].model
        if not self.compile:
            return model
        if m not in self._compiled:
            self._compiled[m] = _compile(model, self.name)
        return self._compiled[m]

    def _logits(self, out: torch.Tensor, rows: _Rows) -> torch.Tensor:
        """Logits from the model's output; a subclass may combine it with per-row state (the
        ranking attack scores an embedding against each row's query and competitors)."""
        return out

    def _aux(self, x0: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, dict]:
        """Per-sample tensors to carry as row state, by modality (none by default)."""
        return {m: {} for m in x0}

    # -- the loop -----------------------------------------------------------------------
    def _run(self, x0: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        device = y.device
        gen = self._generator(device)
        if self.cuda_graph and self.steps > 0:
            if y.device.type != "cuda":
                raise ValueError(
                    f"cuda_graph=True needs CUDA inputs, got tensors on {y.device}; "
                    "pass cuda_graph=False to attack on this device"
                )
            return self._run_graphed(x0, y, gen)
        n = len(y)
        out = {m: x.clone() for m, x in x0.items()}
        fooled = {m: torch.zeros(n, dtype=torch.bool, device=device) for m in x0}
        out_loss = {m: torch.full((n,), -float("inf"), device=device) for m in x0}
        if self.tracks_iterates and self.skip_wrong_clean:  # already wrong: nothing to attack
            for m in self.targets:
                fooled[m] = predict(self._model(m), x0[m]).argmax(1) != y
        ref = targets = None
        if self.loss_name == "kl":  # TRADES: the model's own clean prediction
            ref = {m: predict(t.model, x0[m]) for m, t in self.targets.items()}
        n_cols = 0
        if self.n_targets:
            targets = {m: self._targets(t.model, x0[m], y) for m, t in self.targets.items()}
            n_cols = self.n_targets  # set by _targets (min(9, K - 1) for APGD-T's default)
            if self.sample_targets:  # one target per sample, drawn among its candidates
                targets = {m: self._sample_target(t, gen) for m, t in targets.items()}
                n_cols = 1
        aux = self._aux(x0, y)
        for restart in range(self.restarts):
            # one pass per group of targets (all at once when they fit in max_rows)
            first = 0
            while first < max(n_cols, 1):
                # evaluation attacks only the samples no earlier pass has fooled; training
                # semantics attack every sample in every restart
                live = {m: ~f if self.tracks_iterates else None for m, f in fooled.items()}
                count = max(int(v.sum()) if v is not None else n for v in live.values())
                per = max(1, min(n_cols, self.max_rows // max(count, 1)))
                cols = range(first, min(first + per, n_cols)) if n_cols else None
                first += per
                rows = {m: self._rows(x0[m], y, live[m], targets, ref, m, cols, aux[m]) for m in x0}
                if all(len(r) == 0 for r in rows.values()):
                    break
                self._pass(rows, gen, fooled, out, out_loss, salt=restart * 1000 + first)
            if self.tracks_iterates and all(bool(f.all()) for f in fooled.values()):
                break
        return out

    def _sample_target(self, candidates: torch.Tensor, gen) -> torch.Tensor:
        """``(B, 1)``: one column of ``candidates`` per sample, uniformly (keyed per sample
        when the call gave keys)."""
        k = candidates.shape[1]
        if self._keys is None:
            col = torch.randint(0, k, (len(candidates),), generator=gen, device=gen.device)
        else:
            col = torch.tensor(
                [
                    int(torch.randint(0, k, (1,), generator=self._keyed(int(key), -1, "cpu")))
                    for key in self._keys
                ]
            )
        return candidates.gather(1, col.to(candidates.device)[:, None])

    def _targets(self, model, x0, y) -> torch.Tensor:
        """``(B, n_targets)``: the highest-scoring wrong classes at the clean input."""
        logits = predict(model, x0)
        k = logits.shape[1]
        if self.auto_targets:  # 9, or every wrong class when there are fewer
            self.n_targets = min(self.auto_targets, k - 1)
        losses.check(self.loss_name, k)
        if self.n_targets > k - 1:
            raise ValueError(f"n_targets={self.n_targets} but the model has only {k} classes")
        return logits.scatter(1, y[:, None], -float("inf")).topk(self.n_targets, 1).indices

    @staticmethod
    def _rows(x0, y, live, targets, ref, m, cols, aux) -> _Rows:
        """Rows for the samples in ``live`` (all when None); with targets, one row per
        (sample, target column in ``cols``), sample-major."""
        pos = torch.arange(len(y), device=y.device)
        if live is not None:
            pos = pos[live]
        state: dict = {}
        if cols is not None:
            cols = torch.tensor(list(cols), device=y.device)
            state["t"] = targets[m][pos][:, cols].reshape(-1)
            pos = pos.repeat_interleave(len(cols))
        state.update(pos=pos, x0=x0[pos], y=y[pos])
        if ref is not None:
            state["ref"] = ref[m][pos]
        state.update({k: v[pos] for k, v in aux.items()})
        state["x"] = state["x0"].clone()
        return _Rows(**state)

    def _pass(self, rows: dict[str, _Rows], gen, fooled, out, out_loss, salt: int = 0) -> None:
        """One restart (or target group) over ``rows``, all modalities in lockstep."""
        groups = by_norm({m: self.targets[m] for m in rows})
        if self.random_start and self._keys is not None:
            for i, (m, r) in enumerate(rows.items()):
                self._keyed_start(m, r, salt * 64 + i)
        elif self.random_start:
            for norm, ms in groups.items():
                ops.random_start_(
                    [rows[m].x for m in ms],
                    [rows[m].x0 for m in ms],
                    eps=[self.targets[m].eps for m in ms],
                    lo=[self.targets[m].lo for m in ms],
                    hi=[self.targets[m].hi for m in ms],
                    norm=norm,
                    generator=gen,
                )
        apgd = self.schedule == "apgd"
        checkpoints = set(apgd_checkpoints(self.steps)) if apgd else set()
        for m, r in rows.items():
            t = self.targets[m]
            r.grad = None
            if self.tracks_iterates:
                r.best_x, r.best_loss = (
                    r.x.clone(),
                    torch.full_like(r.pos, -1e30, dtype=torch.float),
                )
            if apgd:
                r.step = torch.full_like(r.pos, 2 * t.eps, dtype=torch.float)
                r.x_prev = r.x.clone()
                r.fresh = torch.ones_like(r.pos, dtype=torch.bool)
                r.best_grad = torch.zeros_like(r.x)
                r.hist = torch.zeros(len(r), self.steps + 1, device=r.pos.device)
                # no "no improvement" halving at the first checkpoint (AutoAttack's rule)
                r.reduced = torch.ones_like(r.pos, dtype=torch.bool)
                r.best_at_check = r.best_loss.clone()
                r.last_check = 0
        for i in range(self.steps + 1):  # evaluate iterate i, then step to i + 1
            last = i == self.steps
            for m, r in rows.items():
                if len(r) == 0:
                    r.grad = None
                    continue
                need_grad = not last
                need_logits = self.tracks_iterates or (last and self.restarts > 1)
                if last and not need_logits:
                    break
                logits, loss, r.grad = self._evaluate(m, r, r.x, need_grad)
                if self.tracks_iterates:
                    self._track(r, logits, loss, fooled[m], out[m], out_loss[m])
                    better = loss > r.best_loss
                    r.best_x[better] = r.x[better]
                    r.best_loss = torch.where(better, loss, r.best_loss)
                    if apgd:
                        r.hist[:, i] = loss
                        if r.grad is not None:
                            r.best_grad[better] = r.grad[better]
                elif last:  # training semantics with restarts: keep the worst case
                    self._keep_worst(r, logits, loss, fooled[m], out[m], out_loss[m])
            if last:
                break
            if apgd and i in checkpoints:
                for r in rows.values():
                    self._checkpoint(r, i)
            if self.early_stop:
                for m, r in rows.items():
                    live = ~fooled[m][r.pos]
                    if len(r) and not bool(live.all()):
                        r.keep(live)
                if all(len(r) == 0 for r in rows.values()):
                    break
            with nvtx_range("update"):
                if apgd:
                    for m, r in rows.items():
                        if len(r):
                            self._apgd_update(m, r)
                else:
                    for norm, ms in groups.items():
                        ms = [m for m in ms if len(rows[m])]
                        ops.pgd_step_(
                            [rows[m].x for m in ms],
                            [rows[m].grad for m in ms],
                            [rows[m].x0 for m in ms],
                            alpha=[self.alphas[m] for m in ms],
                            eps=[self.targets[m].eps for m in ms],
                            lo=[self.targets[m].lo for m in ms],
                            hi=[self.targets[m].hi for m in ms],
                            norm=norm,
                        )
        for m, r in rows.items():
            if self.tracks_iterates:
                self._keep_best_unfooled(r, fooled[m], out[m], out_loss[m])
            elif self.restarts == 1:  # training semantics, one restart: the final iterate
                out[m][r.pos] = r.x

    def _keyed_start(self, m: str, r: _Rows, salt: int) -> None:
        """The random start, drawn per sample from its key (same law as ``random_start_``)."""
        t = self.targets[m]
        for j, p in enumerate(r.pos.tolist()):
            g = self._keyed(int(self._keys[p]), salt, "cpu")
            if t.norm == "linf":
                d = (2 * torch.rand(r.x0.shape[1:], generator=g) - 1) * t.eps
            else:
                d = torch.randn(r.x0.shape[1:], generator=g)
                d = d * (t.eps * torch.rand((), generator=g) / d.norm().clamp_min(1e-12))
            v = r.x0[j].float() + d.to(r.x0.device)
            r.x[j] = v if t.lo is None and t.hi is None else v.clamp(t.lo, t.hi)

    # -- bookkeeping --------------------------------------------------------------------
    def _track(self, r: _Rows, logits, loss, fooled, out, out_loss) -> None:
        """Record rows misclassified at this iterate: a sample's first fooling iterate, or
        (without early stopping) its highest-loss fooling iterate. Rows of one sample are
        adjacent (sample-major), so the first of them wins a tie."""
        wrong = logits.argmax(1) != r.y
        take = wrong & (~fooled[r.pos] | (loss > out_loss[r.pos]))
        if self.early_stop:
            take &= ~fooled[r.pos]
        if not bool(take.any()):
            return
        idx = take.nonzero().squeeze(1)
        p = r.pos[idx]
        best = torch.full_like(out_loss, -float("inf"))
        best.scatter_reduce_(0, p, loss[idx], reduce="amax")
        idx = idx[loss[idx] == best[p]]
        p = r.pos[idx]
        first = torch.ones_like(p, dtype=torch.bool)
        first[1:] = p[1:] != p[:-1]
        out[p[first]] = r.x[idx[first]]
        out_loss[p[first]] = loss[idx[first]]
        fooled[p[first]] = True

    @staticmethod
    def _keep_best_unfooled(r, fooled, out, out_loss) -> None:
        """For samples still unfooled: their highest-loss iterate over rows and passes."""
        if len(r) == 0:
            return
        n = out_loss.shape[0]
        best = torch.full((n,), -float("inf"), device=r.pos.device)
        best.scatter_reduce_(0, r.pos, r.best_loss, reduce="amax")
        hit = (r.best_loss == best[r.pos]) & ~fooled[r.pos] & (r.best_loss > out_loss[r.pos])
        if bool(hit.any()):
            idx = hit.nonzero().squeeze(1)
            p = r.pos[idx]
            first = torch.ones_like(p, dtype=torch.bool)
            first[1:] = p[1:] != p[:-1]
            out[p[first]] = r.best_x[idx[first]]
            out_loss[p[first]] = r.best_loss[idx[first]]

    @staticmethod
    def _keep_worst(r, logits, loss, fooled, out, out_loss) -> None:
        """Training semantics over restarts: misclassified beats correct, then higher loss."""
        wrong = logits.argmax(1) != r.y
        was = fooled[r.pos]
        better = (wrong & ~was) | ((wrong == was) & (loss > out_loss[r.pos]))
        p = r.pos[better]
        out[p] = r.x[better]
        out_loss[p] = loss[better]
        fooled[p] = fooled[p] | wrong[better]

    def _checkpoint(self, r: _Rows, i: int) -> None:
        """APGD's step-size check after ``i`` updates (iterate ``i`` just evaluated; see the
        module docstring). ``hist[:, j]`` is the loss at iterate ``j``."""
        if len(r) == 0:
            return
        k = i - r.last_check
        h = r.hist[:, i - k : i + 1]
        osc = (h[:, 1:] > h[:, :-1]).sum(1).float() <= self.rho * k
        no_impr = ~r.reduced & (r.best_at_check >= r.best_loss)
        reduce = osc | no_impr
        r.reduced, r.best_at_check, r.last_check = reduce, r.best_loss.clone(), i
        if bool(reduce.any()):  # halve the step and restart from the best point
            r.step = torch.where(reduce, r.step / 2, r.step)
            r.x[reduce] = r.best_x[reduce]
            r.grad[reduce] = r.best_grad[reduce]
            r.x_prev[reduce] = r.best_x[reduce]
            r.fresh = r.fresh | reduce

    def _apgd_update(self, m: str, r: _Rows) -> None:
        t = self.targets[m]
        g = r.grad.float()
        l2 = t.norm == "l2"
        direction = g / bcast(norms(g, "l2").clamp_min(1e-12), g) if l2 else g.sign()
        step = bcast(r.step, r.x)
        z = project(r.x + step * direction.to(r.x.dtype), r.x0, t.eps, t.lo, t.hi, t.norm)
        a = bcast(torch.where(r.fresh, 1.0, self.momentum).to(r.x.dtype), r.x)
        x_new = project(
            r.x + a * (z - r.x) + (1 - a) * (r.x - r.x_prev), r.x0, t.eps, t.lo, t.hi, t.norm
        )
        r.x_prev, r.x = r.x, x_new
        r.fresh = torch.zeros_like(r.fresh)

    # -- CUDA graphs (training semantics) -----------------------------------------------
    def _run_graphed(self, x0, y, gen) -> dict[str, torch.Tensor]:
        step = self._captured(x0, y)
        n = len(y)
        out = {m: x.clone() for m, x in x0.items()}
        fooled = {m: torch.zeros(n, dtype=torch.bool, device=y.device) for m in x0}
        out_loss = {m: torch.full((n,), -float("inf"), device=y.device) for m in x0}
        groups = by_norm(self.targets)
        for restart in range(self.restarts):
            for m in x0:
                step.x_adv[m].copy_(step.x0[m])
            if self.random_start and self._keys is not None:  # eager, outside the graph
                for i, m in enumerate(x0):
                    r = _Rows(pos=torch.arange(n), x0=step.x0[m], x=step.x_adv[m])
                    self._keyed_start(m, r, restart * 64 + i)
            elif self.random_start:
                for norm, ms in groups.items():
                    ops.random_start_(
                        [step.x_adv[m] for m in ms],
                        [step.x0[m] for m in ms],
                        eps=[self.targets[m].eps for m in ms],
                        lo=[self.targets[m].lo for m in ms],
                        hi=[self.targets[m].hi for m in ms],
                        norm=norm,
                        generator=gen,
                    )
            for _ in range(self.steps):
                step.replay()
            for m in x0:
                if self.restarts == 1:
                    out[m].copy_(step.x_adv[m])
                    continue
                r = _Rows(pos=torch.arange(n, device=y.device), y=y, x=step.x_adv[m])
                logits, loss, _ = self._evaluate(m, r, r.x, need_grad=False)
                self._keep_worst(r, logits, loss, fooled[m], out[m], out_loss[m])
        return out

    def _graph_step(self, x_adv, x0, y, groups) -> None:
        grads = {}
        for m in x_adv:
            r = _Rows(pos=y, y=y)
            grads[m] = self._evaluate(m, r, x_adv[m], need_grad=True)[2]
        for norm, ms in groups.items():
            ops.pgd_step_(
                [x_adv[m] for m in ms],
                [grads[m] for m in ms],
                [x0[m] for m in ms],
                alpha=[self.alphas[m] for m in ms],
                eps=[self.targets[m].eps for m in ms],
                lo=[self.targets[m].lo for m in ms],
                hi=[self.targets[m].hi for m in ms],
                norm=norm,
            )

    def _captured(self, x0: dict[str, torch.Tensor], y: torch.Tensor) -> _CapturedStep:
        """The captured step for these shapes (captured on first use), its buffers refilled."""
        enabled = torch.is_autocast_enabled("cuda")
        autocast = (enabled, torch.get_autocast_dtype("cuda") if enabled else None)
        key = (
            y.device,
            tuple(y.shape),
            tuple((m, tuple(x.shape), x.dtype) for m, x in x0.items()),
            autocast,
        )
        step = self._graphs.get(key)
        if step is None:
            step = _CapturedStep(self, x0, y, autocast)
            self._graphs[key] = step
        with torch.no_grad():
            for m, x in x0.items():
                step.x0[m].copy_(x)
            step.y.copy_(y)
        return step

    def describe(self) -> dict:
        return {
            **super().describe(),
            "loss": self.loss_name,
            "steps": self.steps,
            "restarts": self.restarts,
            "schedule": self.schedule,
            "n_targets": self.n_targets,
            "early_stop": self.early_stop,
            "random_start": self.random_start,
            "cuda_graph": self.cuda_graph,
            "compile": self.compile,
            "alpha": {m or "x": a for m, a in self.alphas.items()}
            if self.schedule == "constant"
            else "2 eps, halved at checkpoints",
        }


class _CompiledOrEager(nn.Module):
    """``torch.compile(model)``, falling back to the eager model (one warning, with the
    reason) the first time compilation fails."""

    def __init__(self, model: nn.Module, what: str) -> None:
        super().__init__()
        self.eager, self.what = model, what
        self.compiled = torch.compile(model, dynamic=True)
        self.failed: str | None = None

    def forward(self, x):
        if self.failed is None:
            try:
                return self.compiled(x)
            except Exception as err:  # a backend without a compiler, an unsupported op
                import warnings

                self.failed = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                warnings.warn(
                    f"{self.what}: torch.compile failed ({self.failed}); running eagerly",
                    stacklevel=2,
                )
        return self.eager(x)


def _compile(model: nn.Module, what: str) -> nn.Module:
    return _CompiledOrEager(model, what)


def _fused_loss(model, loss_name: str):
    """The fused per-sample loss a :class:`ZeroShotClassifier` offers for ``loss_name``."""
    if loss_name == "ce" and hasattr(model, "cross_entropy"):
        return model.cross_entropy
    if loss_name == "cos" and hasattr(model, "target_cos"):
        return lambda x, y: -model.target_cos(x, y).float()
    return None


class _CapturedStep:
    """One training-semantics step of ``attack`` captured in a CUDA graph over static buffers
    ``x_adv``/``x0`` (dicts by modality) and ``y``; :meth:`replay` runs it."""

    def __init__(self, attack: IterativeAttack, x0: dict, y: torch.Tensor, autocast) -> None:
        from advcal.cuda_graph import GraphedStep

        self.x0 = {m: x.clone() for m, x in x0.items()}
        self.x_adv = {m: x.clone() for m, x in x0.items()}
        self.y = y.clone()
        groups = by_norm(attack.targets)
        enabled, dtype = autocast

        def step() -> None:
            # the autocast cache must be off under capture (cached casts would be graph-private)
            with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=enabled,
                                cache_enabled=False):  # fmt: skip
                attack._graph_step(self.x_adv, self.x0, self.y, groups)

        if attack._pool is None:
            attack._pool = torch.cuda.graph_pool_handle()
        static = [*self.x_adv.values(), *self.x0.values(), self.y]
        try:
            self.graph = GraphedStep(step, static, pool=attack._pool)
        except RuntimeError as err:
            raise RuntimeError(
                f"cuda_graph=True: capturing the {attack.name} step failed ({err}). A model "
                "whose forward synchronises with the host (.item(), data-dependent control "
                "flow, CPU random numbers, e.g. farthest-point sampling with a random start) "
                "cannot be captured; attack it with cuda_graph=False"
            ) from err

    def replay(self) -> None:
        self.graph.replay()


# ------------------------------------------------------------------------ the attacks


class PGD(IterativeAttack):
    """Projected gradient descent (Madry et al.): constant step ``alpha`` (default
    ``alpha_ratio * eps``), random start, on ``loss`` (default cross-entropy; ``"dlr"``,
    ``"cos"``, ``"kl"`` for the training attacks). ``early_stop=False`` (default) returns the
    final iterate, as torchattacks' PGD does; ``early_stop=True`` checks every iterate."""

    name = "pgd"

    def __init__(self, model, *, loss: str = "ce", **kw) -> None:
        super().__init__(model, loss=loss, schedule="constant", **kw)


class CrossMaxim(PGD):
    """Untargeted feature-space attack: push the embedding away from its true center,
    maximising ``-cos(z, c_y)`` (the logit of the true class, up to ``tau``)."""

    name = "crossmaxim"

    def __init__(self, model, **kw) -> None:
        kw.setdefault("loss", "cos")
        if kw["loss"] != "cos":
            raise ValueError(f"CrossMaxim's loss is 'cos', got {kw['loss']!r}")
        super().__init__(model, **kw)


class APGD(IterativeAttack):
    """Auto-PGD (Croce & Hein 2020) on ``loss="ce"`` (APGD-CE) or ``"dlr"`` (APGD-DLR):
    ``steps=100``, step size from ``2 eps`` halved at checkpoints, momentum 0.75, best-point
    restarts. ``early_stop=True`` (default) drops samples as soon as they are fooled."""

    name = "apgd"

    def __init__(
        self, model, *, loss: str = "ce", steps: int = 100, early_stop: bool = True, **kw
    ) -> None:
        if loss not in ("ce", "dlr", "cos", "kl"):
            raise ValueError(f"APGD takes an untargeted loss (ce, dlr, cos, kl), got {loss!r}")
        super().__init__(
            model, loss=loss, steps=steps, schedule="apgd", early_stop=early_stop, **kw
        )
        self.name = f"apgd-{loss}"


class APGDT(IterativeAttack):
    """Targeted APGD on the targeted DLR loss (AutoAttack's APGD-T): ``n_targets`` (default 9,
    or K - 1 when the model has fewer classes) highest-scoring wrong classes at the clean input,
    ``steps`` each; a sample is robust only if every target fails."""

    name = "apgd-t"

    def __init__(
        self,
        model,
        *,
        n_targets: int | None = None,
        steps: int = 100,
        early_stop: bool = True,
        **kw,
    ) -> None:
        super().__init__(
            model,
            loss="dlr_t",
            steps=steps,
            schedule="apgd",
            n_targets=n_targets or 9,
            early_stop=early_stop,
            **kw,
        )
        if n_targets is None:
            self.auto_targets = 9


ATTACKS = {"pgd": PGD, "crossmaxim": CrossMaxim, "apgd": APGD, "apgd-t": APGDT}

__all__ = ["APGD", "APGDT", "ATTACKS", "PGD", "CrossMaxim", "IterativeAttack", "apgd_checkpoints"]
