"""The machine's limits the other benchmarks are read against: copy bandwidth and matmul rates.

Cases (each timed with the harness's clock: CUDA events on GPU, the host clock on CPU):

- ``copy-<size>``: ``dst.copy_(src)`` of fp32 buffers; bytes counted = read + write, so GB/s
  is the figure ``bench_pgd_step``'s ``copy`` arm measures per case;
- ``matmul-<dtype>-<n>``: an ``n x n x n`` product, FLOPs = 2 n^3. GPU: bf16 (the mixed-precision
  rate), fp32 with TF32 off and on. CPU: fp32 on ATen's default path (``torch.mm``: MKL) and on
  oneDNN (``advcal.ops.head_ce.linear_cpu``, what advcal's CPU kernels use), and bf16.

    python benchmarks/bench_limits.py [--quick] [--json benchmarks/results/limits_<machine>.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advcal.ops.head_ce import ONEDNN_MIN_MACS, linear_cpu
from benchmarks.harness import Case, Table, parser, run_sweep

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}


def cases(device: torch.device, quick: bool) -> tuple[list[Case], list[Case]]:
    """(copy cases, matmul cases) for this device."""
    if device.type == "cuda":
        copies = [1 << 24, 1 << 30] if not quick else [1 << 24]
        mms = [("bf16", 8192), ("fp32", 8192), ("tf32", 8192)] if not quick else [("bf16", 2048)]
    else:
        copies = [1 << 24, 1 << 27] if not quick else [1 << 22]
        mms = [("fp32", 1024), ("fp32", 2048), ("bf16", 2048)] if not quick else [("fp32", 256)]
    copy_cases = [Case(f"copy-{b >> 20}MiB", {"bytes": b}) for b in copies]
    mm_cases = [Case(f"matmul-{dt}-{n}", {"dtype": dt, "n": n}) for dt, n in mms]
    return copy_cases, mm_cases


def main(argv: list[str] | None = None) -> Table:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    copy_cases, mm_cases = cases(device, args.quick)
    table = Table("limits", device)

    def copy(case):
        src = torch.rand(case.params["bytes"] // 8, device=device)  # read half, write half
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    run_sweep(table, copy_cases, {"copy_": copy}, phase="copy",
              nbytes=lambda case: case.params["bytes"], rounds=args.rounds)  # fmt: skip

    def operands(case):
        n, dtype = case.params["n"], DTYPES[case.params["dtype"]]
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        return a, b

    def mm(case):
        a, b = operands(case)
        tf32 = case.params["dtype"] == "tf32"

        def run():
            before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                return a @ b
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before

        return run

    def onednn(case):
        if device.type != "cpu" or case.params["dtype"] != "fp32":
            raise NotImplementedError("advcal's oneDNN GEMM: fp32 on CPU")
        if case.params["n"] ** 3 < ONEDNN_MIN_MACS:
            raise NotImplementedError(f"below ONEDNN_MIN_MACS={ONEDNN_MIN_MACS}: MKL there")
        a, b = operands(case)
        bt = b.t()  # linear_cpu computes x @ w^T
        return lambda: linear_cpu(a, bt)

    run_sweep(table, mm_cases, {"torch.mm": mm, "linear_cpu": onednn}, phase="matmul",
              flops=lambda case: 2 * case.params["n"] ** 3, rounds=args.rounds)  # fmt: skip
    table.print()
    if args.json:
        table.write_json(args.json)
    return table


if __name__ == "__main__":
    main()
