"""NVTX ranges (domain ``advcal``); no-ops without CUDA."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def nvtx_range(name: str):
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(f"advcal:{name}")
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


range = nvtx_range  # public name: `advcal.profiling.range`
