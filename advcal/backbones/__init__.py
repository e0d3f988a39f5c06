"""Backbones: the frozen encoders advcal calibrates.

``load(name, checkpoint=None, device=None)`` builds a registered backbone;
``load_with_transforms(...)`` also returns its per-modality data transforms; ``wrap(...)`` turns
a user's own encoders into one. Registered names import their module lazily, so optional
dependencies are only needed for the backbone actually used.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from advcal.backbones.base import Backbone, WrappedBackbone
from advcal.specs import InputSpec

# name (or name prefix ending in '*') -> "module:function"; the function takes
# (name, checkpoint, device, **kwargs) and returns a Backbone.
_REGISTRY: dict[str, str] = {
    "minibind": "advcal.backbones.minibind:load",
    "imagebind_huge": "advcal.backbones.imagebind:load",
    "languagebind_*": "advcal.backbones.languagebind:load",
    "unibind": "advcal.backbones.unibind:load",
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(name: str) -> Callable[..., Backbone]:
    target = _REGISTRY.get(name)
    if target is None:
        for key, value in _REGISTRY.items():
            if key.endswith("*") and name.startswith(key[:-1]):
                target = value
                break
    if target is None:
        raise ValueError(f"unknown backbone {name!r}; available: {available()}")
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def load(
    name: str,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    *,
    progress: bool = True,
    **kwargs,
) -> Backbone:
    """Build backbone ``name``, frozen, on ``device``; real Bind models need ``checkpoint``.

    ``progress=False`` silences the progress bar of loaders that have one (minibind's one-off
    pretraining)."""
    loader = _resolve(name)
    if "progress" in inspect.signature(loader).parameters:
        kwargs["progress"] = progress
    backbone = loader(name=name, checkpoint=checkpoint, device=device, **kwargs)
    backbone.freeze()
    if device is not None:
        backbone.to(device)
    return backbone


def load_with_transforms(
    name: str,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    **kwargs,
) -> tuple[Backbone, dict[str, Callable]]:
    """``(backbone, transforms)``: :func:`load` plus the backbone's per-modality transforms
    (:meth:`Backbone.transforms`: decoded file -> valid-range input), as open_clip's
    ``create_model_and_transforms``; pass them to ``advcal.data.open(..., transforms=)``."""
    backbone = load(name, checkpoint, device, **kwargs)
    return backbone, backbone.transforms()


def wrap(
    encoders: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    specs: Mapping[str, InputSpec],
    *,
    embed_dim: int,
    text_encoder: Callable[[Sequence[str]], torch.Tensor] | None = None,
) -> Backbone:
    """Make a Backbone of your own encoders: ``{modality: module_or_callable}`` + specs."""
    return WrappedBackbone(encoders, specs, embed_dim, text_encoder)


__all__ = ["Backbone", "InputSpec", "available", "load", "load_with_transforms", "wrap"]
