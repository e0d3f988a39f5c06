"""The on-disk cache of frozen clean embeddings.

The backbone is frozen, so a sample's clean embedding never changes: calibration computes it
once per backbone x data source x split x modality x precision and keeps it in
``$ADVCAL_CACHE/embeddings/<key>.npy`` (float32 ``(N, D)``, default cache root
``~/.cache/advcal``), memory-mapped when read, so a later run (or a resumed one) reuses it and
no process holds more of it than the rows it touches. The key hashes the backbone's weights
(:func:`backbone_fingerprint`), the dataset's content fingerprint (``ds.info.fingerprint``),
its split, size and modality, and the autocast dtype. Files are written under a temporary name
and renamed, so a killed run never leaves a half-written cache entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

FORMAT = "advcal-embeddings-v1"


def cache_root() -> Path:
    return Path(os.environ.get("ADVCAL_CACHE") or Path.home() / ".cache" / "advcal") / "embeddings"


def backbone_fingerprint(backbone: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (names, shapes, dtypes, bytes), computed once per
    backbone object (a few seconds for a billion parameters)."""
    cached = getattr(backbone, "_advcal_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256(type(backbone).__name__.encode())
    for name, t in sorted(backbone.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    fp = h.hexdigest()
    object.__setattr__(backbone, "_advcal_fingerprint", fp)
    return fp


class CleanEmbeddings:
    """``(N, D)`` float32 clean embeddings of one modality; ``emb[index]`` returns the rows of
    a batch as a tensor (only those rows are read from disk)."""

    def __init__(self, array: np.ndarray, path: Path | None = None) -> None:
        self.array, self.path = array, path

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        rows = np.asarray(index.detach().cpu().numpy(), dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.array[rows]))


def key(backbone: torch.nn.Module, info, modality: str, n: int, precision: str) -> str:
    parts = {
        "format": FORMAT,
        "backbone": backbone_fingerprint(backbone),
        "data": info.fingerprint,
        "source": info.source,
        "split": info.split,
        "n": n,
        "modality": modality,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def load_or_compute(
    k: str,
    n: int,
    dim: int,
    compute: Callable[[np.ndarray], None],
    *,
    root: Path | None = None,
    write: bool = True,
) -> CleanEmbeddings:
    """The cached ``(n, dim)`` array for key ``k``, or ``compute(out)`` filling a fresh one.

    With ``write=False`` (caching off, or a rank that is not the writer) the array is computed
    in memory and nothing is written."""
    root = root or cache_root()
    path = root / f"{k}.npy"
    if path.is_file():
        try:
            arr = np.load(path, mmap_mode="r")
            if arr.shape == (n, dim) and arr.dtype == np.float32:
                return CleanEmbeddings(arr, path)
        except (OSError, ValueError):
            pass  # unreadable (e.g. a foreign file): recomputed and replaced below
    if not write:
        out = np.empty((n, dim), dtype=np.float32)
        compute(out)
        return CleanEmbeddings(out)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{k}.{os.getpid()}.tmp.npy"
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        compute(out)
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return CleanEmbeddings(np.load(path, mmap_mode="r"), path)


__all__ = ["CleanEmbeddings", "backbone_fingerprint", "cache_root", "key", "load_or_compute"]
