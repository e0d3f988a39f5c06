"""Head projection + L2 normalisation + logits against fixed centers (+ cross-entropy / cosine).

``z = e + e W^T + b`` (residual) or ``z = e W^T + b`` (identity when ``weight`` is None);
``u = z / max(||z||, 1e-12)`` (F.normalize); ``logits = u C^T / tau``. Centers ``C (K, D)`` are
unit-norm rows, frozen: the op neither renormalises them nor computes their gradient.

Public functions (one dispatcher picks the backend, :mod:`advcal.ops._dispatch`):

* :func:`head_ce` -- cross-entropy of the logits against labels (``reduction`` mean/sum/none);
* :func:`head_logits` -- the ``(B, K)`` fp32 logits the evaluator uses;
* :func:`head_target_cos` -- ``cos(z, c_y)`` per row, CrossMaxim's objective.

Backends: ``triton`` (CUDA tensors; ``advcal::head_fwd`` / ``advcal::head_bwd`` custom ops whose
CUDA kernels launch :mod:`advcal.kernels.head_ce` and whose CPU kernels are the same math in plain
PyTorch, so eager, ``torch.compile(fullgraph=True)`` and ``opcheck`` run on CPU too) and ``ref``
(the ``*_ref`` functions: plain PyTorch autograd; the CPU default). Triton takes float32 and
bfloat16 (float16 inputs run on the reference, see SUPPORTED_DTYPES) and D <= 1024. Labels
outside ``[0, K)`` raise a ValueError when they live on the host; CUDA labels are not read back
(no sync): the kernels give such a row a NaN loss and a NaN gradient.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from advcal.ops import _dispatch

NORM_EPS = 1e-12
# float16 goes to the reference: the kernels' low-precision backward operands (dlogits, InfoNCE's
# dS ~ 1/B) underflow fp16's normal range at typical batch sizes (measured under the interpreter:
# InfoNCE at B=2048 has 36x PyTorch's gradient error in fp16; bf16 is within 1.3x).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
MAX_D = 1024  # rows are held whole in registers by the kernels (see kernels/_common.py)
MODE_CE, MODE_LOGITS, MODE_COS = 0, 1, 2
_REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------------------ references


def project_ref(
    e: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: bool
) -> torch.Tensor:
    """The head: ``e + e W^T + b`` (residual) or ``e W^T + b``; identity when weight is None."""
    z = e if weight is None else F.linear(e, weight, bias)
    if weight is None and bias is not None:
        z = z + bias
    if residual and weight is not None:
        z = e + z
    return z


def head_logits_ref(
    e: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    centers: torch.Tensor,
    tau: float,
    *,
    residual: bool = True,
) -> torch.Tensor:
    """Logits ``(B, K)`` in fp32 of the calibrated embedding against the centers."""
    z = project_ref(e, weight, bias, residual).float()
    return F.normalize(z, dim=-1, eps=NORM_EPS) @ centers.float().T / tau


def head_ce_ref(
    e: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    centers: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    *,
    residual: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    logits = head_logits_ref(e, weight, bias, centers, tau, residual=residual)
    return F.cross_entropy(logits, labels.long(), reduction=reduction)


def head_target_cos_ref(
    e: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    residual: bool = True,
) -> torch.Tensor:
    """``cos(z_i, c_{y_i})`` ``(B,)`` fp32 (centers are unit rows: ``<normalize(z), c_y>``)."""
    z = project_ref(e, weight, bias, residual).float()
    return (F.normalize(z, dim=-1, eps=NORM_EPS) * centers.float()[labels.long()]).sum(-1)


# ---------------------------------------------------------------------------- validation


def _validate(
    e: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    centers: torch.Tensor,
    labels: torch.Tensor | None,
    tau: float | None,
    residual: bool,
) -> None:
    """Shape/dtype/device errors that name the argument, before any work (no device sync)."""
    if e.dim() != 2:
        raise ValueError(f"e must be (B, D), got shape {tuple(e.shape)}")
    bsz, din = e.shape
    dout = din
    if weight is not None:
        if weight.dim() != 2 or weight.shape[1] != din:
            raise ValueError(f"weight must be (D_out, {din}) for e of width {din}, got "
                             f"{tuple(weight.shape)}")  # fmt: skip
        dout = weight.shape[0]
        if residual and dout != din:
            raise ValueError(f"a residual head needs a square weight, got {tuple(weight.shape)}; "
                             "pass residual=False for a plain linear head")  # fmt: skip
    if bias is not None and tuple(bias.shape) != (dout,):
        raise ValueError(f"bias must be ({dout},), got {tuple(bias.shape)}")
    if centers.dim() != 2 or centers.shape[1] != dout:
        raise ValueError(f"centers must be (K, {dout}) (the head's output width), got "
                         f"{tuple(centers.shape)}")  # fmt: skip
    if labels is not None:
        if tuple(labels.shape) != (bsz,):
            raise ValueError(f"labels must be ({bsz},), got {tuple(labels.shape)}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be int64 (or int32), got {labels.dtype}")
        _check_label_range(labels, centers.shape[0])
    if tau is not None and not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    for name, t in (("weight", weight), ("bias", bias), ("centers", centers), ("labels", labels)):
        if t is not None and t.device != e.device:
            raise ValueError(f"{name} is on {t.device} but e is on {e.device}")


def _check_label_range(labels: torch.Tensor, k: int) -> None:
    """Labels must index a center. Checked on the host where that costs no device sync (CPU
    labels, eager); CUDA labels are not read back (a sync would stall every attack step and
    break CUDA-graph capture): there the kernels write NaN loss/cos rows and NaN gradient rows
    for an out-of-range label, and the reference raises a device-side assert."""
    if labels.device.type != "cpu" or labels.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= k:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"labels must be in [0, {k}) (one per center row), got {bad}; check the label "
            "mapping against centers"
        )


# ------------------------------------------------------------------------ backend choice


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401

        import advcal.kernels.head_ce
        import advcal.kernels.infonce  # noqa: F401
    except Exception as exc:  # ImportError, or a broken triton install
        return f"triton not importable ({type(exc).__name__}: {exc})"
    return None


def triton_general() -> str | None:
    """Why the Triton backend cannot run anything on this machine (None when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _triton_import_error()


def triton_on_device(device: str) -> str | None:
    """Why the Triton backend cannot run tensors on ``device`` (``"cpu"``, ``"cuda"``)."""
    if device != "cuda":
        return f"takes CUDA tensors, not {device}"
    return triton_general()


def triton_why_not(tensors: dict[str, torch.Tensor | None], width: int) -> str | None:
    """Reason the Triton kernels cannot take these tensors (None when they can)."""
    present = {k: t for k, t in tensors.items() if t is not None}
    for name, t in present.items():
        if t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES:
            return (
                f"{name} has dtype {t.dtype} (the kernels take float32 and bfloat16; float16 "
                "backward operands underflow in them)"
            )
    if width > MAX_D:
        return f"width D={width} > {MAX_D} (kernels hold whole rows in registers)"
    for name, t in present.items():
        if t.device.type != "cuda":
            return f"{name} is on {t.device.type} (the Triton kernels take CUDA tensors)"
    return triton_general()


def _why_not_head(e, weight, bias, centers, *args, **kwargs) -> str | None:
    if centers.requires_grad:
        return "centers.requires_grad (the fused op treats the centers as fixed: no gradient)"
    tensors = {"e": e, "weight": weight, "bias": bias, "centers": centers}
    if len(args) >= 1 and isinstance(args[0], torch.Tensor):
        tensors["labels"] = args[0]
    return triton_why_not(tensors, max(e.shape[-1], centers.shape[-1]))


# for `advcal info`: without inputs (_dispatch.describe) and per device (chosen_by_device)
_why_not_head.general = triton_general  # type: ignore[attr-defined]
_why_not_head.device = triton_on_device  # type: ignore[attr-defined]


def _always(*args, **kwargs) -> str | None:
    return None


# ------------------------------------------------------------------------- custom ops


@torch.library.custom_op(
    "advcal::head_fwd",
    mutates_args=(),
    schema="(Tensor e, Tensor? weight, Tensor? bias, Tensor centers, Tensor? labels, float tau, "
    "bool residual, int mode, bool with_pc) -> (Tensor, Tensor, Tensor)",
)
def head_fwd(
    e: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    centers: torch.Tensor,
    labels: torch.Tensor | None,
    tau: float,
    residual: bool,
    mode: int,
    with_pc: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, z, pc)``: out = loss rows (B,) [CE], logits (B, K) [LOGITS] or cos (B,) [COS];
    ``z`` the fp32 projection (saved for backward); ``pc = softmax(logits) C - c_y`` (B, D)
    fp32 in CE mode when ``with_pc`` (``dCE/du = pc / tau``: all the backward needs), else
    empty.

    This body is the CPU kernel: the kernels' math in plain fp32 PyTorch."""
    f32 = torch.float32
    z = project_ref(
        e.to(f32),
        None if weight is None else weight.to(f32),
        None if bias is None else bias.to(f32),
        residual,
    )
    if weight is None and bias is None:  # identity head: z would alias e (outputs may not)
        z = z.clone()
    u = F.normalize(z, dim=-1, eps=NORM_EPS)
    c = centers.to(f32)
    empty = z.new_empty(0)
    if mode == MODE_COS:
        return (u * c[labels.long()]).sum(-1), z, empty
    logits = u @ c.T / tau
    if mode == MODE_LOGITS:
        return logits, z, empty
    loss = F.cross_entropy(logits, labels.long(), reduction="none")
    pc = logits.softmax(-1) @ c - c[labels.long()] if with_pc else empty
    return loss, z, pc


@head_fwd.register_fake
def _head_fwd_fake(e, weight, bias, centers, labels, tau, residual, mode, with_pc):
    bsz, (k, d) = e.shape[0], centers.shape
    out = e.new_empty((bsz, k) if mode == MODE_LOGITS else (bsz,), dtype=torch.float32)
    z = e.new_empty((bsz, d), dtype=torch.float32)
    pc = e.new_empty((bsz, d) if mode == MODE_CE and with_pc else (0,), dtype=torch.float32)
    return out, z, pc


@head_fwd.register_kernel("cuda")
def _head_fwd_cuda(e, weight, bias, centers, labels, tau, residual, mode, with_pc):
    from advcal.kernels import head_ce as kernels

    z = kernels.project(e, weight, bias, residual)
    out, pc = kernels.head_rows(
        z, centers, labels, tau, mode, compute_dtype=e.dtype, with_pc=with_pc
    )
    return out, z, pc if pc is not None else z.new_empty(0)


def _weight_grads(
    dz: torch.Tensor,
    e: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: bool,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ``dz (B, D)`` in the compute dtype: ``de = dz [+ dz W]``, ``dW = dz^T e``,
    ``db = sum_b dz`` (cuBLAS GEMMs accumulate in fp32; ``db`` summed in fp32)."""
    need_e, need_w, need_b = need
    # three distinct empties: custom-op outputs may not alias each other
    de, dw, db = dz.new_empty(0), dz.new_empty(0), dz.new_empty(0)
    if need_e:
        if weight is None:
            de = dz
        else:
            w = weight.to(dz.dtype)
            de = torch.addmm(dz, dz, w) if residual else dz @ w
        de = de.to(e.dtype)
    if need_w and weight is not None:
        dw = (dz.T @ e.to(dz.dtype)).to(weight.dtype)
    if need_b and bias is not None:
        db = dz.sum(0, dtype=bias.dtype)  # one launch; bf16/fp16 sums accumulate in fp32
    return de, dw, db


@torch.library.custom_op(
    "advcal::head_bwd",
    mutates_args=(),
    schema="(Tensor grad, Tensor z, Tensor pc, Tensor centers, Tensor? labels, Tensor e, "
    "Tensor? weight, Tensor? bias, float tau, bool residual, int mode, bool need_e, "
    "bool need_w, bool need_b) -> (Tensor, Tensor, Tensor)",
)
def head_bwd(
    grad: torch.Tensor,
    z: torch.Tensor,
    pc: torch.Tensor,
    centers: torch.Tensor,
    labels: torch.Tensor | None,
    e: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    tau: float,
    residual: bool,
    mode: int,
    need_e: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(de, dW, db)`` (empty where not needed) from the output's gradient ``grad`` (``(B,)``
    for CE/COS, ``(B, K)`` for LOGITS). CPU kernel: the Triton math in plain PyTorch."""
    f32 = torch.float32
    c = centers.to(f32)
    nrm = z.norm(dim=-1, keepdim=True)
    rn = 1.0 / nrm.clamp_min(NORM_EPS)
    u = z * rn
    if mode == MODE_LOGITS:
        du = grad.to(f32) @ c / tau
    elif mode == MODE_CE:
        du = pc * (grad.to(f32) / tau)[:, None]
    else:
        du = c[labels.long()] * grad.to(f32)[:, None]
    udu = torch.where(nrm >= NORM_EPS, (u * du).sum(-1, keepdim=True), 0.0)
    dz = ((du - u * udu) * rn).to(e.dtype)
    return _weight_grads(dz, e, weight, bias, residual, (need_e, need_w, need_b))


@head_bwd.register_fake
def _head_bwd_fake(grad, z, pc, centers, labels, e, weight, bias, tau, residual, mode,
                   need_e, need_w, need_b):  # fmt: skip
    de = e.new_empty(e.shape if need_e else (0,))
    dw = (
        e.new_empty((0,)) if not (need_w and weight is not None) else weight.new_empty(weight.shape)
    )
    db = e.new_empty((0,)) if not (need_b and bias is not None) else bias.new_empty(bias.shape)
    return de, dw, db


@head_bwd.register_kernel("cuda")
def _head_bwd_cuda(grad, z, pc, centers, labels, e, weight, bias, tau, residual, mode,
                   need_e, need_w, need_b):  # fmt: skip
    from advcal.kernels import head_ce as kernels

    dz = kernels.head_bwd(
        z,
        centers,
        tau,
        mode,
        out_dtype=e.dtype,
        labels=labels,
        pc=pc if mode == MODE_CE else None,
        grad_logits=grad if mode == MODE_LOGITS else None,
        grad_rows=grad if mode != MODE_LOGITS else None,
    )
    return _weight_grads(dz, e, weight, bias, residual, (need_e, need_w, need_b))


def _head_setup_context(ctx, inputs, output) -> None:
    e, weight, bias, centers, labels, tau, residual, mode, _ = inputs
    _, z, pc = output
    ctx.save_for_backward(e, weight, bias, centers, labels, z, pc)
    ctx.tau, ctx.residual, ctx.mode = tau, residual, mode
    ctx.mark_non_differentiable(z, pc)


def _head_backward(ctx, grad_out, _grad_z, _grad_pc):
    e, weight, bias, centers, labels, z, pc = ctx.saved_tensors
    need_e, need_w, need_b = ctx.needs_input_grad[:3]
    if ctx.mode == MODE_CE and pc.numel() == 0:
        raise RuntimeError(
            "advcal::head_fwd ran with with_pc=False (no gradient was expected); call "
            "advcal.ops.head_ce with gradients enabled"
        )
    de, dw, db = torch.ops.advcal.head_bwd(
        grad_out, z, pc, centers, labels, e, weight, bias, ctx.tau, ctx.residual, ctx.mode,
        need_e, need_w and weight is not None, need_b and bias is not None,
    )  # fmt: skip
    return (
        de if need_e else None,
        dw if need_w and weight is not None else None,
        db if need_b and bias is not None else None,
        None, None, None, None, None, None,
    )  # fmt: skip


head_fwd.register_autograd(_head_backward, setup_context=_head_setup_context)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ------------------------------------------------------------- Triton-backed entry points


def _head_ce_op(e, weight, bias, centers, labels, tau, *, residual=True, reduction="mean"):
    rows, _, _ = torch.ops.advcal.head_fwd(
        e, weight, bias, centers, labels, float(tau), residual, MODE_CE,
        _needs_grad(e, weight, bias),
    )  # fmt: skip
    if reduction == "mean":
        return rows.mean()
    return rows.sum() if reduction == "sum" else rows


def _head_logits_op(e, weight, bias, centers, tau, *, residual=True):
    logits, _, _ = torch.ops.advcal.head_fwd(
        e, weight, bias, centers, None, float(tau), residual, MODE_LOGITS, False
    )
    return logits


def _head_target_cos_op(e, weight, bias, centers, labels, *, residual=True):
    cos, _, _ = torch.ops.advcal.head_fwd(
        e, weight, bias, centers, labels, 1.0, residual, MODE_COS, False
    )
    return cos


_dispatch.register(
    "head_ce", [_dispatch.Backend("triton", _head_ce_op, _why_not_head),
                _dispatch.Backend("ref", head_ce_ref, _always)],
)  # fmt: skip
_dispatch.register(
    "head_logits", [_dispatch.Backend("triton", _head_logits_op, _why_not_head),
                    _dispatch.Backend("ref", head_logits_ref, _always)],
)  # fmt: skip
_dispatch.register(
    "head_target_cos", [_dispatch.Backend("triton", _head_target_cos_op, _why_not_head),
                        _dispatch.Backend("ref", head_target_cos_ref, _always)],
)  # fmt: skip


# ---------------------------------------------------------------------------- public API


def head_ce(
    e: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    centers: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    *,
    residual: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``normalize(head(e)) C^T / tau`` against ``labels``.

    e ``(B, Din)``; weight ``(D, Din)`` or None; bias ``(D,)`` or None; centers ``(K, D)`` unit
    rows (fixed: no gradient); labels ``(B,)`` int64. Returns a 0-dim fp32 loss, or ``(B,)``
    for ``reduction="none"``. Gradients flow to e, weight and bias."""
    _validate(e, weight, bias, centers, labels, tau, residual)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return _dispatch.call(
        "head_ce", e, weight, bias, centers, labels, tau, residual=residual, reduction=reduction
    )


def head_logits(
    e: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    centers: torch.Tensor,
    tau: float,
    *,
    residual: bool = True,
) -> torch.Tensor:
    """Logits ``(B, K)`` fp32 of ``normalize(head(e))`` against the centers, over ``tau``."""
    _validate(e, weight, bias, centers, None, tau, residual)
    return _dispatch.call("head_logits", e, weight, bias, centers, tau, residual=residual)


def head_target_cos(
    e: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    residual: bool = True,
) -> torch.Tensor:
    """``cos(head(e)_i, c_{y_i})`` ``(B,)`` fp32: CrossMaxim maximises ``-cos``."""
    _validate(e, weight, bias, centers, labels, None, residual)
    return _dispatch.call("head_target_cos", e, weight, bias, centers, labels, residual=residual)
