"""Ahead-of-time compile of the launchers' real launches for a GPU target, on a machine
without a GPU: the shared memory, registers and spills that Triton/ptxas will give each config.

Triton 3.9 compiles for ``GPUTarget("cuda", 90, 32)`` (H100/H200) with its bundled ``ptxas`` and
no driver. :func:`record` runs a launcher on small CPU tensors with its kernels swapped for
recorders (nothing executes), so what gets compiled is exactly what the launcher would launch:
the same pointer dtypes, block sizes, warps and stages. Used by the tests (when the CUDA backend
of Triton is installed) and by hand::

    python -m advcal.kernels._aot          # table of every config, sm_90
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import triton

# Max shared memory one block may use (opt-in), bytes: sm_90 (H100/H200) 227 KiB.
SMEM_LIMIT_SM90 = 227 * 1024

_PTR = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int64: "*i64",
    torch.int32: "*i32",
}


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: the kernel, its positional args and keyword meta."""

    kernel: triton.runtime.jit.JITFunction
    args: tuple
    meta: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def constexprs(self) -> dict:
        return {k: v for k, v in self.meta.items() if k not in ("num_warps", "num_stages")}

    @property
    def num_warps(self) -> int:
        return self.meta.get("num_warps", 4)

    @property
    def num_stages(self) -> int:
        return self.meta.get("num_stages", 3)  # Triton's CUDA default


class _Recorder:
    def __init__(self, kernel, out: list[Launch]):
        self.kernel, self.out = kernel, out

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.out.append(Launch(self.kernel, args, meta))

        return launch


@contextlib.contextmanager
def recording(module: ModuleType) -> Iterator[list[Launch]]:
    """Within the block, ``module``'s launchers record their launches instead of running them
    (CPU tensors accepted, as under the interpreter)."""
    out: list[Launch] = []
    saved = {}
    for name, obj in vars(module).items():
        if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
            saved[name] = obj
    saved["check_device"] = module.check_device
    try:
        for name, obj in saved.items():
            if name != "check_device":
                setattr(module, name, _Recorder(obj, out))
        module.check_device = lambda *t: None
        yield out
    finally:
        for name, obj in saved.items():
            setattr(module, name, obj)


def record(module: ModuleType, call: Callable[[], object]) -> list[Launch]:
    with recording(module) as out:
        call()
    return out


def _signature(launch: Launch) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attributes as the JIT would specialise them: pointers
    16-byte aligned (torch allocations), ints divisible by 16 marked so, ints equal to 1
    folded to constants."""
    params = launch.kernel.params
    sig, const, attrs = {}, {}, {}
    runtime = [(i, p) for i, p in enumerate(params) if not p.is_constexpr]
    if len(runtime) != len(launch.args):
        raise ValueError(f"{launch.name}: {len(launch.args)} args for {len(runtime)} params")
    for (i, p), a in zip(runtime, launch.args, strict=True):
        if isinstance(a, torch.Tensor):
            sig[p.name] = _PTR[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            sig[p.name] = "i1"
        elif isinstance(a, int):
            if a == 1:
                sig[p.name] = "constexpr"
                const[(i,)] = 1
                continue
            sig[p.name] = "i32"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{launch.name}.{p.name}: {type(a).__name__}")
    meta = launch.constexprs()
    for i, p in enumerate(params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[(i,)] = meta[p.name]
    return sig, const, attrs


@dataclass(frozen=True)
class Compiled:
    name: str
    shared: int  # bytes of shared memory per block
    regs: int  # registers per thread
    stack: int  # bytes of local-memory stack frame per thread (spills, > 0 is bad)


def compile_launch(launch: Launch, arch: int = 90) -> Compiled:
    """Compile ``launch`` for ``sm_<arch>`` (no GPU needed) and read its resource usage."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, const, attrs = _signature(launch)
    src = ASTSource(fn=launch.kernel, signature=sig, constexprs=const, attrs=attrs)
    k = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
    )
    regs = stack = -1
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    if cuobjdump.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run(
                [str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True
            ).stdout
        for tok in usage.split():
            if tok.startswith("REG:"):
                regs = int(tok[4:])
            elif tok.startswith("STACK:"):
                stack = int(tok[6:])
    return Compiled(launch.name, int(k.metadata.shared), regs, stack)


def aot_available() -> bool:
    """Triton's CUDA backend and its ptxas are installed (no GPU needed)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        return False
    return (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists()


def launches_of_width(d: int, dtype: torch.dtype, k: int = 1000) -> list[tuple[Launch, int]]:
    """Every launch the head_ce and infonce launchers make for rows of width ``d`` (all modes),
    recorded on tiny CPU tensors, each with its config's shared-memory estimate."""
    from advcal.kernels import head_ce, infonce

    bsz = 8
    e = torch.randn(bsz, d, dtype=dtype)
    w = torch.randn(d, d, dtype=dtype)
    c = torch.randn(k, d, dtype=dtype)
    y = torch.zeros(bsz, dtype=torch.long)
    z, v, g = torch.randn(bsz, d), torch.ones(bsz), torch.ones(bsz, k)

    def head_calls():
        head_ce.project(e, w, None, True)
        for mode in (head_ce.MODE_CE, head_ce.MODE_LOGITS, head_ce.MODE_COS):
            labels = None if mode == head_ce.MODE_LOGITS else y
            head_ce.head_rows(z, c, labels, 0.1, mode, compute_dtype=dtype, with_pc=True)
        head_ce.head_bwd(z, c, 0.1, head_ce.MODE_CE, out_dtype=dtype, labels=y, pc=z, grad_rows=v)
        head_ce.head_bwd(z, c, 0.1, head_ce.MODE_LOGITS, out_dtype=dtype, grad_logits=g)
        head_ce.head_bwd(z, c, 0.1, head_ce.MODE_COS, out_dtype=dtype, labels=y, grad_rows=v)

    def nce_calls():
        infonce.row_stats(e, e)
        infonce.lse(e, e, v, v, 0.1)
        infonce.grad(e, e, v, v, v, None, torch.tensor(1.0), 0.1, 0.0, 0.1)

    out = []
    for module, calls, cfgs in (
        (head_ce, head_calls, head_ce.configs(dtype, d, bsz)),
        (infonce, nce_calls, infonce.configs(dtype, d)),
    ):
        out += [(launch, cfgs[launch.name].smem) for launch in record(module, calls)]
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="sm_90 resource usage of every launch config")
    p.add_argument("--widths", default="33,300,1024", help="comma-separated row widths D")
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    print(f"{'dtype':9} {'D':>5} {'kernel':18} {'blocks':38} smem_KiB est_KiB regs stack_B")
    for dtype in (torch.float32, torch.bfloat16):
        for d in (int(x) for x in args.widths.split(",")):
            for launch, est in launches_of_width(d, dtype):
                r = compile_launch(launch, args.arch)
                keep = ("BLOCK", "D_PAD", "MODE")
                blocks = {k: v for k, v in launch.constexprs().items() if k.startswith(keep)}
                print(
                    f"{str(dtype)[6:]:9} {d:5} {r.name:18} {blocks!s:38} "
                    f"{r.shared / 1024:8.1f} {est / 1024:7.1f} {r.regs:4} {r.stack:7}"
                    + ("  OVER LIMIT" if r.shared > SMEM_LIMIT_SM90 else "")
                )


if __name__ == "__main__":
    main()
