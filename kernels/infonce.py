"""Triton kernels of the tiled clean-adversarial InfoNCE (FlashAttention / Inf-CL style).

``a = z_adv (B, D)``, ``c = z_clean (B, D)``, ``S_ij = <a_i, c_j> / (|a_i| |c_j| tau)``,
``loss = w_r sum_i (lse_j S_ij - S_ii) [+ w_c sum_j (lse_i S_ij - S_jj)]`` with
``w_r = 1/B`` (or ``1/2B`` each when symmetric). ``S`` (``B x B``: 1 GiB in fp32 at B=16384)
never reaches global memory; the kernels keep per-row log-sum-exps only. Normalisation is fused
as a rank-1 scaling of the raw dot products (``rn_i rn_j / tau``), so no normalised copy of
``a`` or ``c`` is written either, and bf16 inputs feed the tensor cores unrounded.

Kernels (fwd: 2 launches, 3 when symmetric; bwd: 1 per input that needs a gradient):

1. ``_row_stats_kernel`` -- ``1/max(|a_i|, eps)``, ``1/max(|c_i|, eps)``, ``cos(a_i, c_i)``.
   Traffic: read ``a`` and ``c`` once (2 B D s); write 3 B floats.
2. ``_lse_kernel(X, Y)`` -- per ``BLOCK_M`` rows of X, one pass over Y in ``BLOCK_N`` tiles,
   ``S`` tile by a ``BLOCK_D``-chunked ``tl.dot``, online max/sum -> ``lse_i``.
   Called with (a, c) for rows and (c, a) for columns. FLOPs ``2 B^2 D`` per call; traffic:
   read X once, Y once per row block (``B/BLOCK_M * B D s``, L2-served), write B floats.
3. ``_grad_kernel(X, Y)`` -- per ``BLOCK_M`` whole rows of X (``D_PAD`` wide, fp32
   accumulator in registers), one pass over Y: recompute ``S`` (``2 B^2 D``), form
   ``dS = w_x exp(S - lse_x) [+ w_y exp(S - lse_y)] - (w_x + w_y) I`` (the diagonal in fp32,
   before the bf16 rounding, so ``p_ii - 1`` does not cancel), accumulate ``dS (Y / |Y|)``
   (``2 B^2 D``), then the normalisation backward of the row.
   Called with (a, c) for ``dz_adv`` and (c, a) for ``dz_clean`` (skipped when the clean side
   is frozen, the usual case). Traffic: read X twice (before and after the loop, so only its
   compute-dtype copy is live in the loop), Y once per row block, write dX. Shared memory:
   the staged ``[BLOCK_N, D_PAD]`` Y tiles plus the resident X rows, <= 130 KiB for every
   config :func:`grad_config` picks (see there; the limit is 227 KiB on H100/H200).

fwd+bwd FLOPs: ``2 B^2 D`` (lse) ``+ 4 B^2 D`` (grad of z_adv) = ``6 B^2 D`` non-symmetric with a
frozen clean side, as eager (``S``, ``dS c``, and no ``dS^T a``); extra memory ``O(B)`` floats
instead of eager's several ``B x B`` fp32 buffers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from advcal.kernels._common import (
    MAX_D_PAD,
    NORM_EPS,
    TL_DTYPES,
    LaunchConfig,
    check_device,
    check_dtype,
    d_pad,
    interpreting,
    mma,
    smem_estimate,
    to_lowp,
)


@triton.jit
def _row_stats_kernel(
    A, Cc, RNA, RNC, COS,
    B, D,
    stride_a, stride_c,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < B
    saa = tl.zeros([BLOCK_M], dtype=tl.float32)
    scc = tl.zeros([BLOCK_M], dtype=tl.float32)
    sac = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        mask = mm[:, None] & (rd < D)[None, :]
        a = tl.load(A + rm[:, None] * stride_a + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        c = tl.load(Cc + rm[:, None] * stride_c + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        saa += tl.sum(a * a, axis=1)
        scc += tl.sum(c * c, axis=1)
        sac += tl.sum(a * c, axis=1)
    rna = 1.0 / tl.maximum(tl.sqrt(saa), EPS)
    rnc = 1.0 / tl.maximum(tl.sqrt(scc), EPS)
    tl.store(RNA + rm, rna, mask=mm)
    tl.store(RNC + rm, rnc, mask=mm)
    tl.store(COS + rm, sac * rna * rnc, mask=mm)


@triton.jit
def _lse_kernel(
    X, Y, RNX, RNY, LSE,
    B, D,
    stride_x, stride_y,
    inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CDT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, EMU: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < B
    rnx = tl.load(RNX + rm, mask=mm, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, B, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mn = rn < B
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            md = rd < D
            x = tl.load(
                X + rm[:, None] * stride_x + rd[None, :], mask=mm[:, None] & md[None, :], other=0.0
            ).to(CDT)
            yt = tl.load(
                Y + rn[None, :] * stride_y + rd[:, None], mask=md[:, None] & mn[None, :], other=0.0
            ).to(CDT)  # Y^T tile [BLOCK_D, BLOCK_N]
            s = mma(x, yt, s, IEEE, UPCAST)
        rny = tl.load(RNY + rn, mask=mn, other=0.0)
        s = s * (rnx * inv_tau)[:, None] * rny[None, :]
        s = tl.where(mn[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has a column < B
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(LSE + rm, m_i + tl.log(l_i), mask=mm)


@triton.jit
def _grad_kernel(
    X, Y, RNX, RNY, LSEX, LSEY, G, DX,
    B, D,
    stride_x, stride_y, stride_dx,
    inv_tau, coef_x, coef_y,
    USE_X: tl.constexpr, USE_Y: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    CDT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, EMU: tl.constexpr,
    EPS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, D_PAD)
    mm = rm < B
    md = rd < D
    mask = mm[:, None] & md[None, :]
    # only the compute-dtype copy of the rows lives through the loop (a dot operand); the fp32
    # rows are read again after it for the normalisation backward (B D s more bytes, from L2)
    # instead of holding BLOCK_M x D_PAD fp32 in registers next to the accumulator
    xc = tl.load(X + rm[:, None] * stride_x + rd[None, :], mask=mask, other=0.0).to(CDT)
    rnx = tl.load(RNX + rm, mask=mm, other=0.0)
    if USE_X:
        lsex = tl.load(LSEX + rm, mask=mm, other=0.0)
    g = tl.load(G).to(tl.float32)  # upstream grad of the scalar loss, read on device: no sync
    w_x = g * coef_x if USE_X else 0.0
    w_y = g * coef_y if USE_Y else 0.0
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for n0 in range(0, B, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mn = rn < B
        y = tl.load(
            Y + rn[:, None] * stride_y + rd[None, :], mask=mn[:, None] & md[None, :], other=0.0
        ).to(CDT)  # [BLOCK_N, D_PAD]
        rny = tl.load(RNY + rn, mask=mn, other=0.0)
        s = mma(xc, tl.trans(y), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, UPCAST)
        s = s * (rnx * inv_tau)[:, None] * rny[None, :]
        ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if USE_X:  # row-softmax term: x_i is the anchor
            ds += w_x * tl.exp(s - lsex[:, None])
        if USE_Y:  # column-softmax term: y_j is the anchor (the other direction of the loss)
            lsey = tl.load(LSEY + rn, mask=mn, other=0.0)
            ds += w_y * tl.exp(s - lsey[None, :])
        # the target term -(w_x + w_y) S_ii joins dS in fp32 *before* rounding for the dot:
        # subtracted afterwards, a bf16-rounded w p_ii ~ w would leave 2^-9 w uncancelled
        ds = tl.where(rn[None, :] == rm[:, None], ds - (w_x + w_y), ds)
        # fold 1/|y_j| into dS so the dot runs on raw y: sum_j dS_ij y_j / |y_j|
        ds = tl.where(mn[None, :], ds * rny[None, :], 0.0)
        acc = mma(to_lowp(ds, CDT, EMU), y, acc, IEEE, UPCAST)
    dxn = acc * inv_tau
    # F.normalize backward (the norm's gradient flows only where the eps clamp is inactive)
    x = tl.load(X + rm[:, None] * stride_x + rd[None, :], mask=mask, other=0.0).to(tl.float32)
    nrm = tl.sqrt(tl.sum(x * x, axis=1))
    xn = x * rnx[:, None]
    xdx = tl.where(nrm >= EPS, tl.sum(xn * dxn, axis=1), 0.0)
    dx = (dxn - xn * xdx[:, None]) * rnx[:, None]
    tl.store(
        DX + rm[:, None] * stride_dx + rd[None, :],
        to_lowp(dx, DX.dtype.element_ty, EMU).to(DX.dtype.element_ty),
        mask=mask,
    )


# ---------------------------------------------------------------------------------- launchers


def _flags(dtype: torch.dtype) -> dict:
    return {
        "CDT": TL_DTYPES[dtype],
        "IEEE": dtype == torch.float32,
        "UPCAST": interpreting(),
        "EMU": interpreting() and dtype == torch.bfloat16,
    }


def row_stats_config(d: int) -> LaunchConfig:
    bm, bd = 32, min(128, d_pad(d))
    return LaunchConfig({"BLOCK_M": bm, "BLOCK_D": bd}, 4, 3, smem_estimate(torch.float32, 3))


def lse_config(dtype: torch.dtype, d: int) -> LaunchConfig:
    """``_lse_kernel``: the x and y^T chunks are staged; the S tile converts for the row max."""
    if dtype == torch.float32:
        bm, bn, bd, warps = 32, 64, 32, 4
    else:
        bm, bn, bd, warps = 64, 64, 64, 4
    bd = min(bd, d_pad(d))
    stages = 3
    smem = smem_estimate(dtype, stages, staged=bm * bd + bd * bn, scratch=bm * bn)
    return LaunchConfig({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, warps, stages, smem)


def grad_config(dtype: torch.dtype, d: int) -> LaunchConfig:
    """``_grad_kernel``: the ``[BLOCK_N, D_PAD]`` y tile is staged (both dots read it), the
    ``[BLOCK_M, D_PAD]`` x rows are a resident dot operand, dS converts through shared memory.

    Compiled for sm_90 with Triton 3.9 (shared memory, registers/thread, spill stack/thread):
    D_PAD=1024 fp32 BN=16, 2 stages: 129 KiB, 255 regs, 24 B (BN=32 with 3 stages was 322 KiB:
    no launch); bf16 BN=32, 2 stages: 97 KiB, 249 regs, 0 B (3 stages, 161 KiB, would not add
    occupancy: registers already hold it to one 8-warp block per SM). fp32 (exact FMA dots)
    with BLOCK_N=64 spills 8-10 KiB per thread at every width, hence 32 below 512."""
    dp = d_pad(d)
    f32 = dtype == torch.float32
    if dp >= 512:
        bm, bn, warps, stages = 16, (16 if f32 else 32), 8, 2
    else:
        bm, bn, warps, stages = 32, (32 if f32 else 64), (8 if f32 or dp >= 256 else 4), 3
    smem = smem_estimate(dtype, stages, staged=bn * dp, resident=bm * dp, scratch=bm * bn)
    return LaunchConfig({"BLOCK_M": bm, "BLOCK_N": bn, "D_PAD": dp}, warps, stages, smem)


def configs(dtype: torch.dtype, d: int) -> dict[str, LaunchConfig]:
    """Every config the launchers below pick for rows of width ``d`` (for the smem guard)."""
    return {
        "_row_stats_kernel": row_stats_config(d),
        "_lse_kernel": lse_config(dtype, d),
        "_grad_kernel": grad_config(dtype, d),
    }


def row_stats(a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(1/max(|a_i|, eps), 1/max(|c_i|, eps), cos(a_i, c_i))``, each ``(B,)`` fp32."""
    check_dtype(a=a, c=c)
    check_device(a, c)
    a, c = a.contiguous(), c.contiguous()
    bsz, d = a.shape
    rna, rnc, cos = (torch.empty(bsz, device=a.device, dtype=torch.float32) for _ in range(3))
    cfg = row_stats_config(d)
    _row_stats_kernel[(triton.cdiv(bsz, cfg.blocks["BLOCK_M"]),)](
        a, c, rna, rnc, cos, bsz, d, a.stride(0), c.stride(0), EPS=NORM_EPS, **cfg.kwargs(),
    )  # fmt: skip
    return rna, rnc, cos


def lse(
    x: torch.Tensor, y: torch.Tensor, rn_x: torch.Tensor, rn_y: torch.Tensor, tau: float
) -> torch.Tensor:
    """``lse_i = logsumexp_j(<x_i, y_j> rn_x_i rn_y_j / tau)`` ``(B,)`` fp32, tiled."""
    check_dtype(x=x, y=y)
    check_device(x, y, rn_x, rn_y)
    x, y = x.contiguous(), y.contiguous()
    bsz, d = x.shape
    out = torch.empty(bsz, device=x.device, dtype=torch.float32)
    cfg = lse_config(x.dtype, d)
    _lse_kernel[(triton.cdiv(bsz, cfg.blocks["BLOCK_M"]),)](
        x, y, rn_x, rn_y, out, bsz, d, x.stride(0), y.stride(0), 1.0 / tau,
        **cfg.kwargs(), **_flags(x.dtype),
    )  # fmt: skip
    return out


def grad(
    x: torch.Tensor,
    y: torch.Tensor,
    rn_x: torch.Tensor,
    rn_y: torch.Tensor,
    lse_x: torch.Tensor | None,
    lse_y: torch.Tensor | None,
    grad_out: torch.Tensor,
    coef_x: float,
    coef_y: float,
    tau: float,
) -> torch.Tensor:
    """``dL/dx (B, D)`` in x's dtype for ``L = coef_x sum_i (lse_x_i - S_ii) + coef_y sum_j
    (lse_y_j - S_jj)`` scaled by the 0-dim ``grad_out`` (read on device); a term whose lse is
    None is absent (e.g. the clean side of a non-symmetric loss has only the y term)."""
    if lse_x is None and lse_y is None:
        raise ValueError("grad: at least one of lse_x, lse_y is needed")
    check_dtype(x=x, y=y)
    bsz, d = x.shape
    if d_pad(d) > MAX_D_PAD:
        raise ValueError(f"grad: width D={d} > {MAX_D_PAD} (rows are held whole in registers)")
    check_device(x, y, rn_x, rn_y, lse_x, lse_y, grad_out)
    x, y = x.contiguous(), y.contiguous()
    cfg = grad_config(x.dtype, d)
    dx = torch.empty_like(x)
    _grad_kernel[(triton.cdiv(bsz, cfg.blocks["BLOCK_M"]),)](
        x, y, rn_x, rn_y, lse_x if lse_x is not None else rn_x,
        lse_y if lse_y is not None else rn_y, grad_out.float().reshape(1), dx,
        bsz, d, x.stride(0), y.stride(0), dx.stride(0),
        1.0 / tau, coef_x, coef_y,
        USE_X=lse_x is not None, USE_Y=lse_y is not None, EPS=NORM_EPS,
        **cfg.kwargs(), **_flags(x.dtype),
    )  # fmt: skip
    return dx
