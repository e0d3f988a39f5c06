"""Head projection + L2 normalisation + logits against fixed centers (+ cross-entropy / cosine).

``z = e + e W^T + b`` (residual) or ``z = e W^T + b`` (identity when ``weight`` is None);
``u = z / max(||z||, 1e-12)`` (F.normalize); ``logits = u C^T / tau``. Centers ``C (K, D)`` are
unit-norm rows, frozen: the op neither renormalises them nor computes their gradient.

Public functions (one dispatcher picks the backend, :mod:`advcal.ops._dispatch`):

* :func:`head_ce` -- cross-entropy of the logits against labels (``reduction`` mean/sum/none);
* :func:`head_logits` -- the ``(B, K)`` fp32 logits the evaluator uses;
* :func:`head_target_cos` -- ``cos(z, c_y)`` per row, CrossMaxim's objective.

Backends: ``triton`` (CUDA tensors) and ``cpu`` (CPU tensors) run the same ``advcal::head_fwd`` /
``advcal::head_bwd`` custom ops: their CUDA kernels launch :mod:`advcal.kernels.head_ce`, their
CPU kernels (:func:`_head_fwd_cpu`, :func:`_head_bwd_cpu`) are the kernels' math as few ATen
calls as it takes, the scalings folded into per-row factors, fp32 GEMMs on oneDNN where that
is faster (:func:`linear_cpu`), in C++ (csrc/head_cpu.cpp) with Python twins for builds
without the extension; on CPU an autograd.Function wires them (:class:`_HeadOps`). ``ref`` is
the ``*_ref`` functions (plain PyTorch autograd). Triton takes float32 and bfloat16 (float16
inputs run on the reference, see SUPPORTED_DTYPES) and D <= 1024; the CPU kernels take float32
and bfloat16 at any width (float16 runs on the reference: CPU fp16 GEMMs are slow). Labels
outside ``[0, K)`` raise a ValueError when they live on the host; CUDA labels are not read back
(no sync): the kernels give such a row a NaN loss and a NaN gradient.

On CPU the fused path is the default from CPU_MIN_MACS forward multiply-adds (below it the
reference is faster); figures (fused vs eager vs torch.compile, paired) in docs/performance.md.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from advcal import _ext
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
    lo, hi = (int(v) for v in torch.aminmax(labels))
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


def cpu_why_not(tensors: dict[str, torch.Tensor | None]) -> str | None:
    """Reason the fused CPU kernels should not take these tensors (None when they should):
    CPU tensors of one supported float dtype (float16: the reference is as fast)."""
    present = {k: t for k, t in tensors.items() if t is not None}
    for name, t in present.items():
        if t.device.type != "cpu":
            return f"{name} is on {t.device.type} (the fused CPU kernels take CPU tensors)"
    floats = {t.dtype for t in present.values() if t.is_floating_point()}
    if len(floats) != 1 or not floats <= set(SUPPORTED_DTYPES):
        return (
            f"dtypes {sorted(map(str, floats))}: the fused CPU kernels take float32 or bfloat16, "
            "one dtype for every tensor"
        )
    return None


def cpu_on_device(device: str) -> str | None:
    return None if device == "cpu" else f"takes CPU tensors, not {device}"


# Below this many forward multiply-adds the reference is the faster CPU path: its backward runs
# in autograd's C++ engine, ours pays a Python autograd.Function per call. Measured on the
# 2-core machine (CPU time, 1 thread, fp32, paired rounds), fused / reference: head_ce
# (B, D, K) = (2, 8, 3) 0.78x, (32, 64, 10) 0.82x, (64, 128, 10) 1.1M MACs 0.90x, (128, 256,
# 10) 8.7M 1.22x, (256, 1024, 1000) 2.0x; infonce (B, D) = (64, 128) 0.5M 0.92x, (128, 256)
# 4.2M 1.24x. A size preference, not a capability: ADVCAL_BACKEND=cpu runs any size.
CPU_MIN_MACS = 1 << 22


def cpu_small(macs: int) -> str | None:
    """Why the fused CPU path is not the default for a problem of ``macs`` multiply-adds."""
    if macs >= CPU_MIN_MACS or _dispatch.forced_backend() == "cpu":
        return None
    return (
        f"{macs} multiply-adds < CPU_MIN_MACS={CPU_MIN_MACS}: the reference is faster at this "
        "size (per-call overhead)"
    )


def _head_macs(e, weight, centers) -> int:
    """Forward multiply-adds: the projection and the logits."""
    bsz, din = e.shape
    proj = 0 if weight is None else bsz * din * weight.shape[0]
    return proj + bsz * centers.shape[0] * centers.shape[1]


def _why_not_head_cpu(e, weight, bias, centers, *args, **kwargs) -> str | None:
    if centers.requires_grad:
        return "centers.requires_grad (the fused op treats the centers as fixed: no gradient)"
    return cpu_why_not({"e": e, "weight": weight, "bias": bias, "centers": centers}) or cpu_small(
        _head_macs(e, weight, centers)
    )


_why_not_head_cpu.general = lambda: None  # type: ignore[attr-defined]
_why_not_head_cpu.device = cpu_on_device  # type: ignore[attr-defined]


# ------------------------------------------------------------------- CPU building blocks

# oneDNN's fp32 GEMM against MKL's (what torch.mm/F.linear use for fp32 on CPU), measured on the
# 2-core AMD EPYC (Zen 5) machine, 2 threads: 256x1024x1024 1.32 vs 3.10 ms (oneDNN runs AVX-512
# there, MKL its AVX2 path), 128x256x256 0.065 vs 0.106 ms, but 128x10x256 0.023 vs 0.016 ms
# (oneDNN's ~20 us fixed cost per call). Same fp32 arithmetic (max error vs fp64 1e-6 relative,
# MKL 4e-7). Below this many multiply-adds, MKL.
ONEDNN_MIN_MACS = 1 << 21


@functools.cache
def _onednn_linear():
    """``torch.ops.mkldnn._linear_pointwise`` (the dense-input oneDNN linear inductor's CPU
    backend uses) when this torch has it, else None."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def linear_cpu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w^T (+ bias)`` (x (M, K), w (N, K), any strides): on oneDNN for fp32 CPU tensors of
    at least ONEDNN_MIN_MACS multiply-adds (unless ``torch.backends.mkldnn`` is disabled), else
    ``F.linear``. Returns a fresh contiguous (M, N) tensor."""
    fn = _onednn_linear()
    if (
        fn is not None
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.device.type == "cpu"
        and torch.backends.mkldnn.enabled
        and x.shape[0] * w.shape[0] * x.shape[1] >= ONEDNN_MIN_MACS
    ):
        return fn(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)


def _row_normalize_bwd(z: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Gradient through ``u = z / max(|z|, eps)`` (F.normalize) of ``du = v * s[:, None]``:
    ``dz = (du - u (u . du)) / |z|`` = ``v (s/|z|) - z (s (z . v) / |z|^3)``, so ``du`` and ``u``
    are never formed; where ``|z| < eps`` the norm is clamped and ``dz = du / eps``. fp32."""
    nrm = torch.linalg.vector_norm(z, dim=1)
    rn = nrm.clamp_min(NORM_EPS).reciprocal_()
    a = s * rn
    b = torch.linalg.vecdot(z, v).mul_(a * rn * rn).masked_fill_(nrm < NORM_EPS, 0.0)
    return (v * a[:, None]).addcmul_(z, b[:, None], value=-1.0)


def _project_cpu(e, weight, bias, residual) -> torch.Tensor:
    """The head's output ``z`` (B, D) in fp32, a fresh tensor (it is an op output). fp32: on
    oneDNN where it pays (:func:`linear_cpu`); bf16: the GEMM in bf16 as the reference does
    (ATen runs it on oneDNN), the residual added in fp32."""
    f32 = torch.float32
    if weight is None:
        z = e.to(f32, copy=True)
        return z if bias is None else z.add_(bias)
    if e.dtype != f32 and weight.dtype == e.dtype:
        z = F.linear(e, weight, None if bias is None else bias.to(e.dtype)).to(f32)
    else:  # fp32, or mixed dtypes: everything in fp32
        z = linear_cpu(e.to(f32), weight.to(f32), None if bias is None else bias.to(f32))
    return z.add_(e) if residual else z


def cpp_kernels() -> bool:
    """Whether advcal._C has the C++ CPU kernels (csrc/head_cpu.cpp); tests patch this to run
    the Python twins."""
    return _ext.has_kernel("head_fwd_cpu", "CPU")


def _head_fwd_cpu(e, weight, bias, centers, labels, tau, residual, mode, with_pc):
    """The CPU kernel of ``advcal::head_fwd``: C++ (``advcal::head_fwd_cpu``: the ATen calls
    without Python's per-call cost) when the extension is built, else :func:`_head_fwd_py`;
    the two are the same calls in the same order (bit-identical, tested)."""
    fn = torch.ops.advcal.head_fwd_cpu if cpp_kernels() else _head_fwd_py
    return fn(e, weight, bias, centers, labels, tau, residual, mode, with_pc)


def _head_bwd_cpu(grad, z, pc, centers, labels, e, weight, bias, tau, residual, mode,
                  need_e, need_w, need_b):  # fmt: skip
    """The CPU kernel of ``advcal::head_bwd`` (C++ or :func:`_head_bwd_py`, as above)."""
    fn = torch.ops.advcal.head_bwd_cpu if cpp_kernels() else _head_bwd_py
    return fn(grad, z, pc, centers, labels, e, weight, bias, tau, residual, mode,
              need_e, need_w, need_b)  # fmt: skip


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

    This body is the CPU kernel (:func:`_head_fwd_cpu`)."""
    return _head_fwd_cpu(e, weight, bias, centers, labels, tau, residual, mode, with_pc)


def _head_fwd_py(e, weight, bias, centers, labels, tau, residual, mode, with_pc):
    """The CPU kernel of ``advcal::head_fwd`` in Python (csrc/head_cpu.cpp is the same in
    C++): fp32 math, the norm folded into per-row factors (``logits = (z C^T) (1 / (|z| tau))``
    row by row, ``u`` never formed), and the softmax turned in place into ``P - onehot(y)`` so
    that ``pc`` is one GEMM. Few ATen calls: at the demo's (128, 256, 10) each costs about what
    its arithmetic does."""
    f32 = torch.float32
    z = _project_cpu(e, weight, bias, residual)
    c = centers.to(f32)
    rn = torch.linalg.vector_norm(z, dim=1).clamp_min_(NORM_EPS).reciprocal_()
    empty = z.new_empty(0)
    if mode == MODE_COS:
        y = labels.long()
        return torch.linalg.vecdot(z, c.index_select(0, y)).mul_(rn), z, empty
    logits = linear_cpu(z, c).mul_((rn / tau)[:, None])
    if mode == MODE_LOGITS:
        return logits, z, empty
    y = labels.long()
    loss = F.cross_entropy(logits, y, reduction="none")  # one fused log-softmax + gather
    if not with_pc:
        return loss, z, empty
    p = torch.softmax(logits, 1).scatter_(1, y[:, None], -1.0, reduce="add")  # P - onehot(y)
    return loss, z, linear_cpu(p, c.t())


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
    cpu = dz.device.type == "cpu"
    if need_e:
        if weight is None:
            de = dz
        else:
            w = weight.to(dz.dtype)
            if cpu:  # oneDNN where it pays (linear_cpu)
                de = linear_cpu(dz, w.t())
                de = de.add_(dz) if residual else de
            else:
                de = torch.addmm(dz, dz, w) if residual else dz @ w
        de = de.to(e.dtype)
    if need_w and weight is not None:
        ec = e.to(dz.dtype)
        dw = (linear_cpu(dz.t(), ec.t()) if cpu else dz.T @ ec).to(weight.dtype)
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
    for CE/COS, ``(B, K)`` for LOGITS). This body is the CPU kernel (:func:`_head_bwd_cpu`)."""
    return _head_bwd_cpu(grad, z, pc, centers, labels, e, weight, bias, tau, residual, mode,
                         need_e, need_w, need_b)  # fmt: skip


def _head_bwd_py(grad, z, pc, centers, labels, e, weight, bias, tau, residual, mode,
                 need_e, need_w, need_b):  # fmt: skip
    """The CPU kernel of ``advcal::head_bwd`` in Python (csrc/head_cpu.cpp is the same in C++):
    ``dz`` from :func:`_row_normalize_bwd` (``du = pc grad / tau``, ``grad C / tau`` or
    ``c_y grad``), then the weight gradients' GEMMs (:func:`_weight_grads`)."""
    f32 = torch.float32
    c = centers.to(f32)
    g = grad.to(f32)
    if mode == MODE_LOGITS:
        dz = _row_normalize_bwd(z, linear_cpu(g, c.t()), z.new_full((z.shape[0],), 1.0 / tau))
    elif mode == MODE_CE:
        dz = _row_normalize_bwd(z, pc, g / tau)
    else:
        dz = _row_normalize_bwd(z, c.index_select(0, labels.long()), g)
    return _weight_grads(dz.to(e.dtype), e, weight, bias, residual, (need_e, need_w, need_b))


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


class _HeadOps(torch.autograd.Function):
    """The CPU path's autograd: the ``advcal::head_fwd`` / ``head_bwd`` ops wired as the custom
    op's ``register_autograd`` wires them, in a plain autograd.Function. In eager code it calls
    the ops' CPU kernels (:func:`_head_fwd_cpu`, :func:`_head_bwd_cpu`) directly: the custom-op
    machinery around them (generated autograd with argument pytrees and default filling,
    aliasing checks, a dynamo-disabled wrapper) cost 110-140 us per forward+backward with these
    nine arguments, measured at (B, D, K) = (2, 8, 3) on the 2-core machine (the reference's
    whole step there: 90 us). Under torch.compile it calls the ops (traced through their
    fakes), so the graph holds ``advcal::head_fwd`` / ``head_bwd`` as on GPU."""

    @staticmethod
    def forward(ctx, e, weight, bias, centers, labels, tau, residual, mode, with_pc):
        # with_pc: decided by the caller, where grad mode is visible (needs_input_grad here
        # says True under torch.no_grad too: the eval forward would pay the backward's GEMM)
        fwd = torch.ops.advcal.head_fwd if torch.compiler.is_compiling() else _head_fwd_cpu
        out, z, pc = fwd(e, weight, bias, centers, labels, tau, residual, mode, with_pc)
        ctx.save_for_backward(e, weight, bias, centers, labels, z, pc)
        ctx.tau, ctx.residual, ctx.mode = tau, residual, mode
        return out

    @staticmethod
    def backward(ctx, grad_out):
        e, weight, bias, centers, labels, z, pc = ctx.saved_tensors
        need_e, need_w, need_b = ctx.needs_input_grad[:3]
        need_w, need_b = need_w and weight is not None, need_b and bias is not None
        bwd = torch.ops.advcal.head_bwd if torch.compiler.is_compiling() else _head_bwd_cpu
        de, dw, db = bwd(grad_out, z, pc, centers, labels, e, weight, bias, ctx.tau,
                         ctx.residual, ctx.mode, need_e, need_w, need_b)  # fmt: skip
        return (de if need_e else None, dw if need_w else None, db if need_b else None,
                None, None, None, None, None, None)  # fmt: skip


def _head_ce_cpu(e, weight, bias, centers, labels, tau, *, residual=True, reduction="mean"):
    rows = _HeadOps.apply(e, weight, bias, centers, labels, float(tau), residual, MODE_CE,
                          _needs_grad(e, weight, bias))  # fmt: skip
    if reduction == "mean":
        return rows.mean()
    return rows.sum() if reduction == "sum" else rows


def _head_logits_cpu(e, weight, bias, centers, tau, *, residual=True):
    return _HeadOps.apply(e, weight, bias, centers, None, float(tau), residual, MODE_LOGITS,
                          False)  # fmt: skip


def _head_target_cos_cpu(e, weight, bias, centers, labels, *, residual=True):
    return _HeadOps.apply(e, weight, bias, centers, labels, 1.0, residual, MODE_COS, False)


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


# triton and cpu run the same custom ops (CUDA / CPU kernels; on CPU wired by _HeadOps)
_dispatch.register(
    "head_ce", [_dispatch.Backend("triton", _head_ce_op, _why_not_head),
                _dispatch.Backend("cpu", _head_ce_cpu, _why_not_head_cpu),
                _dispatch.Backend("ref", head_ce_ref, _always)],
)  # fmt: skip
_dispatch.register(
    "head_logits", [_dispatch.Backend("triton", _head_logits_op, _why_not_head),
                    _dispatch.Backend("cpu", _head_logits_cpu, _why_not_head_cpu),
                    _dispatch.Backend("ref", head_logits_ref, _always)],
)  # fmt: skip
_dispatch.register(
    "head_target_cos", [_dispatch.Backend("triton", _head_target_cos_op, _why_not_head),
                        _dispatch.Backend("cpu", _head_target_cos_cpu, _why_not_head_cpu),
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
