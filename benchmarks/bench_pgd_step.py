"""Fused PGD update vs the eager chain and torch.compile of the chain.

Arms: ``eager`` (``advcal.ops.pgd_step_ref_``: the separate-op chain the tests compare against),
``compiled`` (``torch.compile`` of that chain), ``advcal`` (``advcal.ops.pgd_step_``: the C++
or CUDA kernel). One fp32/bf16 tensor of N elements, L-inf (and L2 with --l2).

Bytes counted per call (the minimum any implementation must move): L-inf reads x, g, x0 and
writes x = 4 x itemsize per element; L2 adds the norm passes: 8 x itemsize per element (32 B
fp32). GB/s is compared with the copy bandwidth measured in the same run.

    python benchmarks/bench_pgd_step.py [--quick] [--json out.json] [--l2] [--dtype bf16]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advcal.ops import pgd_step_, pgd_step_ref_
from benchmarks.harness import Case, Table, copy_bandwidth, parser, run_sweep

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALPHA, EPS = 2 / 255, 8 / 255


def inputs(case: Case, device):
    n, dtype = case.params["N"], DTYPES[case.params["dtype"]]
    b = case.params["B"]
    x0 = torch.rand(b, n // b, device=device).to(dtype)
    g = torch.randn(b, n // b, device=device).to(dtype)
    return x0.clone(), g, x0


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--l2", action="store_true", help="also the L2 step")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile arm")
    args = p.parse_args()
    device = torch.device(args.device)
    sizes = [10**5, 10**6] if args.quick else [10**5, 10**6, 10**7]
    norms = ["linf", "l2"] if args.l2 else ["linf"]
    cases = [
        Case(f"{norm}-N={n:.0e}-{args.dtype}", {"N": n, "B": 10, "dtype": args.dtype, "norm": norm})
        for norm in norms
        for n in sizes
    ]
    table = Table("pgd_step", device, limits={"copy_gbps": copy_bandwidth(device)})

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

    def advcal(case):
        x, g, x0 = inputs(case, device)
        kw = kwargs(case)
        return lambda: pgd_step_(x, g, x0, **kw)

    def nbytes(case):
        item = torch.empty(0, dtype=DTYPES[case.params["dtype"]]).element_size()
        per = 4 if case.params["norm"] == "linf" else 8
        return per * item * case.params["N"]

    run_sweep(
        table,
        cases,
        {"eager": eager, "compiled": compiled, "advcal": advcal},
        phase="step",
        nbytes=nbytes,
    )
    table.print()
    if args.json:
        table.write_json(args.json)


if __name__ == "__main__":
    main()
