"""NVTX ranges in the ``advcal`` domain; no-ops without CUDA.

``with advcal.profiling.range("attack/step"): ...`` marks host time on the Nsight Systems
timeline (GPU work launched inside is attributed to it). Uses the ``nvtx`` package when
installed (a real ``advcal`` domain), else ``torch.cuda.nvtx`` with an ``advcal:`` prefix.
Profile with::

    nsys profile --trace=cuda,nvtx,osrt --cuda-graph-trace=node -o advcal-attack \\
        python benchmarks/bench_attack.py --steps 10
    nsys stats --report nvtx_sum,cuda_gpu_kern_sum advcal-attack.nsys-rep
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DOMAIN = "advcal"

try:  # optional: the NVIDIA nvtx package supports named domains
    import nvtx as _nvtx  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _nvtx = None


def enabled() -> bool:
    """Ranges are emitted only when CUDA is available (else every range is a no-op)."""
    return torch.cuda.is_available()


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range named ``name`` in the ``advcal`` domain around the ``with`` body."""
    if not enabled():
        yield
        return
    if _nvtx is not None:
        with _nvtx.annotate(name, domain=DOMAIN):
            yield
        return
    torch.cuda.nvtx.range_push(f"{DOMAIN}:{name}")
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


range = nvtx_range  # public name `advcal.profiling.range`

__all__ = ["DOMAIN", "enabled", "nvtx_range", "range"]
