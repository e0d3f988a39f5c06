"""Fused PGD update with eps-ball projection, over lists of tensors (all modalities at once).

L-inf: ``x <- clamp(clamp(x + alpha * sign(g), x0 - eps, x0 + eps), lo, hi)``.
L2:    ``x <- clamp(proj_{||x - x0||_2 <= eps}(x + alpha * g / ||g||_2), lo, hi)``, norms per
sample (over all dims but the first).

Shapes: each ``x_adv[i]``, ``grad[i]``, ``x_orig[i]`` share one shape and dtype (fp32, bf16 or
fp16); tensors of a list may differ in shape and dtype. ``alpha``, ``eps``, ``lo``, ``hi`` are
floats or one float per tensor; ``lo``/``hi`` None means unbounded.

Backends (one dispatcher, :mod:`advcal.ops._dispatch`): ``cuda`` (``advcal._C``'s CUDA kernel:
one launch for the whole list, 16 B/element fp32 for L-inf), ``cpp`` (``advcal._C``'s CPU
kernel: one vectorised pass, no temporaries), ``ref`` (plain PyTorch below). The reference
defines the arithmetic: everything in fp32, one rounding to the storage dtype per stored value,
and the kernels perform the same operations in the same order, so fp32 results are
bit-identical (the CUDA L2 norms are reduced in a different order: close, not identical).
NaN semantics are the reference's (see :func:`pgd_step_ref_`) on every backend.
``ADVCAL_BACKEND`` picks the backend the same way in eager code and under ``torch.compile``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from advcal import _ext
from advcal.ops import _dispatch

NORM_EPS = 1e-12
NORMS = ("linf", "l2")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- reference


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample 2-norms ``(B,)`` in fp32, clamped at NORM_EPS (same call as the C++ kernel)."""
    return torch.linalg.vector_norm(
        t.reshape(t.shape[0], -1), dim=1, dtype=torch.float32
    ).clamp_min(NORM_EPS)


def _as_list(v, n: int, name: str) -> list:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"{name} has {len(v)} entries for {n} tensors")
        return list(v)
    return [v] * n


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def _clamp(v: torch.Tensor, lo, hi) -> torch.Tensor:
    return v if lo is None and hi is None else v.clamp(min=lo, max=hi)


def pgd_step_ref_(
    x_adv: Sequence[torch.Tensor],
    grad: Sequence[torch.Tensor],
    x_orig: Sequence[torch.Tensor],
    *,
    alpha,
    eps,
    lo=None,
    hi=None,
    norm: str = "linf",
) -> None:
    """The reference: plain PyTorch, in place on ``x_adv``; the kernels' order of operations.

    NaN semantics: exactly what these torch ops do, chosen deliberately and matched bit for bit
    by the C++ and CUDA kernels (tests/test_pgd_step.py pins them):

    - L-inf, per element: ``torch.sign(NaN) = 0`` in ATen (pytorch/pytorch#41245), so an
      element whose ``grad`` is NaN takes no step: it stays at ``x``, projected into the ball
      and ``[lo, hi]`` like any other. An element whose ``x`` or ``x_orig`` is NaN becomes NaN
      (``maximum``/``minimum``/``clamp`` keep a NaN). ``grad = +-inf`` is a plain sign.
    - L2, per sample: a NaN anywhere in a sample's ``grad``, ``x`` or ``x_orig`` (or an inf in
      its ``grad``, through ``inf * 0``) makes its norm NaN and the whole sample NaN: the
      direction is undefined, and no finite step is invented. Other samples and other tensors
      of the list are unaffected.

    So a NaN never becomes a finite value outside the eps-ball or ``[lo, hi]``: every finite
    output lies in both. The op does not raise on NaN: checking would need a device-to-host
    sync, which a CUDA-graph-captured step cannot have. Should torch ever change ``sign(NaN)``,
    the pinning test fails rather than the kernels silently diverging from the reference.
    """
    n = len(x_adv)
    alphas, epss = _as_list(alpha, n, "alpha"), _as_list(eps, n, "eps")
    los, his = _as_list(lo, n, "lo"), _as_list(hi, n, "hi")
    for x, g, x0, a, e, l, h in zip(x_adv, grad, x_orig, alphas, epss, los, his, strict=True):
        if x.numel() == 0:
            continue
        xf, gf, x0f = x.float(), g.float(), x0.float()
        if norm == "linf":
            t = xf + torch.sign(gf) * a
            t = torch.minimum(torch.maximum(t, x0f - e), x0f + e)
        elif norm == "l2":
            s = _bcast(torch.full_like(gn := _norms(g), a).div_(gn), x)
            d = ((xf + gf * s) - x0f).to(x.dtype)  # stored in x's dtype, as the kernels do
            f = _bcast(torch.full_like(dn := _norms(d), e).div_(dn).clamp_(max=1.0), x)
            t = x0f + d.float() * f
        else:
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        x.copy_(_clamp(t, l, h))


def random_start_ref_(
    x_adv: Sequence[torch.Tensor],
    x_orig: Sequence[torch.Tensor],
    *,
    eps,
    lo=None,
    hi=None,
    norm: str = "linf",
    generator: torch.Generator | None = None,
) -> None:
    """``x_adv <- clamp(x0 + delta, lo, hi)``. L-inf: delta ~ U(-eps, eps) per element. L2:
    delta = eps * r * d / ||d|| per sample, d ~ N(0, I) (a uniform direction), r ~ U(0, 1)."""
    n = len(x_adv)
    epss, los, his = _as_list(eps, n, "eps"), _as_list(lo, n, "lo"), _as_list(hi, n, "hi")
    for x, x0, e, l, h in zip(x_adv, x_orig, epss, los, his, strict=True):
        if x.numel() == 0:
            continue
        opts = {"generator": generator, "device": x.device, "dtype": torch.float32}
        if norm == "linf":
            u = torch.rand(x.shape, **opts)
            v = x0.float() + (2 * u - 1) * e
        elif norm == "l2":
            d = torch.randn(x.shape, **opts)
            r = torch.rand((x.shape[0],), **opts)
            scale = _bcast(torch.full_like(r, e).div_(_norms(d)).mul_(r), x)
            v = x0.float() + d * scale
        else:
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        x.copy_(_clamp(v, l, h))


# ------------------------------------------------------------------------ argument handling


def _tensor_list(v, name: str) -> list[torch.Tensor]:
    items = [v] if isinstance(v, torch.Tensor) else list(v)
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return items


def _floats(v, n: int, name: str, *, none: float | None = None) -> list[float]:
    if isinstance(v, (float, int)):  # the common call: one number for every tensor
        return [float(v)] * n
    vals = _as_list(v, n, name)
    out = []
    for i, a in enumerate(vals):
        if a is None:
            if none is None:
                raise ValueError(f"{name}[{i}] is None; pass a number")
            out.append(none)
        else:
            out.append(float(a))
    return out


def _prepare(x_adv, grad, x_orig, alpha, eps, lo, hi, norm):
    """Validates once, before any work; returns lists and plain floats (None -> -inf/+inf)."""
    xs = _tensor_list(x_adv, "x_adv")
    gs = _tensor_list(grad, "grad") if grad is not None else None
    x0s = _tensor_list(x_orig, "x_orig")
    n = len(xs)
    if norm not in NORMS:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    for name, lst in (("grad", gs), ("x_orig", x0s)):
        if lst is not None and len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors but x_adv has {n}")
    alphas = _floats(alpha, n, "alpha") if gs is not None else None
    epss = _floats(eps, n, "eps")
    los = _floats(lo, n, "lo", none=-math.inf)
    his = _floats(hi, n, "hi", none=math.inf)
    for i, x in enumerate(xs):
        dtype, shape, device = x.dtype, x.shape, x.device
        if dtype not in DTYPES:
            raise ValueError(f"x_adv[{i}] has dtype {dtype}; expected float32, bfloat16 or float16")
        others = [("x_orig", x0s[i])] + ([("grad", gs[i])] if gs is not None else [])
        for name, t in others:
            if t.shape == shape and t.dtype == dtype and t.device == device:
                continue  # the common case, one comparison each; the messages below otherwise
            if t.shape != x.shape:
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(t.shape)} but x_adv[{i}] has {tuple(x.shape)}"
                )
            if t.dtype != x.dtype:
                raise ValueError(f"{name}[{i}] has dtype {t.dtype} but x_adv[{i}] has {x.dtype}")
            if t.device != x.device:
                raise ValueError(f"{name}[{i}] is on {t.device} but x_adv[{i}] is on {x.device}")
        if not epss[i] >= 0:
            raise ValueError(f"eps[{i}] = {epss[i]} must be >= 0")
        if alphas is not None and not math.isfinite(alphas[i]):
            raise ValueError(f"alpha[{i}] = {alphas[i]} must be finite")
        if math.isnan(los[i]) or math.isnan(his[i]):
            raise ValueError(
                f"lo[{i}] = {los[i]}, hi[{i}] = {his[i]}: bounds must not be NaN (None: unbounded)"
            )
        if los[i] > his[i]:
            raise ValueError(f"lo[{i}] = {los[i]} > hi[{i}] = {his[i]}")
        if norm == "l2" and x.dim() == 0:
            raise ValueError(f"x_adv[{i}] is 0-dimensional; norm='l2' needs a sample dimension")
    # read-only inputs may be strided (autograd returns the gradient of a transposed input as
    # a transposed view): one copy here keeps the fused kernel; x_adv is written in place, so
    # a strided x_adv takes the reference (with the warning saying so)
    if gs is not None:
        gs = [g.contiguous() for g in gs]
    x0s = [x.contiguous() for x in x0s]
    return xs, gs, x0s, alphas, epss, los, his


def _none_if_inf(vals: list[float]) -> list[float | None]:
    return [None if math.isinf(v) else v for v in vals]


# ----------------------------------------------------------------------------- backends


def _ext_reason(key: str) -> str | None:
    if not _ext.available():
        return f"advcal._C not built: {_ext.why_unavailable()}"
    if not _ext.has_kernel("pgd_step_", key):
        return f"advcal._C was built without {key} kernels"
    return None


def _tensor_reason(tensors: list[torch.Tensor], device_type: str) -> str | None:
    for i, t in enumerate(tensors):
        if t.device.type != device_type:
            return f"tensor {i} is on {t.device.type}, not {device_type}"
        if not t.is_contiguous():
            return f"tensor {i} is not contiguous"
    return None


def _make_why_not(key: str, device_type: str):
    def why_not(xs, gs, x0s, *args) -> str | None:
        if xs[0].device.type != device_type:  # cheap first: the other device's backend
            return f"tensor 0 is on {xs[0].device.type}, not {device_type}"
        return _ext_reason(key) or _tensor_reason([*xs, *(gs or ()), *x0s], device_type)

    why_not.general = lambda: _ext_reason(key)  # type: ignore[attr-defined]
    why_not.device = lambda device: (  # type: ignore[attr-defined]
        _ext_reason(key) or (None if device == device_type else f"runs {device_type} tensors")
    )
    return why_not


def _step_ext(xs, gs, x0s, alphas, epss, los, his, norm) -> None:
    torch.ops.advcal.pgd_step_(xs, gs, x0s, alphas, epss, los, his, norm)


def _step_ref(xs, gs, x0s, alphas, epss, los, his, norm) -> None:
    pgd_step_ref_(
        xs, gs, x0s, alpha=alphas, eps=epss, lo=_none_if_inf(los), hi=_none_if_inf(his), norm=norm
    )


def _start_ext(xs, gs, x0s, epss, los, his, norm, generator) -> None:
    torch.ops.advcal.random_start_(xs, x0s, epss, los, his, norm, generator)


def _start_ref(xs, gs, x0s, epss, los, his, norm, generator) -> None:
    random_start_ref_(
        xs,
        x0s,
        eps=epss,
        lo=_none_if_inf(los),
        hi=_none_if_inf(his),
        norm=norm,
        generator=generator,
    )


def _ref_why_not(*args) -> None:
    return None


for _op, _ext_fn, _ref_fn in (
    ("pgd_step_", _step_ext, _step_ref),
    ("random_start_", _start_ext, _start_ref),
):
    _dispatch.register(
        _op,
        [
            _dispatch.Backend("cuda", _ext_fn, _make_why_not("CUDA", "cuda")),
            _dispatch.Backend("cpp", _ext_fn, _make_why_not("CPU", "cpu")),
            _dispatch.Backend("ref", _ref_fn, _ref_why_not),
        ],
    )

_warned: set[str] = set()


def _select(op: str, *args) -> _dispatch.Backend:
    if torch.compiler.is_compiling():
        # Inside torch.compile: the very choice eager makes, ADVCAL_BACKEND included (a forced
        # backend that cannot run the inputs raises while tracing), read at trace time and
        # baked into the graph: the op (traced through its fake kernel) or the reference (plain
        # PyTorch). Changing ADVCAL_BACKEND later needs a fresh torch.compile. No warning here.
        return _dispatch.select(op, *args)
    _ext.load()  # the one warning when advcal._C is missing
    backend = _dispatch.select(op, *args)
    if backend.name == "ref" and _ext.available() and _dispatch.forced_backend() != "ref":
        device = args[0][0].device.type
        native = {"cpu": "cpp", "cuda": "cuda"}.get(device, "")  # this device's backend
        backend_of = {b.name: b for b in _dispatch._OPS[op][:-1]}
        reason = backend_of[native].why_not(*args) if native in backend_of else "no backend"
        key = f"{op}:{device}:{reason}"
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"advcal.ops.{op}: using the reference for {device} tensors ({reason})",
                RuntimeWarning,
                stacklevel=3,
            )
    return backend


# ------------------------------------------------------------------------------ public


def pgd_step_(
    x_adv: torch.Tensor | Sequence[torch.Tensor],
    grad: torch.Tensor | Sequence[torch.Tensor],
    x_orig: torch.Tensor | Sequence[torch.Tensor],
    *,
    alpha: float | Sequence[float],
    eps: float | Sequence[float],
    lo: float | Sequence[float | None] | None = None,
    hi: float | Sequence[float | None] | None = None,
    norm: str = "linf",
) -> None:
    """One PGD update of every tensor of ``x_adv`` in place (see the module docstring)."""
    args = _prepare(x_adv, grad, x_orig, alpha, eps, lo, hi, norm)
    if not args[0]:
        return
    _select("pgd_step_", *args, norm).fn(*args, norm)


def random_start_(
    x_adv: torch.Tensor | Sequence[torch.Tensor],
    x_orig: torch.Tensor | Sequence[torch.Tensor],
    *,
    eps: float | Sequence[float],
    lo: float | Sequence[float | None] | None = None,
    hi: float | Sequence[float | None] | None = None,
    norm: str = "linf",
    generator: torch.Generator | None = None,
) -> None:
    """``x_adv <- clamp(x_orig + delta, lo, hi)`` in place, delta uniform in the eps-ball's
    L-inf box or along a random L2 direction (see :func:`random_start_ref_`). CPU: the same
    draws as the reference for the same generator; CUDA (extension): fused kernels with
    device-side Philox (other draws than torch.rand/randn, same distribution), capturable in a
    CUDA graph, where each replay draws afresh."""
    xs, _, x0s, _, epss, los, his = _prepare(x_adv, None, x_orig, None, eps, lo, hi, norm)
    if not xs:
        return
    args = (xs, None, x0s, epss, los, his, norm, generator)
    _select("random_start_", *args).fn(*args)


# --------------------------------------------------------------------- fake (meta) kernels

if _ext.available():
    for _op in ("pgd_step_", "random_start_"):  # cache, so compiled code only reads a dict
        _ext.has_kernel(_op, "CPU"), _ext.has_kernel(_op, "CUDA")

    @torch.library.register_fake("advcal::pgd_step_")
    def _pgd_step_fake(x_adv, grad, x_orig, alpha, eps, lo, hi, norm) -> None:
        return None

    @torch.library.register_fake("advcal::random_start_")
    def _random_start_fake(x_adv, x_orig, eps, lo, hi, norm, generator) -> None:
        return None
