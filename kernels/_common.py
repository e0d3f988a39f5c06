"""Helpers shared by the Triton kernels of advcal (imports Triton: import only when available).

Two facts shape every kernel here:

* Rows are held whole. The fused ops normalise a row (``z / max(||z||, eps)``) and need
  ``u . du`` over the full row in the backward, so a program owns ``BLOCK_M`` complete rows of
  width ``D_PAD = next_pow2(D)`` in registers (like FlashAttention owns full head-dim rows).
  ``D_PAD`` is capped at :data:`MAX_D_PAD`; wider rows go to the reference.
* The Triton interpreter (``TRITON_INTERPRET=1``, CPU CI) computes ``tl.dot`` of bf16/fp16
  operands wrongly (checked with Triton 3.9: errors of 1e10 on unit-scale inputs), so under the
  interpreter :func:`mma` upcasts the operands to fp32 first. bf16 values are exact in fp32 and
  the GPU path accumulates in fp32 too, so the interpreter still checks the kernel's logic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

# Full rows live in registers; 1024 covers ImageBind/UniBind (1024) and LanguageBind (768).
MAX_D_PAD = 1024
NORM_EPS = 1e-12

# float16 is refused (see check_dtype): the low-precision operands of the backward dots (dS,
# dlogits) are O(1/B) and fall below fp16's normal range (6.1e-5) at typical batch sizes.
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}

# Shared memory one block may use on sm_90 (H100/H200: 227 KiB with the opt-in). Every config a
# launcher can pick must fit (tests/test_*: smem_estimate for all widths; AOT compile for sm_90).
SMEM_LIMIT = 227 * 1024


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes (constexprs), warps and pipeline stages of one launch, with an upper bound
    on the shared memory Triton allocates for it (:func:`smem_estimate`)."""

    blocks: dict[str, int] = field(hash=False)
    num_warps: int
    num_stages: int
    smem: int

    def kwargs(self) -> dict[str, int]:
        return {**self.blocks, "num_warps": self.num_warps, "num_stages": self.num_stages}


def smem_estimate(
    dtype: torch.dtype, num_stages: int, *, staged: int = 0, resident: int = 0, scratch: int = 0
) -> int:
    """Upper bound on a kernel's shared memory, bytes, from its tile sizes (elements):

    * ``staged`` -- dot operands loaded inside the pipelined loop: Triton's pipeliner keeps
      ``num_stages`` buffers of them for bf16/fp16 (async copies into tensor-core layouts) and
      ``num_stages - 1`` for fp32 (checked with Triton 3.9 for sm_90, see the kernels'
      docstrings for the compiled sizes);
    * ``resident`` -- loop-invariant dot operands, staged once;
    * ``scratch`` -- fp32 tiles that go through shared memory for layout conversions;
    * plus 1 KiB for barriers and alignment.
    """
    size = torch.empty(0, dtype=dtype).element_size()
    buffers = max(num_stages - (1 if dtype == torch.float32 else 0), 1)
    return buffers * staged * size + resident * size + scratch * 4 + 1024


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def d_pad(d: int) -> int:
    """Register width of a row: a power of two, at least 16 (the smallest ``tl.dot`` side)."""
    return max(16, triton.next_power_of_2(d))


def full_row_block(dp: int) -> tuple[int, int]:
    """``(BLOCK_M, num_warps)`` for kernels that keep ``BLOCK_M x dp`` fp32 accumulators.

    Budget: ~64 fp32 registers per thread for the accumulator, like FlashAttention at head
    dim 256 with 64 rows: 16 rows x 1024 over 8 warps = 64 per thread.
    """
    if dp >= 512:
        return 16, 8
    if dp >= 256:
        return 32, 8
    return 64, 4


def check_dtype(**items: torch.Tensor | torch.dtype | None) -> None:
    """Launchers take float32 and bfloat16 floating inputs (float16: see TL_DTYPES)."""
    for name, t in items.items():
        dtype = t if isinstance(t, torch.dtype) else None if t is None else t.dtype
        if dtype is not None and dtype.is_floating_point and dtype not in TL_DTYPES:
            raise TypeError(
                f"{name} has dtype {dtype}; the Triton kernels take float32 or bfloat16 "
                "(float16 gradients underflow in their low-precision dots): cast it, or use the "
                "reference (ADVCAL_BACKEND=ref, the automatic choice for float16)"
            )


def check_device(*tensors: torch.Tensor | None) -> None:
    """Launchers take CUDA tensors, or CPU tensors under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"Triton launcher got a {t.device.type} tensor; use CUDA tensors or set "
                "TRITON_INTERPRET=1 before importing triton"
            )


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    IEEE: exact fp32 products for fp32 inputs (no TF32), so fp32 matches the fp32 reference.
    UPCAST: interpreter work-around (see module docstring)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def to_lowp(x, DT: tl.constexpr, EMU: tl.constexpr):
    """``x.to(DT)`` rounding to nearest-even, as the GPU does.

    EMU (interpreter with bf16): the interpreter's fp32 -> bf16 cast does not round to nearest
    (checked with Triton 3.9: biased, 1-ulp differences from torch), which would bias sums of
    rounded terms; emulate round-to-nearest-even on the bits and keep the (now bf16-exact)
    value in fp32."""
    if EMU:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(DT)
