"""What every attack shares: the targets it perturbs, input validation, model state, projection.

An attack is an object built with typed keywords and called as ``atk(x, y)`` (torchattacks
style). ``model`` is a classifier (any module from a batch of inputs to logits), or a dict
``{modality: classifier}`` attacked together (``x`` is then a dict too). Before any work the base
class checks every input against its :class:`~advcal.specs.InputSpec` (shape, dtype, finite,
inside the valid range, batch and device agree with ``y``); during the attack the models run in
eval mode with their parameters frozen (no weight gradient is ever computed), and both are
restored afterwards; the returned examples lie inside the eps-ball and the valid range.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from advcal.profiling import nvtx_range
from advcal.specs import InputSpec


@dataclass(frozen=True)
class Target:
    """One perturbed input: its classifier, threat model and budget."""

    model: nn.Module
    spec: InputSpec
    eps: float

    @property
    def lo(self) -> float | None:
        return self.spec.lo

    @property
    def hi(self) -> float | None:
        return self.spec.hi

    @property
    def norm(self) -> str:
        return self.spec.norm


class Attack:
    """Base of every attack. Subclasses implement ``_run(x0, y) -> x_adv`` on dicts keyed like
    ``self.targets`` (``""`` for a single model) with validated, detached inputs.

    Args:
        model: a classifier module, or a dict ``{modality: classifier}``.
        eps: budget in input units; default the spec's ``eps`` (a dict sets it per modality).
        norm: ``"linf"`` or ``"l2"``; default the spec's norm.
        spec: the InputSpec(s); default ``model.spec`` (:class:`ZeroShotClassifier` has one).
        seed: seeds every random draw (a ``torch.Generator`` per call), so attacks are
            reproducible. A plain attribute: set ``atk.seed`` between calls for fresh draws.
    """

    name = "attack"
    multi_modal = True  # accepts a dict of models (attacked together)

    def __init__(
        self,
        model: nn.Module | Mapping[str, nn.Module],
        *,
        eps: float | Mapping[str, float] | None = None,
        norm: str | None = None,
        spec: InputSpec | Mapping[str, InputSpec] | None = None,
        seed: int = 0,
    ) -> None:
        if norm not in (None, "linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.multi = isinstance(model, Mapping)
        if self.multi and not self.multi_modal:
            raise TypeError(f"{type(self).__name__} attacks one model at a time, got a dict")
        models = dict(model) if self.multi else {"": model}
        if not models:
            raise ValueError("model is an empty dict")
        specs = spec if isinstance(spec, Mapping) else {m: spec for m in models}
        self.targets: dict[str, Target] = {}
        for m, mod in models.items():
            if not callable(mod):
                raise TypeError(f"model {m!r} is a {type(mod).__name__}, not a module")
            s = specs.get(m) or getattr(mod, "spec", None)
            if s is None:
                raise ValueError(f"no InputSpec for {'model' if not m else repr(m)}: pass spec=")
            if norm is not None:
                s = InputSpec(s.shape, s.lo, s.hi, s.eps, norm, s.space, s.description)
            e = eps.get(m, s.eps) if isinstance(eps, Mapping) else (s.eps if eps is None else eps)
            self.targets[m] = Target(mod, s, s.check_eps(e, f"eps for {m!r}" if m else "eps"))
        self.seed = seed
        self._keys: torch.Tensor | None = None

    # -- public call --------------------------------------------------------------------
    def __call__(self, x, y: torch.Tensor, *, keys: torch.Tensor | None = None):
        """Adversarial examples for ``x`` (a tensor, or a dict for a dict of models).

        ``keys`` (optional, ``(B,)`` int64, e.g. dataset indices): every random draw of
        sample ``i`` comes from a generator seeded by ``(seed, keys[i])``, so a sample's attack
        does not depend on which batch, or which torchrun rank, it lands in."""
        xs = x if self.multi else {"": x}
        self._validate(xs, y)
        if keys is not None and (not isinstance(keys, torch.Tensor) or keys.shape != (len(y),)):
            raise ValueError(f"keys must be a ({len(y)},) int64 tensor, one per sample")
        self._keys = None if keys is None else keys.detach().to(torch.int64).cpu()
        models = [t.model for t in self.targets.values()]
        try:
            with nvtx_range(f"attack/{self.name}"), eval_mode(models), frozen_params(models):
                out = self._run({m: xs[m].detach() for m in self.targets}, y)
        finally:
            self._keys = None
        return out if self.multi else out[""]

    def _keyed(self, key: int, salt: int, device="cpu") -> torch.Generator:
        """The generator of sample ``key``'s draws (``salt`` separates independent uses)."""
        return torch.Generator(device=device).manual_seed(
            (self.seed * 1_000_003 + key * 7919 + salt) % (2**62)
        )

    def _validate(self, xs, y) -> None:
        if not isinstance(xs, Mapping) or set(xs) != set(self.targets):
            want = f"a dict with keys {sorted(self.targets)}" if self.multi else "a tensor"
            raise ValueError(f"x must be {want}")
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.int64:
            raise ValueError("y must be a 1-D int64 tensor of labels")
        for m, t in self.targets.items():
            name = f"x[{m!r}]" if m else "x"
            t.spec.check_input(xs[m], name, m)
            if xs[m].dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(
                    f"{name} is {xs[m].dtype}; attacks run on float32 (or bfloat16/float16) "
                    "inputs: pass x.float()"
                )
            if xs[m].shape[0] != y.shape[0]:
                raise ValueError(f"{name} has batch {xs[m].shape[0]} but y has {y.shape[0]}")
            if xs[m].device != y.device:
                raise ValueError(f"{name} is on {xs[m].device} but y is on {y.device}")
            if xs[m].numel() == 0:
                continue
            below = t.lo is not None and bool(xs[m].min() < t.lo - 1e-6)
            above = t.hi is not None and bool(xs[m].max() > t.hi + 1e-6)
            if below or above:
                raise ValueError(f"{name} lies outside its valid range [{t.lo}, {t.hi}]")

    def _run(self, x0: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    def describe(self) -> dict:
        return {
            "attack": self.name,
            "seed": self.seed,
            "eps": {m or "x": t.eps for m, t in self.targets.items()},
            "norm": {m or "x": t.norm for m, t in self.targets.items()},
        }


# ------------------------------------------------------------------------------ helpers


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(R,)`` -> ``(R, 1, ..., 1)`` to broadcast against ``x``."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def norms(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample L-inf or L2 norm, ``(R,)`` fp32."""
    flat = t.reshape(t.shape[0], -1).float()
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def project(
    x: torch.Tensor, x0: torch.Tensor, eps, lo: float | None, hi: float | None, norm: str
) -> torch.Tensor:
    """``x`` projected onto the eps-ball around ``x0`` (``eps`` a float or ``(R,)``), then
    clamped to ``[lo, hi]``. Clamping after an L2 projection stays inside the ball (``x0`` lies
    in the box, so clamping only moves coordinates toward ``x0``)."""
    d = x - x0
    if norm == "linf":
        e = bcast(eps, x) if isinstance(eps, torch.Tensor) else eps
        d = (
            torch.maximum(torch.minimum(d, e), -e)
            if isinstance(e, torch.Tensor)
            else d.clamp(-e, e)
        )
    else:
        e = eps if isinstance(eps, torch.Tensor) else torch.full_like(d[:, 0].flatten(), eps)
        scale = (e / norms(d, "l2").clamp_min(1e-12)).clamp(max=1.0)
        d = d * bcast(scale.to(d.dtype), d)
    out = x0 + d
    return out if lo is None and hi is None else out.clamp(lo, hi)


def by_norm(targets: Mapping[str, Target]) -> dict[str, list[str]]:
    """Modalities grouped by norm (one fused update per group)."""
    groups: dict[str, list[str]] = {}
    for m, t in targets.items():
        groups.setdefault(t.norm, []).append(m)
    return groups


@contextlib.contextmanager
def frozen_params(models):
    """``requires_grad=False`` on every parameter of ``models`` for the attack (restored after):
    the attack differentiates w.r.t. its input only, so no op computes a weight gradient."""
    params = [p for m in models if isinstance(m, nn.Module) for p in m.parameters()]
    params = [p for p in params if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def eval_mode(models):
    modes = [(m, m.training) for m in models if isinstance(m, nn.Module)]
    try:
        for m, _ in modes:
            m.eval()
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


def predict(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Logits ``(B, K)`` fp32 in chunks, without autograd."""
    with torch.no_grad():
        if len(x) <= batch:  # the common case: no split, no concatenation
            return model(x).float()
        return torch.cat([model(x[i : i + batch]).float() for i in range(0, len(x), batch)])


__all__ = [
    "Attack",
    "Target",
    "bcast",
    "by_norm",
    "eval_mode",
    "frozen_params",
    "norms",
    "predict",
    "project",
]
