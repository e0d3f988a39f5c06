"""Benchmark: tiled InfoNCE (``advcal.ops.infonce``) vs eager and torch.compile, fwd / bwd /
fwd+bwd, with peak extra memory (eager holds several B x B fp32 buffers: 1 GiB each at B=16384).

FLOPs counted (clean side frozen, the calibration setting: gradient for z_adv only):
  fwd     = 2 B^2 D (S = a c^T; the fused kernel recomputes nothing here)
  bwd     = 2 B^2 D (dS c); the fused backward also recomputes S (+2 B^2 D, not counted)
  fwd+bwd = 4 B^2 D
Normalisation (O(B D)) is not counted.

Arms as in bench_head_ce: ``eager_fp32``; on the same bf16 tensors the reference under bf16
autocast (eager, torch.compile default / reduce-overhead) and ``advcal_bf16``. Acceptance at
B=16384: ``peak_mem_mb`` of advcal <= 10% of ``eager_bf16_autocast``'s, and
``x_eager_bf16_autocast`` >= 1.

CPU (``--device cpu``): ``eager_fp32``, ``compile_fp32`` and ``advcal_fp32`` at
(B, D) = (128, 256) and (256, 1024), interleaved rounds, paired ratios ``p_eager_fp32`` /
``p_compile_fp32`` (see bench_head_ce)::

    python benchmarks/bench_infonce.py --device cpu --json benchmarks/results/infonce_cpu.json
    python benchmarks/bench_infonce.py [--quick] [--json out.json]      # GPU: the full sweep
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import advcal.ops as ops
from advcal.ops import _dispatch
from benchmarks.bench_head_ce import (
    BASELINES,
    CPU_BASELINES,
    PHASES,
    add_arguments,
    make_phase,
    parse_shapes,
    select_arms,
)
from benchmarks.harness import Case, Table, matmul_rate, parser, run_sweep

TAU = 0.1
CPU_SHAPES = ((128, 256), (256, 1024))  # (B, D) as bench_head_ce's CPU shapes


def cases(quick: bool, device: torch.device | None = None) -> list[Case]:
    if quick:
        return [Case(f"B{b}_D64", {"B": b, "D": 64}) for b in (8, 65)]
    if device is not None and device.type == "cpu":
        return [Case(f"B{b}_D{d}", {"B": b, "D": d}) for b, d in CPU_SHAPES]
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


def reference(autocast: bool) -> Callable[..., torch.Tensor]:
    """The eager reference, optionally under bf16 autocast (the same function is compiled)."""

    def loss(a, c):
        with torch.autocast(a.device.type, torch.bfloat16, enabled=autocast):
            return ops.infonce_ref(a, c, TAU)

    return loss


def arms(
    device: torch.device, phase: str, no_compile: bool = False
) -> dict[str, Callable[[Case], Callable[[], object]]]:
    def eager(dtype, autocast=False):
        def make(case):
            a, c = inputs(case, device, dtype)
            f = reference(autocast)
            return make_phase(lambda: f(a, c), [a], phase)

        return make

    def compiled(mode, dtype=torch.bfloat16, autocast=True):
        def make(case):
            if no_compile:
                raise NotImplementedError("--no-compile")
            if device.type != "cuda" and dtype != torch.float32:
                raise NotImplementedError("bf16 torch.compile arms run on GPU only")
            a, c = inputs(case, device, dtype)
            f = torch.compile(reference(autocast=autocast), mode=mode)
            return make_phase(lambda: f(a, c), [a], phase)

        return make

    def advcal(dtype):
        def make(case):
            a, c = inputs(case, device, dtype)
            # the backend the default dispatch picks for this case (CPU: size-dependent)
            case.params["advcal_backend"] = _dispatch.select("infonce", a, c, TAU).name
            return make_phase(lambda: ops.infonce(a, c, TAU), [a], phase)

        return make

    if device.type == "cpu":  # the backend per case: params["advcal_backend"]
        return {
            "eager_fp32": eager(torch.float32),
            "compile_fp32": compiled("default", torch.float32, autocast=False),
            "advcal_fp32": advcal(torch.float32),
        }
    backend = _dispatch.select("infonce", *inputs(cases(True)[0], device, torch.bfloat16), TAU)
    return {
        "eager_fp32": eager(torch.float32),
        "eager_bf16_autocast": eager(torch.bfloat16, autocast=True),
        "compile_default_bf16_autocast": compiled("default"),
        "compile_reduce_overhead_bf16_autocast": compiled("reduce-overhead"),
        f"advcal_bf16[{backend.name}]": advcal(torch.bfloat16),
    }


def main(argv: list[str] | None = None) -> Table:
    p = parser(__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    rounds = args.rounds or ((3 if args.quick else 9) if cpu else 1)
    phases = args.phases.split(",") if args.phases else PHASES
    limits = {"matmul_tflops": matmul_rate(device)}
    table = Table("infonce", device, limits, baselines=CPU_BASELINES if cpu else BASELINES)
    sweep = parse_shapes(args.shapes, "BD") if args.shapes else cases(args.quick, device)
    for phase in phases:
        run_sweep(
            table,
            sweep,
            select_arms(arms(device, phase, no_compile=args.no_compile), args.arms),
            phase=phase,
            flops=lambda case, phase=phase: flops(case, phase),
            rounds=rounds,
            reps=args.reps,
        )
    table.print()
    if args.json:
        table.write_json(args.json)
    return table


if __name__ == "__main__":
    main()
