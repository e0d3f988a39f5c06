"""Semantic centers: one per class (a ``(K, D)`` tensor), or many per class (:class:`MultiCenters`).

Most Bind models classify by the nearest text embedding of a class prompt: ``K`` centers, the
logits are ``cos(z, C) / tau``. UniBind instead keeps many LLM-written description embeddings per
class ("multi-center"): the prediction is the class of the nearest center, top-5 ranks classes by
their nearest center. Every consumer (classifier, objectives, evaluator, pipeline) accepts both;
:func:`split` turns either into ``(C (M, D) unit rows, labels (M,) or None, K)`` and
:func:`class_logits` reduces per-center logits to per-class ones (``max`` over each class's
centers; the identity for one center per class).

A multi-center file is safetensors (``centers`` ``(M, D)`` float32 unit rows, ``labels`` ``(M,)``
int64, the class names in the metadata), written by :func:`save_centers` or by
``advcal convert-centers`` from UniBind's pickles, read by :func:`load_centers`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

CENTERS_FORMAT = "advcal-multicenters-v1"


class MultiCenters(NamedTuple):
    """Many centers per class: ``centers`` ``(M, D)`` float32 unit rows, ``labels`` ``(M,)``
    int64 class index of each center, ``class_names`` the K classes."""

    centers: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def to(self, device: str | torch.device) -> MultiCenters:
        return MultiCenters(self.centers.to(device), self.labels.to(device), self.class_names)

    @property
    def device(self) -> torch.device:
        return self.centers.device

    @property
    def shape(self) -> tuple[int, int]:
        """``(M, D)``, as for a plain centers tensor."""
        return tuple(self.centers.shape)  # type: ignore[return-value]


Centers = torch.Tensor | MultiCenters


def split(
    centers: Centers, dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """``(C, labels, K)``: unit-norm fp32 ``C (M, D)``, the class of each row (None: row i is
    class i) and the number of classes. Checks the width against ``dim`` when given."""
    if isinstance(centers, MultiCenters):
        c, labels, k = centers.centers, centers.labels, len(centers.class_names)
        if labels.shape != (c.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(
                f"MultiCenters.labels must be ({c.shape[0]},) int64, got "
                f"{tuple(labels.shape)} {labels.dtype}"
            )
        if labels.device != c.device:
            raise ValueError(f"MultiCenters.labels is on {labels.device}, centers on {c.device}")
    elif isinstance(centers, torch.Tensor):
        c, labels, k = centers, None, centers.shape[0] if centers.dim() == 2 else 0
    else:
        raise TypeError(
            f"centers must be a (K, D) tensor or advcal.centers.MultiCenters, got "
            f"{type(centers).__name__}"
        )
    if c.dim() != 2 or c.shape[0] == 0 or (dim is not None and c.shape[1] != dim):
        want = f"(K, {dim})" if dim is not None else "(K, D)"
        raise ValueError(f"centers must be {want}, got {tuple(c.shape)}")
    if not bool(torch.isfinite(c).all()):
        bad = int((~torch.isfinite(c)).any(1).sum())
        raise ValueError(f"centers contain NaN or Inf ({bad} of {c.shape[0]} rows)")
    if bool((c.detach().float().norm(dim=1) == 0).any()):
        raise ValueError("centers contain an all-zero row: it has no direction to normalise")
    return F.normalize(c.detach().float(), dim=-1), labels, k


def class_logits(
    logits: torch.Tensor, labels: torch.Tensor | None, num_classes: int
) -> torch.Tensor:
    """Per-class logits ``(B, K)`` from per-center logits ``(B, M)``: the max over each class's
    centers (a class without centers scores ``-inf``). Differentiable; no host sync."""
    if labels is None:
        return logits
    idx = labels.expand(logits.shape[0], -1)
    out = logits.new_full((logits.shape[0], num_classes), float("-inf"))
    return out.scatter_reduce(1, idx, logits, reduce="amax", include_self=True)


def zero_shot_logits(z: torch.Tensor, centers: Centers, tau: float) -> torch.Tensor:
    """``(B, K)`` fp32 logits of ``normalize(z)`` against the centers over ``tau`` (a class's
    logit is its nearest center's for :class:`MultiCenters`)."""
    from advcal import ops

    c, labels, k = split(centers, z.shape[-1])
    return class_logits(ops.head_logits(z, None, None, c, tau, residual=False), labels, k)


def for_classes(mc: MultiCenters, class_names: Sequence[str]) -> MultiCenters:
    """``mc`` relabelled to the order of ``class_names`` (a dataset's classes); centers of
    classes the dataset lacks are dropped. Every dataset class needs at least one center."""
    names = [str(n) for n in class_names]
    if list(mc.class_names) == names:
        return mc
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in names if n not in mc.class_names]
    if missing:
        raise ValueError(
            f"the centers file has no centers for classes {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}; it holds {mc.class_names[:10]}"
        )
    remap = torch.tensor([index.get(n, -1) for n in mc.class_names], dtype=torch.int64)
    new = remap.to(mc.labels.device)[mc.labels]
    keep = new >= 0
    return MultiCenters(mc.centers[keep], new[keep], names)


def save_centers(
    path: str | Path,
    centers: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    *,
    source: str = "",
) -> Path:
    """Write a multi-center file (rows normalised), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    c, lab, k = split(MultiCenters(centers, labels.long(), list(class_names)))
    if int(lab.min()) < 0 or int(lab.max()) >= k:
        raise ValueError(f"labels must lie in [0, {k}) for {k} class names")
    path.parent.mkdir(parents=True, exist_ok=True)
    from advcal import runfolder  # unique temp name, fsync, removed on any failure

    tensors = {"centers": c.contiguous().cpu(), "labels": lab.contiguous().cpu()}
    meta = {
        "format": CENTERS_FORMAT,
        "class_names": json.dumps(list(class_names)),
        "source": source,
    }
    runfolder.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def load_centers(path: str | Path) -> MultiCenters:
    """A multi-center file (safetensors only; never a pickle)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix in (".pkl", ".pickle", ".pk"):
        raise ValueError(
            f"{path} is a pickle; convert it once with `advcal convert-centers SRC DST "
            "--trust-pickle` and load the .safetensors it writes"
        )
    if not path.is_file():
        raise FileNotFoundError(f"centers file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CENTERS_FORMAT:
                raise ValueError(
                    f"{path} is not an advcal centers file (format {meta.get('format')!r})"
                )
            centers, labels = f.get_tensor("centers"), f.get_tensor("labels")
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable centers file: {err}") from err
    mc = MultiCenters(centers, labels, list(json.loads(meta["class_names"])))
    from advcal.validation import check_finite

    check_finite(mc.centers, f"centers file {path}: 'centers'")  # NaN centers: NaN heads
    split(mc)  # shapes and dtypes
    return mc


__all__ = [
    "CENTERS_FORMAT",
    "Centers",
    "MultiCenters",
    "class_logits",
    "for_classes",
    "load_centers",
    "save_centers",
    "split",
    "zero_shot_logits",
]
