"""Clean-adversarial InfoNCE over a batch.

``loss = mean_i CE(normalize(z_adv_i) . normalize(z_clean_j) / tau over j, target i)``;
``symmetric=True`` averages with the transposed direction.

Backends: ``triton`` (CUDA tensors) and ``cpu`` (CPU tensors) are the same
``advcal::infonce_fwd`` / ``advcal::infonce_bwd`` custom ops: the CUDA kernels run the tiled
kernels of :mod:`advcal.kernels.infonce` (the ``B x B`` similarity matrix never reaches global
memory, only per-row log-sum-exps), the CPU kernels are fused PyTorch that does materialise it
(the norms folded into row/column factors of ``S``, the identity subtracted on the diagonal in
place, fp32 GEMMs on oneDNN where that is faster: :func:`advcal.ops.head_ce.linear_cpu`); ``ref``
is :func:`infonce_ref`. Triton takes float32 and bfloat16 and D <= 1024; the CPU kernels float32
and bfloat16; float16 runs on the reference (its dS ~ 1/B^2 would underflow in the kernels' fp16
dot).

CPU, fp32, forward+backward (gradient for z_adv), 2-core AMD EPYC (shared, interleaved rounds,
median of paired ratios; ``benchmarks/bench_infonce.py --device cpu``): see docs/performance.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advcal import _ext
from advcal.ops import _dispatch
from advcal.ops.head_ce import (
    _row_normalize_bwd,
    cpu_on_device,
    cpu_small,
    cpu_why_not,
    linear_cpu,
    triton_general,
    triton_on_device,
    triton_why_not,
)

NORM_EPS = 1e-12


def infonce_ref(
    z_adv: torch.Tensor, z_clean: torch.Tensor, tau: float, *, symmetric: bool = False
) -> torch.Tensor:
    a = F.normalize(z_adv.float(), dim=-1, eps=NORM_EPS)
    c = F.normalize(z_clean.float(), dim=-1, eps=NORM_EPS)
    logits = a @ c.T / tau
    target = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def _validate(z_adv: torch.Tensor, z_clean: torch.Tensor, tau: float) -> None:
    if z_adv.dim() != 2:
        raise ValueError(f"z_adv must be (B, D), got shape {tuple(z_adv.shape)}")
    if z_clean.shape != z_adv.shape:
        raise ValueError(f"z_clean must match z_adv {tuple(z_adv.shape)}, got "
                         f"{tuple(z_clean.shape)}")  # fmt: skip
    if z_clean.device != z_adv.device:
        raise ValueError(f"z_clean is on {z_clean.device} but z_adv is on {z_adv.device}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def _weights(bsz: int, symmetric: bool) -> tuple[float, float]:
    """Per-term weights of ``sum_i (lse_row_i - S_ii)`` and ``sum_j (lse_col_j - S_jj)``."""
    return (0.5 / bsz, 0.5 / bsz) if symmetric else (1.0 / bsz, 0.0)


def _loss(cos: torch.Tensor, lse_r: torch.Tensor, lse_c: torch.Tensor | None, tau: float):
    loss = (lse_r - cos / tau).mean()
    if lse_c is not None:
        loss = 0.5 * (loss + (lse_c - cos / tau).mean())
    return loss


# ------------------------------------------------------------------------- custom ops


@torch.library.custom_op(
    "advcal::infonce_fwd",
    mutates_args=(),
    schema="(Tensor z_adv, Tensor z_clean, float tau, bool symmetric) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def infonce_fwd(
    z_adv: torch.Tensor, z_clean: torch.Tensor, tau: float, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss (), 1/|a| (B,), 1/|c| (B,), lse_row (B,), lse_col (B,) or empty)``, fp32.

    This body is the CPU kernel (:func:`_infonce_fwd_cpu`, without S)."""
    return _infonce_fwd_cpu(z_adv, z_clean, tau, symmetric)[:5]


def cpp_kernels() -> bool:
    """Whether advcal._C has the C++ CPU kernels (csrc/head_cpu.cpp); tests patch this to run
    the Python twins."""
    return _ext.has_kernel("infonce_fwd_cpu", "CPU")


def _infonce_fwd_cpu(z_adv, z_clean, tau, symmetric):
    """The CPU kernel of ``advcal::infonce_fwd`` plus S (B, B) fp32, which the eager CPU path
    saves for the backward (recomputing it costs one more B x B x D GEMM: 0.95x eager at
    (128, 256), measured): C++ (``advcal::infonce_fwd_cpu``) when the extension is built, else
    :func:`_infonce_fwd_py` (the same calls, bit-identical)."""
    fn = torch.ops.advcal.infonce_fwd_cpu if cpp_kernels() else _infonce_fwd_py
    return fn(z_adv, z_clean, tau, symmetric)


def _infonce_bwd_cpu(grad, z_adv, z_clean, rn_a, rn_c, lse_r, lse_c, s, tau, symmetric,
                     need_adv, need_clean):  # fmt: skip
    """The CPU kernel of ``advcal::infonce_bwd`` given the forward's S (an empty tensor:
    recomputed), C++ or :func:`_infonce_bwd_py` as above."""
    fn = torch.ops.advcal.infonce_bwd_cpu if cpp_kernels() else _infonce_bwd_py
    return fn(grad, z_adv, z_clean, rn_a, rn_c, lse_r, lse_c, s, tau, symmetric,
              need_adv, need_clean)  # fmt: skip


def _infonce_fwd_py(z_adv, z_clean, tau, symmetric):
    """The CPU kernel of ``advcal::infonce_fwd`` in Python (csrc/head_cpu.cpp is the same in
    C++); it materialises S, once (the tiling is the GPU's)."""
    a, c = z_adv.float(), z_clean.float()
    rn_a = torch.linalg.vector_norm(a, dim=1).clamp_min_(NORM_EPS).reciprocal_()
    rn_c = torch.linalg.vector_norm(c, dim=1).clamp_min_(NORM_EPS).reciprocal_()
    s = _similarity(a, c, rn_a, rn_c, tau)
    cos_tau = s.diagonal()  # cos / tau
    lse_r = s.logsumexp(-1)
    loss = (lse_r - cos_tau).mean()
    lse_c = a.new_empty(0)
    if symmetric:
        lse_c = s.logsumexp(0)
        loss = (loss + (lse_c - cos_tau).mean()).mul_(0.5)
    return loss, rn_a, rn_c, lse_r, lse_c, s


def _similarity(a, c, rn_a, rn_c, tau) -> torch.Tensor:
    """``S = normalize(a) normalize(c)^T / tau`` (B, B) fp32 as ``(a c^T) * (rn_a / tau) rn_c^T``:
    the normalised rows are never formed."""
    return linear_cpu(a, c).mul_((rn_a / tau)[:, None]).mul_(rn_c[None, :])


@infonce_fwd.register_fake
def _infonce_fwd_fake(z_adv, z_clean, tau, symmetric):
    bsz = z_adv.shape[0]
    f = torch.float32
    vec = [z_adv.new_empty((bsz,), dtype=f) for _ in range(3)]
    lse_c = z_adv.new_empty((bsz,) if symmetric else (0,), dtype=f)
    return z_adv.new_empty((), dtype=f), vec[0], vec[1], vec[2], lse_c


@infonce_fwd.register_kernel("cuda")
def _infonce_fwd_cuda(z_adv, z_clean, tau, symmetric):
    from advcal.kernels import infonce as kernels

    rn_a, rn_c, cos = kernels.row_stats(z_adv, z_clean)
    lse_r = kernels.lse(z_adv, z_clean, rn_a, rn_c, tau)
    lse_c = kernels.lse(z_clean, z_adv, rn_c, rn_a, tau) if symmetric else None
    loss = _loss(cos, lse_r, lse_c, tau)
    return loss, rn_a, rn_c, lse_r, lse_c if symmetric else lse_r.new_empty(0)


@torch.library.custom_op(
    "advcal::infonce_bwd",
    mutates_args=(),
    schema="(Tensor grad, Tensor z_adv, Tensor z_clean, Tensor rn_a, Tensor rn_c, Tensor lse_r, "
    "Tensor lse_c, float tau, bool symmetric, bool need_adv, bool need_clean) -> (Tensor, Tensor)",
)
def infonce_bwd(
    grad: torch.Tensor,
    z_adv: torch.Tensor,
    z_clean: torch.Tensor,
    rn_a: torch.Tensor,
    rn_c: torch.Tensor,
    lse_r: torch.Tensor,
    lse_c: torch.Tensor,
    tau: float,
    symmetric: bool,
    need_adv: bool,
    need_clean: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d z_adv, d z_clean)`` in the inputs' dtypes (empty where not needed). This body is
    the CPU kernel (:func:`_infonce_bwd_cpu`, recomputing S: the op's forward keeps only the
    per-row statistics, as the tiled GPU kernels do)."""
    return _infonce_bwd_cpu(grad, z_adv, z_clean, rn_a, rn_c, lse_r, lse_c, z_adv.new_empty(0),
                            tau, symmetric, need_adv, need_clean)  # fmt: skip


def _infonce_bwd_py(grad, z_adv, z_clean, rn_a, rn_c, lse_r, lse_c, s, tau, symmetric,
                    need_adv, need_clean):  # fmt: skip
    """The CPU kernel of ``advcal::infonce_bwd`` in Python (C++ twin in csrc/head_cpu.cpp):
    ``dS = g (w_r (P - I) + w_c (Q - I))``, P/Q the row/column softmaxes of S (the forward's,
    or recomputed when ``s`` is empty; never modified: a retained graph may run this again),
    ``d a = normalize_bwd(dS c_n / tau)``, ``c_n = c rn_c`` folded into dS's columns."""
    a, c = z_adv.float(), z_clean.float()
    saved = s.numel() > 0
    s = s if saved else _similarity(a, c, rn_a, rn_c, tau)
    w_r, w_c = _weights(a.shape[0], symmetric)
    g = grad.float()
    ds = (s - lse_r[:, None]).exp_().mul_(w_r * g)
    if symmetric:
        ds.add_(((s - lse_c[None, :]) if saved else s.sub_(lse_c[None, :])).exp_().mul_(w_c * g))
    ds.diagonal().sub_((w_r + w_c) * g)
    inv_tau = a.new_full((a.shape[0],), 1.0 / tau)
    da, dc = a.new_empty(0), a.new_empty(0)  # distinct: outputs may not alias
    if need_adv:
        da = _row_normalize_bwd(a, linear_cpu(ds * rn_c[None, :], c.t()), inv_tau)
        da = da.to(z_adv.dtype)
    if need_clean:
        dc = _row_normalize_bwd(c, linear_cpu(ds.t() * rn_a[None, :], a.t()), inv_tau)
        dc = dc.to(z_clean.dtype)
    return da, dc


@infonce_bwd.register_fake
def _infonce_bwd_fake(grad, z_adv, z_clean, rn_a, rn_c, lse_r, lse_c, tau, symmetric,
                      need_adv, need_clean):  # fmt: skip
    da = z_adv.new_empty(z_adv.shape if need_adv else (0,))
    dc = z_clean.new_empty(z_clean.shape if need_clean else (0,))
    return da, dc


@infonce_bwd.register_kernel("cuda")
def _infonce_bwd_cuda(grad, z_adv, z_clean, rn_a, rn_c, lse_r, lse_c, tau, symmetric,
                      need_adv, need_clean):  # fmt: skip
    from advcal.kernels import infonce as kernels

    w_r, w_c = _weights(z_adv.shape[0], symmetric)
    lse_c_opt = lse_c if symmetric else None
    da, dc = z_adv.new_empty(0), z_adv.new_empty(0)  # distinct: outputs may not alias
    if need_adv:  # anchors a_i: row term (w_r, lse_r) + column term (w_c, lse_c)
        da = kernels.grad(z_adv, z_clean, rn_a, rn_c, lse_r, lse_c_opt, grad, w_r, w_c, tau)
    if need_clean:  # anchors c_j: the same with the roles of rows and columns swapped
        dc = kernels.grad(z_clean, z_adv, rn_c, rn_a, lse_c_opt, lse_r, grad, w_c, w_r, tau)
    return da, dc


def _infonce_setup_context(ctx, inputs, output) -> None:
    z_adv, z_clean, tau, symmetric = inputs
    _, rn_a, rn_c, lse_r, lse_c = output
    ctx.save_for_backward(z_adv, z_clean, rn_a, rn_c, lse_r, lse_c)
    ctx.tau, ctx.symmetric = tau, symmetric
    ctx.mark_non_differentiable(rn_a, rn_c, lse_r, lse_c)


def _infonce_backward(ctx, grad_loss, *_unused):
    z_adv, z_clean, rn_a, rn_c, lse_r, lse_c = ctx.saved_tensors
    need_adv, need_clean = ctx.needs_input_grad[:2]
    da, dc = torch.ops.advcal.infonce_bwd(
        grad_loss, z_adv, z_clean, rn_a, rn_c, lse_r, lse_c, ctx.tau, ctx.symmetric,
        need_adv, need_clean,
    )  # fmt: skip
    return (da if need_adv else None, dc if need_clean else None, None, None)


infonce_fwd.register_autograd(_infonce_backward, setup_context=_infonce_setup_context)


# ------------------------------------------------------------------------- dispatch + API


class _InfoNCEOps(torch.autograd.Function):
    """The CPU path's autograd, as :class:`advcal.ops.head_ce._HeadOps`: in eager code the
    ops' CPU kernels called directly (no custom-op machinery per call), S saved for the
    backward; under torch.compile the ops (S recomputed in their backward)."""

    @staticmethod
    def forward(ctx, z_adv, z_clean, tau, symmetric):
        if torch.compiler.is_compiling():
            loss, rn_a, rn_c, lse_r, lse_c = torch.ops.advcal.infonce_fwd(
                z_adv, z_clean, tau, symmetric
            )
            s = None
        else:
            loss, rn_a, rn_c, lse_r, lse_c, s = _infonce_fwd_cpu(z_adv, z_clean, tau, symmetric)
        ctx.save_for_backward(z_adv, z_clean, rn_a, rn_c, lse_r, lse_c, s)
        ctx.tau, ctx.symmetric = tau, symmetric
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        z_adv, z_clean, rn_a, rn_c, lse_r, lse_c, s = ctx.saved_tensors
        need_adv, need_clean = ctx.needs_input_grad[:2]
        args = (ctx.tau, ctx.symmetric, need_adv, need_clean)
        if s is None:
            da, dc = torch.ops.advcal.infonce_bwd(
                grad_loss, z_adv, z_clean, rn_a, rn_c, lse_r, lse_c, *args
            )
        else:
            da, dc = _infonce_bwd_cpu(grad_loss, z_adv, z_clean, rn_a, rn_c, lse_r, lse_c, s,
                                      *args)  # fmt: skip
        return (da if need_adv else None, dc if need_clean else None, None, None)


def _infonce_cpu(z_adv, z_clean, tau, *, symmetric=False):
    return _InfoNCEOps.apply(z_adv, z_clean, float(tau), symmetric)


def _infonce_op(z_adv, z_clean, tau, *, symmetric=False):
    return torch.ops.advcal.infonce_fwd(z_adv, z_clean, float(tau), symmetric)[0]


def _why_not_infonce(z_adv, z_clean, *args, **kwargs) -> str | None:
    return triton_why_not({"z_adv": z_adv, "z_clean": z_clean}, z_adv.shape[-1])


_why_not_infonce.general = triton_general  # type: ignore[attr-defined]  # for `advcal info`
_why_not_infonce.device = triton_on_device  # type: ignore[attr-defined]


def _why_not_infonce_cpu(z_adv, z_clean, *args, **kwargs) -> str | None:
    bsz, d = z_adv.shape
    return cpu_why_not({"z_adv": z_adv, "z_clean": z_clean}) or cpu_small(bsz * bsz * d)


_why_not_infonce_cpu.general = lambda: None  # type: ignore[attr-defined]
_why_not_infonce_cpu.device = cpu_on_device  # type: ignore[attr-defined]


def _always(*args, **kwargs) -> str | None:
    return None


# triton and cpu run the same custom ops (CUDA / CPU kernels; on CPU wired by _InfoNCEOps)
_dispatch.register(
    "infonce", [_dispatch.Backend("triton", _infonce_op, _why_not_infonce),
                _dispatch.Backend("cpu", _infonce_cpu, _why_not_infonce_cpu),
                _dispatch.Backend("ref", infonce_ref, _always)],
)  # fmt: skip


def infonce(
    z_adv: torch.Tensor, z_clean: torch.Tensor, tau: float, *, symmetric: bool = False
) -> torch.Tensor:
    """InfoNCE between ``z_adv (B, D)`` and ``z_clean (B, D)`` (normalised inside; pair i is the
    positive of row i), temperature ``tau``; 0-dim fp32. Gradients to both inputs (pass a
    detached ``z_clean`` for the usual stop-gradient: its backward kernel is then skipped)."""
    _validate(z_adv, z_clean, tau)
    return _dispatch.call("infonce", z_adv, z_clean, tau, symmetric=symmetric)
