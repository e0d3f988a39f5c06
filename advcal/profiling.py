"""NVTX ranges in the ``advcal`` domain (and torch.profiler ranges while one records).

``with advcal.profiling.range("attack/step"): ...`` marks host time on the Nsight Systems
timeline (GPU work launched inside is attributed to it). Uses the ``nvtx`` package when
installed (a real ``advcal`` domain), else ``torch.cuda.nvtx`` with an ``advcal:`` prefix.
Profile with::

    nsys profile --trace=cuda,nvtx,osrt --cuda-graph-trace=node -o advcal-attack \\
        python benchmarks/bench_attack.py --steps 10
    nsys stats --report nvtx_sum,cuda_gpu_kern_sum advcal-attack.nsys-rep

While a ``torch.profiler`` records (on any device), every range is also a
``record_function`` of the same name, so a CPU profile breaks the time down the same way
(``benchmarks/profile_attack.py``).
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
    """An NVTX range named ``name`` in the ``advcal`` domain around the ``with`` body (and a
    ``torch.profiler`` range ``advcal:<name>`` while a profiler records)."""
    with contextlib.ExitStack() as stack:
        if torch.autograd._profiler_enabled():
            stack.enter_context(torch.profiler.record_function(f"{DOMAIN}:{name}"))
        if enabled():
            stack.enter_context(_nvtx_only(name))
        yield


@contextlib.contextmanager
def _nvtx_only(name: str) -> Iterator[None]:
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
