"""The `Backbone` protocol: a frozen multimodal encoder bound to a shared embedding space."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from advcal.specs import InputSpec

DEFAULT_TEMPLATES = ("a {}.", "a photo of a {}.", "a recording of a {}.", "an example of a {}.")
# prompts per text-tower batch in Backbone.centers: 256 x 77 tokens through CLIP-L/ImageBind-H
# text keeps activations in the hundreds of MB.
TEXT_CHUNK = 256


class Backbone(nn.Module):
    """A frozen encoder per modality, all mapping into one ``embed_dim`` space.

    Subclasses implement :meth:`_encode` (and :meth:`encode_text` when they have a text
    tower). ``encode`` validates the modality and input before any work is done. Embeddings
    are returned with the backbone's own scale (not necessarily unit-norm); advcal's heads,
    objectives and metrics normalise.

    A backbone is always frozen: parameters never require grad and ``train()`` keeps it in
    eval mode, so BatchNorm statistics and dropout never move during calibration or attacks.
    """

    name: str = "backbone"

    def __init__(self, specs: Mapping[str, InputSpec], embed_dim: int) -> None:
        super().__init__()
        if not specs:
            raise ValueError("a Backbone needs at least one modality spec")
        self._specs = dict(specs)
        self.embed_dim = int(embed_dim)

    # -- description ---------------------------------------------------------------------
    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def spec(self, modality: str) -> InputSpec:
        try:
            return self._specs[modality]
        except KeyError:
            raise ValueError(
                f"unknown modality {modality!r} for backbone '{self.name}'; "
                f"it has {list(self._specs)}"
            ) from None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- freezing ------------------------------------------------------------------------
    def freeze(self) -> Backbone:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)

    # -- encoding ------------------------------------------------------------------------
    def encode(self, modality: str, x: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Embed a batch ``x`` of modality ``modality`` given in its valid input range.

        Returns ``(B, embed_dim)``. Differentiable w.r.t. ``x`` (attacks need it). An input of
        another floating dtype (float64 from numpy, float16) is cast to the weights' dtype.
        ``check=False`` skips validation (the attack loop validates once, not every step).
        """
        spec = self.spec(modality)
        if check:
            spec.check_input(x, "x", modality)
        dtype = self.dtype
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)  # e.g. float64 from numpy: the weights' dtype (differentiable)
        return self._encode(modality, x)

    @property
    def dtype(self) -> torch.dtype | None:
        """The floating dtype of the weights (None: no floating parameter)."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    def _encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head_init(self, modality: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A released linear head ``(W (D, D), b (D,))`` for ``modality`` acting on
        :meth:`encode`'s output (``z = e W^T + b``), for a ``linear`` calibration head to start
        from (``CalibConfig(head_kind="linear", head_init="backbone")``); None when the model
        ships none (the head then starts at the identity)."""
        return None

    def transforms(self) -> dict[str, Callable]:
        """Per-modality transforms from a decoded file (:mod:`advcal.data.decode`) to the
        valid-range tensor :meth:`encode` takes, reproducing the model's official
        preprocessing up to the attack space (open_clip's ``create_model_and_transforms``
        style; see :mod:`advcal.data.transforms`). Empty by default: a backbone without a
        recipe (a wrapped one) takes tensors already in its layout."""
        return {}

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embed text prompts, ``(N, embed_dim)``."""
        raise NotImplementedError(
            f"backbone '{self.name}' has no text tower; pass centers explicitly"
        )

    @torch.no_grad()
    def centers(
        self,
        class_names: Sequence[str],
        templates: Sequence[str] | None = None,
        *,
        chunk_size: int = TEXT_CHUNK,
    ) -> torch.Tensor:
        """Fixed semantic centers ``(K, embed_dim)``, unit-norm rows.

        Each class's center is the renormalised mean of the normalised text embeddings of
        its prompts, one per template (a template ensemble, as in CLIP zero-shot). The
        ``K x T`` prompts are encoded ``chunk_size`` at a time (ImageNet's 1000 classes x 80
        templates would otherwise be one 80k-prompt batch through the text tower); each
        prompt's embedding does not depend on its batch-mates, so the result is the same.
        """
        if not class_names:
            raise ValueError("class_names is empty")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        templates = tuple(templates or DEFAULT_TEMPLATES)
        prompts = [t.format(c) for c in class_names for t in templates]
        z = torch.cat(
            [
                nn.functional.normalize(
                    self.encode_text(prompts[i : i + chunk_size]).float(), dim=-1
                )
                for i in range(0, len(prompts), chunk_size)
            ]
        )
        z = z.view(len(class_names), len(templates), -1).mean(1)
        return nn.functional.normalize(z, dim=-1)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a Conv1d/Conv2d/Linear inside an
    ``nn.Sequential`` into that layer's weight and bias, in place; returns ``module``.

    Exact in eval mode up to float rounding (a frozen backbone's BatchNorm is an affine map
    with fixed statistics): the forward and the input-gradient backward lose one pass over
    every activation."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    for child in module.children():
        fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        layers, out, i = list(module), [], 0
        while i < len(layers):
            layer, nxt = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d)) and not nxt.training:
                if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
                    out.append(fuse_conv_bn_eval(layer, nxt))
                    i += 2
                    continue
                if isinstance(layer, nn.Linear):
                    out.append(fuse_linear_bn_eval(layer, nxt))
                    i += 2
                    continue
            out.append(layer)
            i += 1
        module._modules.clear()
        for j, layer in enumerate(out):
            module.add_module(str(j), layer)
    return module


class WrappedBackbone(Backbone):
    """A Backbone made of a user's own encoders (see :func:`advcal.backbones.wrap`)."""

    name = "wrapped"

    def __init__(
        self,
        encoders: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
        specs: Mapping[str, InputSpec],
        embed_dim: int,
        text_encoder: Callable[[Sequence[str]], torch.Tensor] | None = None,
    ) -> None:
        missing = set(encoders) ^ set(specs)
        if missing:
            raise ValueError(
                f"encoders and specs must name the same modalities; mismatch: {sorted(missing)}"
            )
        super().__init__(specs, embed_dim)
        self.encoders = nn.ModuleDict(
            {m: e if isinstance(e, nn.Module) else _Lambda(e) for m, e in encoders.items()}
        )
        self._text = text_encoder
        self.freeze()

    def _encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        z = self.encoders[modality](x)
        if z.dim() != 2 or z.shape[1] != self.embed_dim:
            raise ValueError(
                f"encoder for '{modality}' returned shape {tuple(z.shape)}, "
                f"expected (B, {self.embed_dim})"
            )
        return z

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        if self._text is None:
            return super().encode_text(prompts)
        return self._text(list(prompts))


class _Lambda(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
