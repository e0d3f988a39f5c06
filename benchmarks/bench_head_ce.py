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

CPU (``--device cpu``, the default without a GPU): user code runs fp32 there, so the arms are
``eager_fp32`` (the reference, as a user writes it), ``compile_fp32`` (``torch.compile`` of the
same function) and ``advcal_fp32`` (``advcal.ops.head_ce`` with its default dispatch; the
backend it picked per case is ``params["advcal_backend"]`` in the JSON), at the demo's
(B, D, K) = (128, 256, 10) and ImageNet's (256, 1024, 1000), in interleaved rounds: the
``p_eager_fp32`` / ``p_compile_fp32`` columns are the per-round paired ratios (median
[min-max], > 1: advcal faster). ``--grad e`` times the attack's case (gradient
for the embedding only, the head frozen) instead of calibration's (e, W, b)::

    python benchmarks/bench_head_ce.py --device cpu --json benchmarks/results/head_ce_cpu.json
    python benchmarks/bench_head_ce.py [--quick] [--json out.json]      # GPU: the full sweep
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import advcal.ops as ops
from advcal.ops import _dispatch
from benchmarks.harness import Case, Table, matmul_rate, parser, run_sweep

TAU = 0.07
PHASES = ("fwd", "bwd", "fwd+bwd")
# the ratio columns of the table (see benchmarks/harness.py)
BASELINES = ("eager_bf16_autocast", "compile_default_bf16_autocast")
CPU_BASELINES = ("eager_fp32", "compile_fp32")
CPU_SHAPES = ((128, 256, 10), (256, 1024, 1000))  # the demo's, ImageNet's (B, D, K)


def cases(quick: bool, device: torch.device | None = None) -> list[Case]:
    if quick:
        return [Case(f"B{b}_D64_K{k}", {"B": b, "D": 64, "K": k}) for b in (8, 33) for k in (10,)]
    if device is not None and device.type == "cpu":
        return [Case(f"B{b}_D{d}_K{k}", {"B": b, "D": d, "K": k}) for b, d, k in CPU_SHAPES]
    return [
        Case(f"B{b}_D1024_K{k}", {"B": b, "D": 1024, "K": k})
        for b in (64, 256, 1024, 4096)
        for k in (10, 1000)
    ]


def flops(case: Case, phase: str, head_grads: bool = True) -> float:
    b, d, k = case.params["B"], case.params["D"], case.params["K"]
    fwd = 2 * b * d * d + 2 * b * k * d
    bwd = 2 * b * k * d + (4 if head_grads else 2) * b * d * d  # dz W [+ dz^T e]
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[phase]


def inputs(case: Case, device: torch.device, dtype: torch.dtype, head_grads: bool = True):
    """e, W, b, centers, labels; W and b require grad unless ``head_grads`` is False (the
    attack's case: a frozen head, the gradient for e only)."""
    b, d, k = case.params["B"], case.params["D"], case.params["K"]
    g = torch.Generator().manual_seed(0)
    e = torch.randn(b, d, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(d, d, generator=g) * d**-0.5).to(device, dtype).requires_grad_(head_grads)
    bias = (torch.randn(d, generator=g) * 0.1).to(device, dtype).requires_grad_(head_grads)
    c = F.normalize(torch.randn(k, d, generator=g), dim=-1).to(device, dtype)
    y = torch.randint(0, k, (b,), generator=g).to(device)
    return e, w, bias, c, y


def make_phase(
    loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], phase: str
) -> Callable[[], object]:
    """A zero-arg callable timing one phase; ``bwd`` replays the backward of one retained
    graph (the forward is outside the timed region). Gradients for the ``params`` that
    require them."""
    params = [p for p in params if p.requires_grad]
    if phase == "fwd":

        def fwd():
            with torch.no_grad():
                return loss_fn()

        return fwd
    if phase == "bwd":
        # a compiled graph's backward donates its saved buffers, so it cannot be replayed
        # ("compiled with non-empty donated buffers"): off for the retained graph (it saves
        # memory, not time); the forward here is where torch.compile traces
        with functorch_config.patch(donated_buffer=False):
            loss = loss_fn()
        return lambda: torch.autograd.grad(loss, params, retain_graph=True)
    return lambda: torch.autograd.grad(loss_fn(), params)


def reference(autocast: bool) -> Callable[..., torch.Tensor]:
    """The eager reference, optionally under bf16 autocast (the same function is compiled)."""

    def loss(e, w, b, c, y):
        with torch.autocast(e.device.type, torch.bfloat16, enabled=autocast):
            return ops.head_ce_ref(e, w, b, c, y, TAU)

    return loss


def arms(
    device: torch.device, phase: str, head_grads: bool = True, no_compile: bool = False
) -> dict[str, Callable[[Case], Callable[[], object]]]:
    def eager(dtype, autocast=False):
        def make(case):
            e, w, b, c, y = inputs(case, device, dtype, head_grads)
            f = reference(autocast)
            return make_phase(lambda: f(e, w, b, c, y), [e, w, b], phase)

        return make

    def compiled(mode, dtype=torch.bfloat16, autocast=True):
        def make(case):
            if no_compile:
                raise NotImplementedError("--no-compile")
            if device.type != "cuda" and dtype != torch.float32:
                raise NotImplementedError("bf16 torch.compile arms run on GPU only")
            e, w, b, c, y = inputs(case, device, dtype, head_grads)
            f = torch.compile(reference(autocast=autocast), mode=mode)
            return make_phase(lambda: f(e, w, b, c, y), [e, w, b], phase)

        return make

    def advcal(dtype):
        def make(case):
            e, w, b, c, y = inputs(case, device, dtype, head_grads)
            # the backend the default dispatch picks for this case (CPU: size-dependent)
            case.params["advcal_backend"] = _dispatch.select("head_ce", e, w, b, c, y, TAU).name
            return make_phase(lambda: ops.head_ce(e, w, b, c, y, TAU), [e, w, b], phase)

        return make

    if device.type == "cpu":  # the backend per case: params["advcal_backend"]
        return {
            "eager_fp32": eager(torch.float32),
            "compile_fp32": compiled("default", torch.float32, autocast=False),
            "advcal_fp32": advcal(torch.float32),
        }
    backend = _dispatch.select("head_ce", *inputs(cases(True)[0], device, torch.bfloat16), TAU)
    return {
        "eager_fp32": eager(torch.float32),
        "eager_bf16_autocast": eager(torch.bfloat16, autocast=True),
        "compile_default_bf16_autocast": compiled("default"),
        "compile_reduce_overhead_bf16_autocast": compiled("reduce-overhead"),
        f"advcal_bf16[{backend.name}]": advcal(torch.bfloat16),
    }


def add_arguments(p) -> None:
    """The options bench_head_ce and bench_infonce share."""
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per case (default: 9 on CPU, 1 on GPU)")  # fmt: skip
    p.add_argument("--reps", type=int, default=5, help="calls per arm per round")
    p.add_argument("--phases", default=None, help="comma-separated, default fwd,bwd,fwd+bwd")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile arms")
    p.add_argument("--shapes", default=None,
                   help="comma-separated BxD[xK] shapes instead of the device's sweep")  # fmt: skip
    p.add_argument("--arms", default=None,
                   help="comma-separated arm-name prefixes to run (default: all)")  # fmt: skip


def select_arms(arms: dict, prefixes: str | None) -> dict:
    """The arms whose names start with one of the comma-separated ``prefixes`` (all: None)."""
    if not prefixes:
        return arms
    keep = tuple(prefixes.split(","))
    chosen = {k: v for k, v in arms.items() if k.startswith(keep)}
    if not chosen:
        raise SystemExit(f"--arms {prefixes}: no arm matches; arms are {', '.join(arms)}")
    return chosen


def parse_shapes(text: str, names: str) -> list[Case]:
    """``--shapes 256x1024x1000,128x256x10`` -> Cases with params named by ``names`` ("BDK")."""
    out = []
    for item in text.split(","):
        dims = [int(v) for v in item.lower().split("x")]
        if len(dims) != len(names):
            raise SystemExit(f"--shapes {item}: expected {'x'.join(names)}")
        out.append(Case("_".join(f"{n}{v}" for n, v in zip(names, dims, strict=True)),
                        dict(zip(names, dims, strict=True))))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> Table:
    p = parser(__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--grad", choices=("ewb", "e"), default="ewb",
                   help="gradients for e, W, b (calibration) or e only (attacks)")  # fmt: skip
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    rounds = args.rounds or ((3 if args.quick else 9) if cpu else 1)
    phases = args.phases.split(",") if args.phases else PHASES
    limits = {"matmul_tflops": matmul_rate(device)}
    table = Table("head_ce", device, limits, baselines=CPU_BASELINES if cpu else BASELINES)
    sweep = parse_shapes(args.shapes, "BDK") if args.shapes else cases(args.quick, device)
    for phase in phases:
        run_sweep(
            table,
            sweep,
            select_arms(
                arms(device, phase, head_grads=args.grad == "ewb", no_compile=args.no_compile),
                args.arms,
            ),
            phase=phase,
            flops=lambda case, phase=phase: flops(case, phase, args.grad == "ewb"),
            rounds=rounds,
            reps=args.reps,
        )
    table.print()
    if args.json:
        table.write_json(args.json)
    return table


if __name__ == "__main__":
    main()
