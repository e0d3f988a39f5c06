"""Fused PGD update vs the eager chain, torch.compile of the chain and a copy of the same bytes.

Arms, per case, timed in interleaved rounds (``--rounds``, ``--reps`` calls per arm per round;
see benchmarks/harness.py), so the ratios are paired round by round:

- ``eager``: ``advcal.ops.pgd_step_ref_``, the separate-op chain the tests compare against;
- ``compiled``: ``torch.compile`` of that chain (it writes ``x`` in place too);
- ``copy``: ``dst.copy_(src)`` moving the same bytes as the step (read half, write half): the
  machine's copy bandwidth measured on the case's own byte count, in the same rounds;
- ``advcal``: ``advcal.ops.pgd_step_`` (the public function: argument checks and dispatch
  included), i.e. the C++ kernel on CPU, the CUDA kernel on GPU.

Bytes counted per call (the minimum any implementation must move): L-inf reads x, g, x0 and
writes x = 4 x itemsize per element (16 B fp32); L2 adds the norm passes: 8 x itemsize (32 B
fp32). ``p_copy`` of the advcal row is copy time / advcal time over the same bytes, i.e. the
fraction of the copy bandwidth reached (a copy's destination is also read for ownership, so
an in-place step can exceed 1); ``p_compiled`` > 1 means faster than torch.compile.

    python benchmarks/bench_pgd_step.py [--quick] [--json out.json] [--l2] [--dtype bf16]
        [--sizes 1e6,1e7] [--rounds 9] [--reps 5] [--no-compile]

The CPU acceptance run (fp32, L-inf and L2, 1e6 and 1e7)::

    python benchmarks/bench_pgd_step.py --l2 --sizes 1e6,1e7 \
        --json benchmarks/results/pgd_step_cpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advcal.ops import pgd_step_, pgd_step_ref_
from benchmarks.harness import Case, Table, parser, run_sweep

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALPHA, EPS = 2 / 255, 8 / 255
SAMPLES = 10  # leading (sample) dimension: L2 norms are per sample


def inputs(case: Case, device):
    n, dtype = case.params["N"], DTYPES[case.params["dtype"]]
    b = case.params["B"]
    x0 = torch.rand(b, n // b, device=device).to(dtype)
    g = torch.randn(b, n // b, device=device).to(dtype)
    return x0.clone(), g, x0


def nbytes(case: Case) -> int:
    item = torch.empty(0, dtype=DTYPES[case.params["dtype"]]).element_size()
    per = 4 if case.params["norm"] == "linf" else 8
    return per * item * case.params["N"]


def main(argv: list[str] | None = None) -> Table:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--l2", action="store_true", help="also the L2 step")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile arm")
    p.add_argument("--sizes", default=None, help="comma-separated element counts, e.g. 1e6,1e7")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9)")
    p.add_argument("--reps", type=int, default=5, help="calls per arm per round")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    else:
        sizes = [10**5, 10**6] if args.quick else [10**5, 10**6, 10**7]
    rounds = args.rounds or (3 if args.quick else 9)
    norms = ["linf", "l2"] if args.l2 else ["linf"]
    cases = [
        Case(
            f"{norm}-N={n:.0e}-{args.dtype}",
            {"N": n, "B": SAMPLES, "dtype": args.dtype, "norm": norm},
        )
        for norm in norms
        for n in sizes
    ]
    table = Table("pgd_step", device, baselines=("compiled", "copy"))

    def kwargs(case):
        return {"alpha": ALPHA, "eps": EPS, "lo": 0.0, "hi": 1.0, "norm": case.params["norm"]}

    def eager(case):
        x, g, x0 = inputs(case, device)
        kw = kwargs(case)
        return lambda: pgd_step_ref_([x], [g], [x0], **kw)

    def compiled(case):
        if args.no_compile:
            raise NotImplementedError("--no-compile")
        x, g, x0 = inputs(case, device)
        kw = kwargs(case)
        fn = torch.compile(lambda: pgd_step_ref_([x], [g], [x0], **kw), dynamic=False)
        fn()  # compile outside the timing
        return fn

    def copy(case):
        src = torch.rand(nbytes(case) // 8, device=device)  # fp32: read half, write half
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    def advcal(case):
        x, g, x0 = inputs(case, device)
        kw = kwargs(case)
        return lambda: pgd_step_(x, g, x0, **kw)

    run_sweep(
        table,
        cases,
        {"eager": eager, "compiled": compiled, "copy": copy, "advcal": advcal},
        phase="step",
        nbytes=nbytes,
        rounds=rounds,
        reps=args.reps,
    )
    table.print()
    if args.json:
        table.write_json(args.json)
    return table


if __name__ == "__main__":
    main()
