"""Benchmark: fused head + normalise + fixed-center CE (``advcal.ops.head_ce``) vs eager and
torch.compile, fwd / bwd / fwd+bwd.

FLOPs counted (algorithmic, residual head, gradients for e, W, b; centers frozen):
  fwd     = 2 B D^2 (e W^T) + 2 B K D (u C^T)
  bwd     = 2 B K D (dlogits C) + 2 B D^2 (dz W) + 2 B D^2 (dz^T e)
  fwd+bwd = 6 B D^2 + 4 B K D
(the fused kernel's extra ``softmax C`` in the forward replaces the backward's ``dlogits C``;
its bf16 hi/lo logits split adds 2 B K D that is not counted as useful work).

Arms: ``eager_fp32`` (the reference on fp32 tensors), and on the same bf16 tensors
``eager_bf16_autocast`` and ``compile_{default,reduce_overhead}_bf16_autocast`` (the reference
under bf16 autocast, eager / torch.compile: its matmuls in bf16 as in a mixed-precision loop;
without autocast the reference would upcast to fp32 and flatter advcal) and ``advcal_bf16``.
The acceptance ratios read off the columns ``x_eager_bf16_autocast`` (>= 3 at B=256, K=1000)
and ``x_compile_default_bf16_autocast`` (>= 1.3), ``frac_matmul`` (>= 0.5 at B=4096).

    python benchmarks/bench_head_ce.py [--quick] [--json out.json]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import advcal.ops as ops
from advcal.ops import _dispatch
from benchmarks.harness import Case, Table, matmul_rate, parser, run_sweep

TAU = 0.07
PHASES = ("fwd", "bwd", "fwd+bwd")
# the ratio columns of the table (see benchmarks/harness.py)
BASELINES = ("eager_bf16_autocast", "compile_default_bf16_autocast")


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case(f"B{b}_D64_K{k}", {"B": b, "D": 64, "K": k}) for b in (8, 33) for k in (10,)]
    return [
        Case(f"B{b}_D1024_K{k}", {"B": b, "D": 1024, "K": k})
        for b in (64, 256, 1024, 4096)
        for k in (10, 1000)
    ]


def flops(case: Case, phase: str) -> float:
    b, d, k = case.params["B"], case.params["D"], case.params["K"]
    fwd = 2 * b * d * d + 2 * b * k * d
    bwd = 2 * b * k * d + 4 * b * d * d
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[phase]


def inputs(case: Case, device: torch.device, dtype: torch.dtype):
    b, d, k = case.params["B"], case.params["D"], case.params["K"]
    g = torch.Generator().manual_seed(0)
    e = torch.randn(b, d, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(d, d, generator=g) * d**-0.5).to(device, dtype).requires_grad_(True)
    bias = (torch.randn(d, generator=g) * 0.1).to(device, dtype).requires_grad_(True)
    c = F.normalize(torch.randn(k, d, generator=g), dim=-1).to(device, dtype)
    y = torch.randint(0, k, (b,), generator=g).to(device)
    return e, w, bias, c, y


def make_phase(
    loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], phase: str
) -> Callable[[], object]:
    """A zero-arg callable timing one phase; ``bwd`` replays the backward of one retained
    graph (the forward is outside the timed region)."""
    if phase == "fwd":

        def fwd():
            with torch.no_grad():
                return loss_fn()

        return fwd
    if phase == "bwd":
        loss = loss_fn()
        return lambda: torch.autograd.grad(loss, params, retain_graph=True)
    return lambda: torch.autograd.grad(loss_fn(), params)


def reference(autocast: bool) -> Callable[..., torch.Tensor]:
    """The eager reference, optionally under bf16 autocast (the same function is compiled)."""

    def loss(e, w, b, c, y):
        with torch.autocast(e.device.type, torch.bfloat16, enabled=autocast):
            return ops.head_ce_ref(e, w, b, c, y, TAU)

    return loss


def arms(device: torch.device, phase: str) -> dict[str, Callable[[Case], Callable[[], object]]]:
    def eager(dtype, autocast=False):
        def make(case):
            e, w, b, c, y = inputs(case, device, dtype)
            f = reference(autocast)
            return make_phase(lambda: f(e, w, b, c, y), [e, w, b], phase)

        return make

    def compiled(mode):
        def make(case):
            if device.type != "cuda":
                raise NotImplementedError("torch.compile arms run on GPU only")
            e, w, b, c, y = inputs(case, device, torch.bfloat16)
            f = torch.compile(reference(autocast=True), mode=mode)
            return make_phase(lambda: f(e, w, b, c, y), [e, w, b], phase)

        return make

    def advcal(case):
        e, w, b, c, y = inputs(case, device, torch.bfloat16)
        return make_phase(lambda: ops.head_ce(e, w, b, c, y, TAU), [e, w, b], phase)

    backend = _dispatch.select("head_ce", *inputs(cases(True)[0], device, torch.bfloat16), TAU)
    return {
        "eager_fp32": eager(torch.float32),
        "eager_bf16_autocast": eager(torch.bfloat16, autocast=True),
        "compile_default_bf16_autocast": compiled("default"),
        "compile_reduce_overhead_bf16_autocast": compiled("reduce-overhead"),
        f"advcal_bf16[{backend.name}]": advcal,
    }


def main(argv: list[str] | None = None) -> Table:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = torch.device(args.device)
    limits = {"matmul_tflops": matmul_rate(device)}
    table = Table("head_ce", device, limits, baselines=BASELINES)
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
