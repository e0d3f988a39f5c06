"""Adaptive white-box attacks in each modality's valid input space.

Attacks are objects built with typed keywords and called as ``atk(x, y)`` (torchattacks
style). The model is a *classifier*: any module mapping a batch of inputs to logits. For the
calibrated chain use :class:`ZeroShotClassifier`, which runs frozen backbone -> head ->
normalise -> logits against the fixed centers, so the attack is adaptive (through backbone
AND head). ``x`` may also be a dict ``{modality: tensor}`` with a dict of classifiers: all
modalities of a batch are attacked together and updated in one fused ``pgd_step_`` call.

The base class validates inputs before any work, runs the models in eval mode and restores
their mode, never leaves the eps-ball or the valid range (the fused update projects and
clamps every step), keeps the per-sample worst case over restarts, and touches no parameter
gradients (it differentiates w.r.t. the input only; the models' parameters are frozen for the
duration of the attack, so no weight gradient is ever computed).

``cuda_graph=True`` captures one whole attack step (every modality's backbone forward, head,
loss, input-gradient backward and the fused update) in a CUDA graph, once per input shape, and
replays it for the ``steps`` iterations. The step is free of host syncs; the random start runs
eagerly before the replays (one launch), and the worst-case bookkeeping uses masks, so the
graphed attack returns exactly the eager attack's adversarial examples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advcal import ops
from advcal.backbones.base import Backbone
from advcal.centers import Centers, class_logits, split
from advcal.heads import Head
from advcal.profiling import nvtx_range
from advcal.specs import InputSpec


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


@dataclass(frozen=True)
class _Target:
    model: nn.Module
    spec: InputSpec
    eps: float
    alpha: float


class Attack:
    """Base of the iterative L-inf / L2 attacks. Subclasses define :meth:`loss` (per sample,
    maximised).

    Args:
        model: a classifier module, or a dict ``{modality: classifier}``.
        eps: budget in input units; default: the spec's ``eps`` (per modality for dicts;
            a dict of floats sets them per modality).
        alpha: step size; default ``eps * alpha_ratio``.
        steps: iterations; restarts: independent random starts, worst case kept per sample.
        norm: ``"linf"`` or ``"l2"``; default: the spec's norm.
        spec: the InputSpec(s); default: ``model.spec`` (ZeroShotClassifier has one).
        random_start: start uniformly inside the ball (True) or at ``x``.
        seed: seeds the random starts (a ``torch.Generator``), so attacks are reproducible.
            A plain attribute: set ``atk.seed`` between calls to reuse one attack object
            (and its captured graphs) with fresh random starts.
        cuda_graph: capture the attack step in a CUDA graph per input shape and replay it
            (CUDA inputs only; the models must be capturable: no host syncs in ``forward``).
    """

    name = "attack"

    def __init__(
        self,
        model: nn.Module | Mapping[str, nn.Module],
        *,
        eps: float | Mapping[str, float] | None = None,
        alpha: float | None = None,
        alpha_ratio: float = 0.25,
        steps: int = 10,
        restarts: int = 1,
        norm: str | None = None,
        spec: InputSpec | Mapping[str, InputSpec] | None = None,
        random_start: bool = True,
        seed: int = 0,
        cuda_graph: bool = False,
    ) -> None:
        if steps < 0 or restarts < 1:
            raise ValueError(f"steps must be >= 0 and restarts >= 1, got {steps}, {restarts}")
        if norm not in (None, "linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if not 0 < alpha_ratio <= 1:
            raise ValueError(f"alpha_ratio must be in (0, 1], got {alpha_ratio}")
        self.multi = isinstance(model, Mapping)
        models = dict(model) if self.multi else {"": model}
        specs = spec if isinstance(spec, Mapping) else {m: spec for m in models}
        self.targets: dict[str, _Target] = {}
        for m, mod in models.items():
            s = specs.get(m) or getattr(mod, "spec", None)
            if s is None:
                raise ValueError(f"no InputSpec for {'model' if not m else repr(m)}: pass spec=")
            if norm is not None:
                s = InputSpec(s.shape, s.lo, s.hi, s.eps, norm, s.space, s.description)
            e = eps.get(m, s.eps) if isinstance(eps, Mapping) else (s.eps if eps is None else eps)
            e = s.check_eps(e, f"eps for {m!r}" if m else "eps")
            a = alpha if alpha is not None else e * alpha_ratio
            self.targets[m] = _Target(mod, s, e, float(a))
        self.steps, self.restarts = steps, restarts
        self.random_start, self.seed = random_start, seed
        self.cuda_graph = bool(cuda_graph)
        self._graphs: dict[tuple, _CapturedStep] = {}
        self._pool = None

    # -- the objective ------------------------------------------------------------------
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- public call --------------------------------------------------------------------
    def __call__(self, x, y: torch.Tensor):
        """Adversarial examples for ``x`` (a tensor, or a dict for a dict of models)."""
        xs = x if self.multi else {"": x}
        if not isinstance(xs, Mapping) or set(xs) != set(self.targets):
            want = f"a dict with keys {sorted(self.targets)}" if self.multi else "a tensor"
            raise ValueError(f"x must be {want}")
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.int64:
            raise ValueError("y must be a 1-D int64 tensor of labels")
        for m, t in self.targets.items():
            name = f"x[{m!r}]" if m else "x"
            t.spec.check_input(xs[m], name, m)
            if xs[m].shape[0] != y.shape[0]:
                raise ValueError(f"{name} has batch {xs[m].shape[0]} but y has {y.shape[0]}")
            if xs[m].device != y.device:
                raise ValueError(f"{name} is on {xs[m].device} but y is on {y.device}")
            below = t.spec.lo is not None and bool(xs[m].min() < t.spec.lo - 1e-6)
            above = t.spec.hi is not None and bool(xs[m].max() > t.spec.hi + 1e-6)
            if below or above:
                raise ValueError(f"{name} lies outside its valid range [{t.spec.lo}, {t.spec.hi}]")
        if self.cuda_graph and y.device.type != "cuda":
            raise ValueError(
                f"cuda_graph=True needs CUDA inputs, got tensors on {y.device}; "
                "pass cuda_graph=False to attack on this device"
            )
        models = [t.model for t in self.targets.values()]
        with nvtx_range(f"attack/{self.name}"), _eval_mode(models), _frozen_params(models):
            out = self._run({m: xs[m].detach() for m in self.targets}, y)
        return out if self.multi else out[""]

    # -- the loop -----------------------------------------------------------------------
    def _run(self, x0: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Restart 1 attacks every sample; each later restart only the samples no earlier
        restart has broken (as AutoAttack runs its attacks), which leaves the robust accuracy
        unchanged and costs a fraction of a full restart. Eagerly those samples are gathered
        into a smaller batch; a captured graph runs the full batch and masks the merge."""
        device = y.device
        gen = torch.Generator(device=device).manual_seed(self.seed)
        groups = _by_norm(self.targets)
        graphed = self.cuda_graph and self.steps > 0
        step = self._captured(x0, y) if graphed else None
        best = {m: x.clone() for m, x in x0.items()}
        best_wrong = {m: torch.zeros(len(y), dtype=torch.bool, device=device) for m in x0}
        best_loss = {m: torch.full((len(y),), -float("inf"), device=device) for m in x0}
        for r in range(self.restarts):
            idx = None  # the survivors' indices, when this restart runs on a gathered batch
            if r > 0 and not graphed and not self.multi:
                idx = (~best_wrong[""]).nonzero().squeeze(1)  # a host sync: eager only
                if idx.numel() == 0:
                    break
            if step is not None:
                xs, ys, x_adv, run_step = step.x0, step.y, step.x_adv, step.replay
            else:
                xs = x0 if idx is None else {m: x[idx] for m, x in x0.items()}
                ys = y if idx is None else y[idx]
                x_adv = {m: x.clone() for m, x in xs.items()}

                def run_step(x_adv=x_adv, xs=xs, ys=ys) -> None:
                    self._step(x_adv, xs, ys, groups)

            for m in x_adv:
                x_adv[m].copy_(xs[m])
            if self.random_start:
                for norm, ms in groups.items():
                    ops.random_start_(
                        [x_adv[m] for m in ms],
                        [xs[m] for m in ms],
                        eps=[self.targets[m].eps for m in ms],
                        lo=[self.targets[m].spec.lo for m in ms],
                        hi=[self.targets[m].spec.hi for m in ms],
                        norm=norm,
                        generator=gen,
                    )
            for _ in range(self.steps):
                run_step()
            with torch.no_grad():  # keep the per-sample worst case, by masks
                for m, xa in x_adv.items():
                    model = self.targets[m].model
                    wrong = model(xa).argmax(1) != ys
                    loss = self.loss(model, xa, ys).float()
                    may_change = ~best_wrong[m] if r > 0 else torch.ones_like(best_wrong[m])
                    if idx is not None:  # scatter the gathered batch back
                        xa = best[m].index_copy(0, idx, xa)
                        wrong = best_wrong[m].index_copy(0, idx, wrong)
                        loss = best_loss[m].index_copy(0, idx, loss)
                    better = may_change & (
                        (wrong & ~best_wrong[m])
                        | ((wrong == best_wrong[m]) & (loss > best_loss[m]))
                    )
                    mask = better.view(-1, *([1] * (xa.dim() - 1)))
                    best[m] = torch.where(mask, xa, best[m])
                    best_wrong[m] = best_wrong[m] | (wrong & may_change)
                    best_loss[m] = torch.where(better, loss, best_loss[m])
        return best

    def _step(self, x_adv, x0, y, groups) -> None:
        """One attack step for every modality: input gradients, then one fused update per
        norm group. Reads and writes only the given tensors (so a CUDA graph can capture it)."""
        grads = {m: self._grad(self.targets[m].model, x_adv[m], y) for m in x_adv}
        with nvtx_range("update"):
            for norm, ms in groups.items():
                ops.pgd_step_(
                    [x_adv[m] for m in ms],
                    [grads[m] for m in ms],
                    [x0[m] for m in ms],
                    alpha=[self.targets[m].alpha for m in ms],
                    eps=[self.targets[m].eps for m in ms],
                    lo=[self.targets[m].spec.lo for m in ms],
                    hi=[self.targets[m].spec.hi for m in ms],
                    norm=norm,
                )

    def _grad(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(model, x, y).sum()
            with nvtx_range("backward"):
                (g,) = torch.autograd.grad(loss, x)
        return g

    def _captured(self, x0: dict[str, torch.Tensor], y: torch.Tensor) -> _CapturedStep:
        """The captured step for these shapes (captured on first use), its buffers refilled."""
        autocast = (
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None,
        )
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
            "attack": self.name,
            "steps": self.steps,
            "restarts": self.restarts,
            "random_start": self.random_start,
            "seed": self.seed,
            "cuda_graph": self.cuda_graph,
            "eps": {m or "x": t.eps for m, t in self.targets.items()},
            "alpha": {m or "x": t.alpha for m, t in self.targets.items()},
            "norm": {m or "x": t.spec.norm for m, t in self.targets.items()},
        }


class _CapturedStep:
    """One attack step of ``attack`` captured in a CUDA graph over static buffers
    ``x_adv``/``x0`` (dicts by modality) and ``y``; :meth:`replay` runs it."""

    def __init__(self, attack: Attack, x0: dict, y: torch.Tensor, autocast: tuple) -> None:
        from advcal.cuda_graph import GraphedStep

        self.x0 = {m: x.clone() for m, x in x0.items()}
        self.x_adv = {m: x.clone() for m, x in x0.items()}
        self.y = y.clone()
        groups = _by_norm(attack.targets)
        enabled, dtype = autocast

        def step() -> None:
            # the autocast cache must be off under capture (cached casts would be graph-private)
            with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=enabled,
                                cache_enabled=False):  # fmt: skip
                attack._step(self.x_adv, self.x0, self.y, groups)

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


class PGD(Attack):
    """Projected gradient descent on the cross-entropy of the logits (Madry et al.)."""

    name = "pgd"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if isinstance(model, ZeroShotClassifier):  # fused head + CE, per sample
            return model.cross_entropy(x, y)
        return F.cross_entropy(model(x).float(), y, reduction="none")


class CrossMaxim(Attack):
    """Untargeted feature-space attack: push the embedding away from its true center,
    maximising ``-cos(z, c_y)``. Needs a model with ``target_cos(x, y)``
    (:class:`ZeroShotClassifier`)."""

    name = "crossmaxim"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not hasattr(model, "target_cos"):
            raise TypeError(
                "CrossMaxim needs a model with target_cos(x, y), e.g. "
                "advcal.attacks.ZeroShotClassifier"
            )
        return -model.target_cos(x, y).float()


ATTACKS = {"pgd": PGD, "crossmaxim": CrossMaxim}


def _by_norm(targets: Mapping[str, _Target]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for m, t in targets.items():
        groups.setdefault(t.spec.norm, []).append(m)
    return groups


@contextlib.contextmanager
def _frozen_params(models):
    """``requires_grad=False`` on every parameter of ``models`` for the attack (restored after):
    the attack differentiates w.r.t. its input only, so no op computes a weight gradient."""
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def _eval_mode(models):
    modes = [(m, m.training) for m in models]
    try:
        for m, _ in modes:
            m.eval()
        yield
    finally:
        for m, mode in modes:
            m.train(mode)
