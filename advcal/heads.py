"""Calibration heads: one small trainable projection per modality, identity at init.

At step 0 every kind maps ``e -> e`` exactly, so calibration starts from the frozen model's
clean behaviour. Kinds:

* ``residual_linear``: ``z = e + e W^T + b`` with ``W = 0, b = 0`` at init (the default).
* ``linear``: ``z = e W^T + b`` with ``W = I, b = 0`` at init (UniBind-style heads; can start
  from released head weights with :meth:`CalibrationHeads.load_linear`).
* ``mlp``: ``z = e + W2 gelu(W1 e + b1) + b2`` with ``W2 = 0, b2 = 0`` at init.

Linear kinds expose :meth:`Head.fused` so the fused ``head_ce`` op can take the head's
parameters directly (one kernel for projection + normalisation + loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from advcal.errors import FileFormatError
from advcal.validation import check_state

KINDS = ("residual_linear", "linear", "mlp")


class Head(nn.Module):
    """One modality's head, ``(B, D) -> (B, D)``."""

    def __init__(self, dim: int, kind: str = "residual_linear", hidden: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"head kind must be one of {KINDS}, got {kind!r}")
        if dim <= 0:
            raise ValueError(f"head dim must be positive, got {dim}")
        self.kind, self.dim = kind, dim
        if kind in ("residual_linear", "linear"):
            self.weight = nn.Parameter(torch.zeros(dim, dim))
            self.bias = nn.Parameter(torch.zeros(dim))
            if kind == "linear":
                with torch.no_grad():
                    self.weight.copy_(torch.eye(dim))
        else:
            hidden = hidden or dim
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
        """``(weight, bias, residual)`` for the fused ops, or None for the MLP kind."""
        if self.kind == "mlp":
            return None
        return self.weight, self.bias, self.kind == "residual_linear"

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            return e + self.fc2(nn.functional.gelu(self.fc1(e)))
        z = nn.functional.linear(e, self.weight, self.bias)
        return e + z if self.kind == "residual_linear" else z


class CalibrationHeads(nn.Module):
    """A :class:`Head` per modality. ``heads(m, e)`` or ``heads[m](e)``."""

    def __init__(
        self,
        modalities: Sequence[str],
        dim: int,
        kind: str = "residual_linear",
        init: str = "identity",
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("CalibrationHeads needs at least one modality")
        if init != "identity":
            raise ValueError(
                f"init must be 'identity' (the method starts from the frozen model), got {init!r}"
            )
        self.kind, self.dim, self.hidden = kind, dim, hidden
        self.heads = nn.ModuleDict({m: Head(dim, kind, hidden) for m in modalities})

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.heads)

    def __getitem__(self, modality: str) -> Head:
        if modality not in self.heads:
            raise ValueError(
                f"no head for modality {modality!r}; heads exist for {list(self.heads)}"
            )
        return self.heads[modality]

    def forward(self, modality: str, e: torch.Tensor) -> torch.Tensor:
        return self[modality](e)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def load_linear(self, modality: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Start a ``linear`` head from given weights (e.g. UniBind's released heads)."""
        head = self[modality]
        if head.kind != "linear":
            raise ValueError(f"load_linear needs kind='linear', head '{modality}' is {head.kind}")
        if weight.shape != head.weight.shape:
            raise ValueError(
                f"weight for '{modality}' must be {tuple(head.weight.shape)}, "
                f"got {tuple(weight.shape)}"
            )
        head.weight.copy_(weight)
        head.bias.copy_(bias if bias is not None else torch.zeros_like(head.bias))

    def config(self) -> dict:
        return {
            "modalities": list(self.modalities),
            "dim": self.dim,
            "kind": self.kind,
            "hidden": self.hidden,
        }

    def save(self, path: str | Path) -> None:
        """Write the heads (safetensors, atomically) with their config in the header."""
        import json

        from advcal import runfolder

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"advcal_heads": json.dumps(self.config())}
        runfolder.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> CalibrationHeads:
        import json

        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"heads file {path} does not exist")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path), device=str(map_location))
        except Exception as err:
            raise FileFormatError(f"{path} is not a readable heads file: {err}") from err
        if "advcal_heads" not in meta:
            raise FileFormatError(f"{path} is a safetensors file but holds no advcal heads")
        try:
            config = json.loads(meta["advcal_heads"])
            heads = cls(**config)
        except (ValueError, TypeError) as err:
            raise FileFormatError(f"{path}: unreadable heads config in its header: {err}") from err
        check_state(heads.state_dict(), state, f"heads file {path}")
        heads.load_state_dict(state, strict=True)
        return heads.to(map_location)
