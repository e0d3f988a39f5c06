"""Benchmark: tiled InfoNCE (``advcal.ops.infonce``) vs eager and torch.compile, fwd / bwd /
fwd+bwd, with peak extra memory (eager holds several B x B fp32 buffers: 1 GiB each at B=16384).

FLOPs counted (clean side frozen, the calibration setting: gradient for z_adv only):
  fwd     = 2 B^2 D (S = a c^T; the fused kernel recomputes nothing here)
  bwd     = 2 B^2 D (dS c); the fused backward also recomputes S (+2 B^2 D, not counted)
  fwd+bwd = 4 B^2 D
Normalisation (O(B D)) is not counted.

    python benchmarks/bench_infonce.py [--quick] [--json out.json]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import advcal.ops as ops
from advcal.ops import _dispatch
from benchmarks.bench_head_ce import PHASES, make_phase
from benchmarks.harness import Case, Table, matmul_rate, parser, run_sweep

TAU = 0.1


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case(f"B{b}_D64", {"B": b, "D": 64}) for b in (8, 65)]
    return [Case(f"B{b}_D1024", {"B": b, "D": 1024}) for b in (64, 256, 1024, 4096, 16384)]


def flops(case: Case, phase: str) -> float:
    b, d = case.params["B"], case.params["D"]
    return {"fwd": 2 * b * b * d, "bwd": 2 * b * b * d, "fwd+bwd": 4 * b * b * d}[phase]


def inputs(case: Case, device: torch.device, dtype: torch.dtype):
    b, d = case.params["B"], case.params["D"]
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(b, d, generator=g)
    adv = (clean + 0.3 * torch.randn(b, d, generator=g)).to(device, dtype).requires_grad_(True)
    return adv, clean.to(device, dtype)


def arms(device: torch.device, phase: str) -> dict[str, Callable[[Case], Callable[[], object]]]:
    def eager(dtype, autocast=False):
        def make(case):
            a, c = inputs(case, device, dtype)

            def loss():
                with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                    return ops.infonce_ref(a, c, TAU)

            return make_phase(loss, [a], phase)

        return make

    def compiled(mode):
        def make(case):
            if device.type != "cuda":
                raise NotImplementedError("torch.compile arms run on GPU only")
            a, c = inputs(case, device, torch.bfloat16)
            f = torch.compile(ops.infonce_ref, mode=mode)
            return make_phase(lambda: f(a, c, TAU), [a], phase)

        return make

    def advcal(case):
        a, c = inputs(case, device, torch.bfloat16)
        return make_phase(lambda: ops.infonce(a, c, TAU), [a], phase)

    backend = _dispatch.select("infonce", *inputs(cases(True)[0], device, torch.bfloat16), TAU)
    return {
        "eager_fp32": eager(torch.float32),
        "eager_bf16_autocast": eager(torch.float32, autocast=True),
        "compile_default_bf16": compiled("default"),
        "compile_reduce_overhead_bf16": compiled("reduce-overhead"),
        f"advcal_bf16[{backend.name}]": advcal,
    }


def main(argv: list[str] | None = None) -> Table:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = torch.device(args.device)
    table = Table("infonce", device, {"matmul_tflops": matmul_rate(device)})
    for phase in PHASES:
        run_sweep(
            table,
            cases(args.quick),
            arms(device, phase),
            phase=phase,
            flops=lambda case, phase=phase: flops(case, phase),
        )
    table.print()
    if args.json:
        table.write_json(args.json)
    return table


if __name__ == "__main__":
    main()
