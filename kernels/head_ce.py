"""Triton kernels of the head chain: projection, L2 normalisation, logits against fixed
centers, online-LSE cross-entropy / target cosine, and the normalisation backward.

Shapes: ``e (B, Din)``, ``W (D, Din)``, ``b (D,)``, ``z = [e +] e W^T + b (B, D)``,
``u = z / max(||z||, 1e-12)``, centers ``C (K, D)``, ``s = u C^T / tau (B, K)``.
``s`` is never written to global memory on the loss path.

Kernels (3 Triton launches: 2 forward, 1 backward; the op layer adds the rest, see below):

1. ``_project_kernel`` -- tiled GEMM ``z = [e +] e W^T + b``, fp32 accumulate, fused residual
   and bias epilogue; grid ``(B/BM, D/BN)``.
   FLOPs ``2 B D Din``; traffic: read ``e`` (B Din s), ``W`` (D Din s, from L2 for every
   row block), write ``z`` fp32 (4 B D).
2. ``_head_rows_kernel`` -- one program owns ``BLOCK_M`` whole rows of ``z``: norm, ``u``, then
   ONE pass over K in ``BLOCK_K`` tiles with an online log-sum-exp (FlashAttention with
   ``Q = u``, ``K = V = C``): ``s = u C^T``, running max/sum, and ``pc = softmax(s) C - c_y``
   accumulated in fp32 as ``sum_{k != y} p_k (c_k - c_y)`` (no cancellation as ``p_y -> 1``):
   the only thing the backward needs besides ``z``, since ``dL/du = g/tau pc``. Target term
   ``cos(z, c_y)`` from a gathered row of C.
   FLOPs ``2 B K D`` (logits) ``+ 2 B K D`` (pc, when gradients are needed); traffic: read
   ``z`` (4 B D), ``C`` (K D s per row block, L2-resident: 2 MB at K=1000, D=1024, bf16),
   ``C[y]`` (B D s, read again after the K loop instead of held in registers); write loss (4 B)
   and ``pc`` (4 B D). No ``B x K`` buffer. For bf16 the logits dot runs twice
   (``u = u_hi + u_lo``), so logits keep fp32-grade accuracy: ``+2 B K D`` FLOPs.
   Modes: CE (loss rows), LOGITS (writes ``s`` for the evaluator), COS (``cos(z, c_y)``).
3. ``_head_bwd_kernel`` -- per row block: ``du`` (CE: ``g/tau pc``; LOGITS:
   ``dlogits C / tau``, a tile loop over K; COS: ``g c_y``), then the normalisation backward
   ``dz = (du - u (u.du)) / ||z||`` (``du / eps`` where the norm is clamped), written in the
   compute dtype for the cuBLAS weight-gradient GEMMs that follow
   (``de = dz [+ dz W]``, ``dW = dz^T e``, ``db = sum dz``: ``4 B D Din`` FLOPs).
   Traffic: read ``z``, ``pc`` (4 B D each); write ``dz`` (B D s).

Total fwd+bwd FLOPs (residual head): ``6 B D^2 + 4 B K D`` -- the same as eager PyTorch (whose
backward does ``dlogits @ C``; ``+2 B K D`` for the hi/lo split of the logits dot at bf16).
Launches of ``head_ce(reduction="mean")`` fwd+bwd with gradients for e, W and b: 8 instead of
eager's ~25 -- forward ``_project_kernel``, ``_head_rows_kernel``, ``rows.mean()``; backward the
mean's ``g / B``, ``_head_bwd_kernel``, cuBLAS ``de = dz + dz W`` and ``dW = dz^T e``, and
``db = dz.sum(0)``. The mean and ``db`` are cross-row reductions: folding them into the row
kernels needs float atomics (run-to-run nondeterministic sums) or another launch anyway, so
they stay separate. Accumulation (norms, LSE, pc, dlogits, weight gradients) is fp32 for every
input dtype; float16 is refused (``_common.TL_DTYPES``).
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
    full_row_block,
    interpreting,
    mma,
    smem_estimate,
    to_lowp,
)

MODE_CE, MODE_LOGITS, MODE_COS = 0, 1, 2


@triton.jit
def _project_kernel(
    E, W, Bias, Z,
    M, N, KD,
    stride_em, stride_wn, stride_zm,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CDT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    mn = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_W:
        for k0 in range(0, KD, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < KD
            a = tl.load(
                E + rm[:, None] * stride_em + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0
            ).to(CDT)
            # W^T tile [BLOCK_K, BLOCK_N] read straight from the row-major (N, KD) weight
            wt = tl.load(
                W + rn[None, :] * stride_wn + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0
            ).to(CDT)
            acc = mma(a, wt, acc, IEEE, UPCAST)
    mask = mm[:, None] & mn[None, :]
    if RESIDUAL or not HAS_W:  # the identity part (residual head, or no weight at all)
        acc += tl.load(E + rm[:, None] * stride_em + rn[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    if HAS_B:
        acc += tl.load(Bias + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(Z + rm[:, None] * stride_zm + rn[None, :], acc, mask=mask)


@triton.jit
def _load_rows(Z, rm, rd, mm, md, stride_zm, EPS: tl.constexpr):
    """Whole fp32 rows of z -> (z, 1/max(||z||, eps), ||z|| >= eps)."""
    z = tl.load(
        Z + rm[:, None] * stride_zm + rd[None, :], mask=mm[:, None] & md[None, :], other=0.0
    )
    nrm = tl.sqrt(tl.sum(z * z, axis=1))
    return z, 1.0 / tl.maximum(nrm, EPS), nrm >= EPS


@triton.jit
def _gather_centers(C, Y, rm, rd, mm, md, K, stride_cm):
    """Rows ``C[y]`` (fp32) and whether each label is in range (out-of-range rows -> NaN out:
    the op layer checks host labels; CUDA labels are not read back, see ops/head_ce.py)."""
    y = tl.load(Y + rm, mask=mm, other=0)
    ok = (y >= 0) & (y < K)
    cy = tl.load(
        C + y[:, None] * stride_cm + rd[None, :], mask=(mm & ok)[:, None] & md[None, :], other=0.0
    ).to(tl.float32)
    return cy, ok, y


@triton.jit
def _head_rows_kernel(
    Z, C, Y, OUT, PC,
    B, K, D,
    stride_zm, stride_cm, stride_om, stride_pm,
    inv_tau,
    MODE: tl.constexpr, WITH_PC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
    CDT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    EMU: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, D_PAD)
    mm = rm < B
    md = rd < D
    z, rn, _ = _load_rows(Z, rm, rd, mm, md, stride_zm, EPS)
    u = z * rn[:, None]  # [BLOCK_M, D_PAD] fp32, unit rows
    if MODE != 1:
        cy, ok, y = _gather_centers(C, Y, rm, rd, mm, md, K, stride_cm)
        cos = tl.sum(u * cy, axis=1)
    if MODE == 2:
        tl.store(OUT + rm, tl.where(ok, cos, float("nan")), mask=mm)
    else:
        # fp32 u as hi + lo in the compute dtype: two tensor-core dots give the logits ~16
        # mantissa bits of u instead of bf16's 8 (the reference keeps logits in fp32; one
        # bf16 rounding of u costs 2x PyTorch's error at tau = 0.07). FLOPs: +2 B K D.
        u_hi = to_lowp(u, CDT, EMU)
        u_lo = to_lowp(u - u_hi.to(tl.float32), CDT, EMU)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)  # sum_{k != y} p_k c_k
        w_oth = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_{k != y} p_k
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < K
            c = tl.load(
                C + rk[:, None] * stride_cm + rd[None, :], mask=mk[:, None] & md[None, :], other=0.0
            )
            c = to_lowp(c.to(tl.float32), CDT, EMU)  # [BLOCK_K, D_PAD]
            s = mma(u_hi, tl.trans(c), tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), IEEE, UPCAST)
            if SPLIT:
                s = mma(u_lo, tl.trans(c), s, IEEE, UPCAST)
            s = s * inv_tau
            if MODE == 1:
                tl.store(
                    OUT + rm[:, None] * stride_om + rk[None, :], s, mask=mm[:, None] & mk[None, :]
                )
            else:
                s = tl.where(mk[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has a k < K
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if WITH_PC:
                    # the target column is left out and subtracted as a weight on c_y at the
                    # end: softmax C - c_y = sum_{k != y} p_k (c_k - c_y) / l has no
                    # cancellation when p_y -> 1 (bf16 p_y c_y - c_y would lose it all)
                    p_oth = tl.where(rk[None, :] == y[:, None], 0.0, p)
                    w_oth = w_oth * alpha + tl.sum(p_oth, axis=1)
                    acc = mma(to_lowp(p_oth, CDT, EMU), c, acc * alpha[:, None], IEEE, UPCAST)
                m_i = m_new
        if MODE == 0:
            lse = m_i + tl.log(l_i)
            tl.store(OUT + rm, tl.where(ok, lse - cos * inv_tau, float("nan")), mask=mm)
            if WITH_PC:
                # C[y] again (L2-resident) rather than held in registers across the K loop
                # next to the accumulator (BLOCK_M x D_PAD fp32 each)
                cy, _, _ = _gather_centers(C, Y, rm, rd, mm, md, K, stride_cm)
                pc = (acc - w_oth[:, None] * cy) / l_i[:, None]
                tl.store(
                    PC + rm[:, None] * stride_pm + rd[None, :],
                    tl.where(ok[:, None], pc, float("nan")),  # a bad label poisons its gradient
                    mask=mm[:, None] & md[None, :],
                )


@triton.jit
def _head_bwd_kernel(
    Z, C, Y, PC, GL, GR, DZ,
    B, K, D,
    stride_zm, stride_cm, stride_pm, stride_glm, stride_glk, stride_gr, stride_dm,
    inv_tau,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
    CDT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    EMU: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, D_PAD)
    mm = rm < B
    md = rd < D
    mask = mm[:, None] & md[None, :]
    z, rn, unclamped = _load_rows(Z, rm, rd, mm, md, stride_zm, EPS)
    u = z * rn[:, None]
    if MODE == 1:  # du = dlogits @ C / tau, tiles over K
        du = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < K
            gl = tl.load(
                GL + rm[:, None] * stride_glm + rk[None, :] * stride_glk,
                mask=mm[:, None] & mk[None, :],
                other=0.0,
            ).to(tl.float32)
            c = tl.load(
                C + rk[:, None] * stride_cm + rd[None, :], mask=mk[:, None] & md[None, :], other=0.0
            )
            c = to_lowp(c.to(tl.float32), CDT, EMU)
            gl_hi = to_lowp(gl, CDT, EMU)  # fp32 dlogits as hi + lo, as in the forward
            du = mma(gl_hi, c, du, IEEE, UPCAST)
            if SPLIT:
                du = mma(to_lowp(gl - gl_hi.to(tl.float32), CDT, EMU), c, du, IEEE, UPCAST)
        du = du * inv_tau
    else:
        g = tl.load(GR + rm * stride_gr, mask=mm, other=0.0).to(tl.float32)
        if MODE == 0:  # d CE / du = g / tau (softmax(s) C - c_y) = g / tau pc
            pc = tl.load(PC + rm[:, None] * stride_pm + rd[None, :], mask=mask, other=0.0)
            du = pc * (g * inv_tau)[:, None]
        else:  # d cos(z, c_y) / du = g c_y (NaN for an out-of-range label, like the forward)
            cy, ok, _ = _gather_centers(C, Y, rm, rd, mm, md, K, stride_cm)
            du = tl.where(ok[:, None], cy * g[:, None], float("nan"))
    # F.normalize backward: the norm's gradient flows only where the clamp is inactive
    udu = tl.where(unclamped, tl.sum(u * du, axis=1), 0.0)
    dz = (du - u * udu[:, None]) * rn[:, None]
    tl.store(
        DZ + rm[:, None] * stride_dm + rd[None, :],
        to_lowp(dz, DZ.dtype.element_ty, EMU).to(DZ.dtype.element_ty),
        mask=mask,
    )


# ---------------------------------------------------------------------------------- launchers


def _flags(dtype: torch.dtype) -> dict:
    return {
        "CDT": TL_DTYPES[dtype],
        "IEEE": dtype == torch.float32,
        "UPCAST": interpreting(),
        "SPLIT": dtype != torch.float32,
        "EMU": interpreting() and dtype == torch.bfloat16,
    }


def project_config(dtype: torch.dtype, bsz: int) -> LaunchConfig:
    """``_project_kernel``: the e and W^T chunks are staged (a plain tiled GEMM)."""
    if dtype == torch.float32:
        bm, bn, bk, warps = 32, 64, 32, 4
    elif bsz >= 2048:
        bm, bn, bk, warps = 128, 128, 64, 8
    else:  # small batches: more, smaller tiles so the GPU has enough programs
        bm, bn, bk, warps = 64, 64, 64, 4
    stages = 3
    smem = smem_estimate(dtype, stages, staged=bm * bk + bk * bn)
    return LaunchConfig({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, warps, stages, smem)


def rows_config(dtype: torch.dtype, d: int, *, backward: bool = False) -> LaunchConfig:
    """``_head_rows_kernel`` (and ``_head_bwd_kernel`` with ``backward``): the ``[BLOCK_K,
    D_PAD]`` centers tile is staged; forward: ``u`` is a resident dot operand (``u_hi`` and
    ``u_lo`` at bf16), and p converts through shared memory; backward (LOGITS): the
    ``[BLOCK_M, BLOCK_K]`` dlogits tile is staged too.

    Compiled for sm_90 with Triton 3.9 at D_PAD=1024, K=1000 (shared memory, registers/thread,
    spill stack/thread): rows CE fp32 193 KiB, 186 regs, 0 B (C[y] held across the K loop
    instead of reloaded: 255 regs + spills); CE bf16 128.5 KiB, 255 regs, 40 B (was 288 B);
    LOGITS fp32 192 KiB, bf16 129 KiB; bwd LOGITS fp32 130 KiB, bf16 66 KiB; COS and the CE
    backward stage nothing (< 1 KiB). Every width and dtype fits 227 KiB."""
    dp = d_pad(d)
    bm, warps = full_row_block(dp)
    # fp32 (exact FMA dots): BLOCK_M x BLOCK_K tiles over 512 spill 6-8 KiB/thread (D_PAD=256)
    bk = 16 if dp >= 1024 or dtype == torch.float32 else 32
    stages = 3
    if backward:
        smem = smem_estimate(dtype, stages, staged=bk * dp + bm * bk)
    else:
        u_copies = 1 if dtype == torch.float32 else 2  # hi/lo split at bf16
        smem = smem_estimate(
            dtype, stages, staged=bk * dp, resident=u_copies * bm * dp, scratch=bm * bk
        )
    return LaunchConfig({"BLOCK_M": bm, "BLOCK_K": bk, "D_PAD": dp}, warps, stages, smem)


def configs(dtype: torch.dtype, d: int, bsz: int = 256) -> dict[str, LaunchConfig]:
    """Every config the launchers below pick for width ``d`` (for the smem guard)."""
    return {
        "_project_kernel": project_config(dtype, bsz),
        "_head_rows_kernel": rows_config(dtype, d),
        "_head_bwd_kernel": rows_config(dtype, d, backward=True),
    }


def _check_width(d: int) -> None:
    if d_pad(d) > MAX_D_PAD:
        raise ValueError(f"width D={d} > {MAX_D_PAD} (the kernels hold whole rows in registers)")


def project(
    e: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: bool
) -> torch.Tensor:
    """``z = [e +] e W^T + b`` in fp32, ``(B, D)``; ``weight=None`` is the identity head."""
    check_dtype(e=e, weight=weight, bias=bias)
    check_device(e, weight, bias)
    e = e.contiguous()
    bsz, din = e.shape
    n = din if weight is None else weight.shape[0]
    if weight is not None:
        weight = weight.contiguous()
    z = torch.empty(bsz, n, device=e.device, dtype=torch.float32)
    cfg = project_config(e.dtype, bsz)
    grid = (triton.cdiv(bsz, cfg.blocks["BLOCK_M"]), triton.cdiv(n, cfg.blocks["BLOCK_N"]))
    _project_kernel[grid](
        e, weight if weight is not None else e, bias if bias is not None else e, z,
        bsz, n, din,
        e.stride(0), weight.stride(0) if weight is not None else 0, z.stride(0),
        HAS_W=weight is not None, HAS_B=bias is not None, RESIDUAL=residual,
        CDT=TL_DTYPES[e.dtype], IEEE=e.dtype == torch.float32, UPCAST=interpreting(),
        **cfg.kwargs(),
    )  # fmt: skip
    return z


def head_rows(
    z: torch.Tensor,
    centers: torch.Tensor,
    labels: torch.Tensor | None,
    tau: float,
    mode: int,
    *,
    compute_dtype: torch.dtype,
    with_pc: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """From fp32 ``z (B, D)``: CE -> (loss rows (B,), pc (B, D) or None); LOGITS -> (logits
    (B, K) fp32, None); COS -> (cos(z, c_y) (B,), None). Out-of-range labels give NaN rows."""
    check_dtype(centers=centers, compute_dtype=compute_dtype)
    bsz, d = z.shape
    _check_width(d)
    check_device(z, centers, labels)
    labels = labels.contiguous() if labels is not None else None
    k = centers.shape[0]
    centers = centers.contiguous()
    cfg = rows_config(compute_dtype, d)
    if mode == MODE_LOGITS:
        out = torch.empty(bsz, k, device=z.device, dtype=torch.float32)
    else:
        out = torch.empty(bsz, device=z.device, dtype=torch.float32)
    pc = (
        torch.empty(bsz, d, device=z.device, dtype=torch.float32)
        if with_pc and mode == MODE_CE
        else None
    )
    _head_rows_kernel[(triton.cdiv(bsz, cfg.blocks["BLOCK_M"]),)](
        z, centers, labels if labels is not None else z, out, pc if pc is not None else z,
        bsz, k, d,
        z.stride(0), centers.stride(0), out.stride(0), d,
        1.0 / tau,
        MODE=mode, WITH_PC=pc is not None, EPS=NORM_EPS,
        **cfg.kwargs(), **_flags(compute_dtype),
    )  # fmt: skip
    return out, pc


def head_bwd(
    z: torch.Tensor,
    centers: torch.Tensor,
    tau: float,
    mode: int,
    *,
    out_dtype: torch.dtype,
    labels: torch.Tensor | None = None,
    pc: torch.Tensor | None = None,
    grad_logits: torch.Tensor | None = None,
    grad_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dL/dz (B, D)`` in ``out_dtype``. CE needs labels, pc, grad_rows; LOGITS needs
    grad_logits (B, K); COS needs labels, grad_rows. Out-of-range labels give NaN rows."""
    check_dtype(centers=centers, out_dtype=out_dtype)
    bsz, d = z.shape
    _check_width(d)
    check_device(z, centers, labels, pc, grad_logits, grad_rows)
    labels = labels.contiguous() if labels is not None else None
    k = centers.shape[0]
    centers = centers.contiguous()
    cfg = rows_config(out_dtype, d, backward=True)
    dz = torch.empty(bsz, d, device=z.device, dtype=out_dtype)
    gl = grad_logits if grad_logits is not None else z
    gr = grad_rows if grad_rows is not None else z
    _head_bwd_kernel[(triton.cdiv(bsz, cfg.blocks["BLOCK_M"]),)](
        z, centers, labels if labels is not None else z, pc if pc is not None else z, gl, gr, dz,
        bsz, k, d,
        z.stride(0), centers.stride(0), pc.stride(0) if pc is not None else 0,
        gl.stride(0), gl.stride(1) if gl.dim() == 2 else 0,
        gr.stride(0) if grad_rows is not None else 0, dz.stride(0),
        1.0 / tau,
        MODE=mode, EPS=NORM_EPS,
        **cfg.kwargs(), **_flags(out_dtype),
    )  # fmt: skip
    return dz
