"""pytest-benchmark suite for the fused ops: eager reference vs advcal, fwd+bwd.

GPU: the timed function synchronises the device, so the wall clock covers the kernels.
CPU: tiny shapes (``pytest benchmarks/test_bench_ops.py --benchmark-disable`` is a smoke test).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_head_ce, bench_infonce
from benchmarks.harness import Case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    HEAD_CASE = Case("B256_D1024_K1000", {"B": 256, "D": 1024, "K": 1000})
    NCE_CASE = Case("B4096_D1024", {"B": 4096, "D": 1024})
else:
    HEAD_CASE = Case("B33_D64_K10", {"B": 33, "D": 64, "K": 10})
    NCE_CASE = Case("B65_D64", {"B": 65, "D": 64})


def _synced(fn):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return out

    return run


@pytest.mark.parametrize("arm", ["eager_fp32", "eager_bf16_autocast", "advcal"])
def test_head_ce_fwd_bwd(benchmark, arm):
    arms = bench_head_ce.arms(DEVICE, "fwd+bwd")
    make = next(v for k, v in arms.items() if k.startswith(arm))
    benchmark(_synced(make(HEAD_CASE)))


@pytest.mark.parametrize("arm", ["eager_fp32", "eager_bf16_autocast", "advcal"])
def test_infonce_fwd_bwd(benchmark, arm):
    arms = bench_infonce.arms(DEVICE, "fwd+bwd")
    make = next(v for k, v in arms.items() if k.startswith(arm))
    benchmark(_synced(make(NCE_CASE)))
