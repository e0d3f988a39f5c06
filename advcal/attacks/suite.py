"""Attack suites: AutoAttack's cascade, adapted per modality, with per-attack bookkeeping.

A suite is an ordered list of :class:`AttackSpec`. :meth:`AttackSuite.run` attacks a batch:
the clean pass finds the correctly classified samples; each attack then runs only on the
samples every earlier attack failed on (a sample is robust only if *every* attack fails), and
its examples are verified independently before they count: inside the eps-ball and the valid
range (an attack that leaves them is a bug and raises), and misclassified by a fresh forward
pass. The result carries the robust accuracy after each attack, how many samples each attack
broke first, the per-sample worst-case examples and the time each attack took.

Named suites (:data:`SUITES`):

* ``standard``: AutoAttack's ``standard`` composition and budgets (DATA.md §4): APGD-CE (100
  steps), APGD-T (100 steps, 9 targets or K - 1), FAB-T (100 steps, 9 targets), Square (5000
  queries). Adapted where an attack cannot run, and said so (``AttackSuite.skipped``, shown
  in reports): Square is L-inf only (an L2 input runs without it and the black-box check is
  not run); APGD-T's targeted DLR loss needs at least 4 classes.
* ``fast``: APGD-CE + APGD-T (20 steps each, 3 targets), for evaluation during training, the
  eps sweep and the large-eps check.
* ``legacy``: what advcal used before (PGD-50 x 2 restarts and CrossMaxim-50, step eps/10),
  kept to show how much the cross-entropy-only suite overstated robustness.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from advcal.attacks.base import norms, predict
from advcal.attacks.fab import FAB
from advcal.attacks.iterative import APGD, APGDT, PGD, CrossMaxim
from advcal.attacks.square import Square
from advcal.specs import InputSpec

KINDS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square", "pgd", "pgd-dlr", "crossmaxim")
BLACK_BOX = ("square",)
TARGETED = ("apgd-t", "fab-t")


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a suite.

    Attributes:
        name: one of :data:`KINDS`.
        steps: iterations (Square: queries).
        restarts: independent starts (later ones only on the survivors).
        n_targets: targeted attacks; None = min(9, K - 1).
        alpha_ratio: PGD-family step size as a multiple of eps (None: 0.25; APGD sets its own).
    """

    name: str
    steps: int = 100
    restarts: int = 1
    n_targets: int | None = None
    alpha_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.name not in KINDS:
            raise ValueError(f"unknown attack {self.name!r}; choose from {list(KINDS)}")
        for f, lo in (("steps", 1), ("restarts", 1)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"AttackSpec.{f} must be an int >= {lo}, got {v!r}")
        if self.n_targets is not None and (
            isinstance(self.n_targets, bool)
            or not isinstance(self.n_targets, int)
            or self.n_targets < 1
        ):
            raise ValueError(
                f"AttackSpec.n_targets must be an int >= 1 or None, got {self.n_targets!r}"
            )
        if self.n_targets is not None and self.name not in TARGETED:
            raise ValueError(f"n_targets applies to {TARGETED}, not {self.name!r}")
        if self.alpha_ratio is not None and not 0 < self.alpha_ratio <= 4:
            raise ValueError(f"AttackSpec.alpha_ratio must be in (0, 4], got {self.alpha_ratio}")
        if self.alpha_ratio is not None and not self.name.startswith(("pgd", "crossmaxim")):
            raise ValueError(f"alpha_ratio applies to the PGD family, not {self.name!r}")

    @classmethod
    def parse(cls, v: AttackSpec | str | Mapping) -> AttackSpec:
        """``AttackSpec``, ``"apgd-t"``, ``"apgd-t:100"`` or ``{"name": ..., "steps": ...}``."""
        if isinstance(v, AttackSpec):
            return v
        if isinstance(v, str):
            name, _, steps = v.partition(":")
            if steps and not steps.isdigit():
                raise ValueError(f"attack {v!r}: write 'name' or 'name:steps', e.g. 'apgd-t:100'")
            return cls(name.strip(), int(steps)) if steps else cls(name.strip())
        if isinstance(v, Mapping):
            unknown = set(v) - {f for f in cls.__dataclass_fields__}
            if unknown:
                raise ValueError(
                    f"unknown attack option(s) {sorted(unknown)}; known: "
                    f"{sorted(cls.__dataclass_fields__)}"
                )
            return cls(**v)
        raise TypeError(f"an attack is a name, 'name:steps' or a table, got {type(v).__name__}")

    @property
    def label(self) -> str:
        unit = "q" if self.name == "square" else ""
        x = f" x{self.restarts}" if self.restarts > 1 else ""
        return f"{self.name}-{self.steps}{unit}{x}"

    def build(self, model: nn.Module, eps: float, spec: InputSpec | None, seed: int, max_rows: int):
        kw = {"eps": eps, "spec": spec, "seed": seed}
        if self.name == "square":
            return Square(model, queries=self.steps, **kw)
        if self.name == "fab-t":
            return FAB(
                model,
                steps=self.steps,
                n_targets=self.n_targets,
                restarts=self.restarts,
                max_rows=max_rows,
                **kw,
            )
        it = {
            "steps": self.steps,
            "restarts": self.restarts,
            "max_rows": max_rows,
            "early_stop": True,
            **kw,
        }
        if self.name == "apgd-t":
            return APGDT(model, n_targets=self.n_targets, **it)
        if self.name in ("apgd-ce", "apgd-dlr"):
            return APGD(model, loss=self.name[5:], **it)
        ratio = {"alpha_ratio": self.alpha_ratio} if self.alpha_ratio is not None else {}
        if self.name == "crossmaxim":
            return CrossMaxim(model, **ratio, **it)
        return PGD(model, loss="dlr" if self.name == "pgd-dlr" else "ce", **ratio, **it)


SUITES: dict[str, tuple[AttackSpec, ...]] = {
    "standard": (
        AttackSpec("apgd-ce", 100),
        AttackSpec("apgd-t", 100),
        AttackSpec("fab-t", 100),
        AttackSpec("square", 5000),
    ),
    "fast": (AttackSpec("apgd-ce", 20), AttackSpec("apgd-t", 20, n_targets=3)),
    "legacy": (
        AttackSpec("pgd", 50, restarts=2, alpha_ratio=0.1),
        AttackSpec("crossmaxim", 50, alpha_ratio=0.1),
    ),
}


def resolve(suite: str | Sequence) -> tuple[AttackSpec, ...]:
    """A named suite, or a list of attacks (names, ``name:steps`` strings, tables)."""
    if isinstance(suite, str):
        if suite in SUITES:
            return SUITES[suite]
        if suite in KINDS or ":" in suite:
            return (AttackSpec.parse(suite),)
        raise ValueError(f"unknown suite {suite!r}; named suites: {sorted(SUITES)}")
    specs = tuple(AttackSpec.parse(v) for v in suite)
    if not specs:
        raise ValueError("an attack suite needs at least one attack")
    return specs


@dataclass
class SuiteResult:
    """One batch through a suite. Bool tensors are per sample ``(B,)``."""

    clean: torch.Tensor  # correctly classified (top-1)
    robust: torch.Tensor  # correct under every attack
    after: dict[str, torch.Tensor]  # robust after each attack (cumulative, cascade order)
    broken_by: dict[str, int]  # samples each attack broke first
    worst: torch.Tensor  # per-sample worst-case input (clean input where never attacked)
    seconds: dict[str, float] = field(default_factory=dict)


class AttackSuite:
    """A cascade of attacks against one classifier and budget (see the module docstring).

    Args:
        model: classifier ``x -> logits``.
        attacks: a suite name or a list of attacks (see :func:`resolve`).
        eps: the budget; spec: the input's InputSpec (default ``model.spec``).
        seed: attack ``i`` is seeded ``seed + i`` (the same for every batch).
        max_rows: rows per forward pass in targeted attacks (samples x targets).
    """

    def __init__(
        self,
        model: nn.Module,
        attacks: str | Sequence = "standard",
        *,
        eps: float | None = None,
        spec: InputSpec | None = None,
        seed: int = 0,
        max_rows: int = 4096,
    ) -> None:
        self.model = model
        self.spec = spec or getattr(model, "spec", None)
        if self.spec is None:
            raise ValueError("no InputSpec: pass spec= (ZeroShotClassifier has one)")
        self.eps = self.spec.check_eps(self.spec.eps if eps is None else eps)
        self.specs = resolve(attacks)
        self.skipped: list[str] = []  # "<label>: <why>", shown in reports
        self.attacks = {}
        k = getattr(model, "num_classes", None)
        for i, s in enumerate(self.specs):
            if s.name in BLACK_BOX and self.spec.norm != "linf":  # Square is L-inf only
                self.skipped.append(f"{s.label}: L-inf only, this input is {self.spec.norm}")
                continue
            if s.name == "apgd-t" and k is not None and k < 4:  # the targeted DLR's ranks
                self.skipped.append(f"{s.label}: the targeted DLR loss needs >= 4 classes, {k}")
                continue
            if s.label in self.attacks:
                raise ValueError(f"attack {s.label} appears twice in the suite")
            self.attacks[s.label] = s.build(model, self.eps, self.spec, seed + i, max_rows)

    @property
    def labels(self) -> list[str]:
        return list(self.attacks)

    @property
    def white_box(self) -> list[str]:
        return [
            k
            for k, s in zip(self.attacks, self._built_specs(), strict=True)
            if s.name not in BLACK_BOX
        ]

    def _built_specs(self) -> list[AttackSpec]:
        return [s for s in self.specs if s.label in self.attacks]

    def describe(self) -> list[dict]:
        return [{**asdict(s), "label": s.label} for s in self._built_specs()]

    def run(
        self, x: torch.Tensor, y: torch.Tensor, keys: torch.Tensor | None = None
    ) -> SuiteResult:
        """Attack the batch ``(x, y)``; ``keys`` (e.g. dataset indices) key every random draw
        per sample, so a sample's result does not depend on its batch."""
        logits = predict(self.model, x)
        clean = logits.argmax(1) == y
        robust = clean.clone()
        worst = x.clone()
        after, broken_by, seconds = {}, {}, {}
        for label, atk in self.attacks.items():
            live = robust.nonzero().squeeze(1)
            t0 = time.perf_counter()
            if len(live):
                k = None if keys is None else keys[live.to(keys.device)]
                xa = atk(x[live], y[live], keys=k)
                self._verify(label, xa, x[live])
                fooled = predict(self.model, xa).argmax(1) != y[live]
                worst[live] = xa  # survivors keep the attack's strongest example
                robust[live[fooled]] = False
                broken_by[label] = int(fooled.sum())
            else:
                broken_by[label] = 0
            seconds[label] = time.perf_counter() - t0
            after[label] = robust.clone()
        return SuiteResult(clean, robust, after, broken_by, worst, seconds)

    def _verify(self, label: str, xa: torch.Tensor, x: torch.Tensor) -> None:
        """Every example an attack returns must lie in the eps-ball and the valid range."""
        s = self.spec
        d = norms(xa - x, s.norm)
        tol = 1e-5 * max(1.0, self.eps)
        bad = d > self.eps + tol
        if s.lo is not None:
            bad |= (xa < s.lo - tol).flatten(1).any(1)
        if s.hi is not None:
            bad |= (xa > s.hi + tol).flatten(1).any(1)
        if bool(bad.any()) or not bool(torch.isfinite(xa).all()):
            raise RuntimeError(
                f"attack {label} returned {int(bad.sum())} example(s) outside the eps-ball "
                f"(eps={self.eps:g}, max {s.norm} distance {float(d.max()):g}) or the valid range "
                f"[{s.lo}, {s.hi}]: an attack bug, please report it"
            )


__all__ = ["KINDS", "SUITES", "AttackSpec", "AttackSuite", "SuiteResult", "resolve"]
