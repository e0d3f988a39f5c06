"""head_ce / head_logits / head_target_cos: the fused path against the ``*_ref`` functions.

Four tests per op (forward, gradients, opcheck, torch.compile) on CPU through the ``advcal::``
custom ops (their CPU kernels, the default CPU backend ``cpu``: also through the public API,
with the oneDNN GEMMs on and off), the Triton kernels themselves under ``TRITON_INTERPRET=1``
in a subprocess (the env var must be set before Triton is imported), dispatcher behaviour, and
the full shape product on a GPU (skipped here with the reason).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, requires_cuda
from tolerances import assert_close_to_ref

import advcal.ops as ops
from advcal.ops import _dispatch

HEAD = importlib.import_module("advcal.ops.head_ce")  # the module (ops.head_ce is the function)
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
TAU = 0.07
DTYPES = [torch.float32, torch.bfloat16]
# (B, D, K): 1, primes, one past a block (BLOCK_M = 16/32/64), non-powers of two
CPU_SHAPES = [(1, 33, 2), (7, 384, 10), (127, 33, 1000), (257, 1024, 10)]
# 65 x 300 x 40: the D_PAD=512 configs (BLOCK_M=16: 5 row blocks; 2-3 K tiles), 65 one past
# the projection's 64-row tile
INTERP_SHAPES = [(1, 33, 2), (17, 40, 37), (7, 64, 10), (65, 300, 40)]
GPU_SHAPES = [(b, d, k) for b in (1, 7, 127, 257) for d in (33, 384, 1024) for k in (2, 10, 1000)]
FNS = ["ce_mean", "ce_none", "logits", "cos"]


def make_inputs(bsz, d, k, dtype, device="cpu", seed=0, residual=True):
    """Fresh random head (not the identity init: W, b nonzero), unit centers, labels, and
    embeddings leaning towards their class center (cos ~0.3) with varied norms: the softmax is
    neither uniform nor saturated (p_y spread over ~0..0.9 at these shapes)."""
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    y = torch.randint(0, k, (bsz,), generator=g)
    e = torch.randn(bsz, d, generator=g) + 0.3 * d**0.5 * c[y]
    e = e * torch.exp(0.5 * torch.randn(bsz, 1, generator=g))
    w = torch.randn(d, d, generator=g) * (0.5 / d**0.5)
    b = torch.randn(d, generator=g) * 0.1
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(e), cast(w), cast(b), cast(c), y.to(device)


def call_ref(fn, e, w, b, c, y, residual=True):
    if fn == "ce_mean":
        return ops.head_ce_ref(e, w, b, c, y, TAU, residual=residual)
    if fn == "ce_none":
        return ops.head_ce_ref(e, w, b, c, y, TAU, residual=residual, reduction="none")
    if fn == "logits":
        return ops.head_logits_ref(e, w, b, c, TAU, residual=residual)
    return ops.head_target_cos_ref(e, w, b, c, y, residual=residual)


def call_op(fn, e, w, b, c, y, residual=True):
    """The Triton backend's entry points (custom ops): CPU kernels here, Triton on CUDA."""
    if fn == "ce_mean":
        return HEAD._head_ce_op(e, w, b, c, y, TAU, residual=residual)
    if fn == "ce_none":
        return HEAD._head_ce_op(e, w, b, c, y, TAU, residual=residual, reduction="none")
    if fn == "logits":
        return HEAD._head_logits_op(e, w, b, c, TAU, residual=residual)
    return HEAD._head_target_cos_op(e, w, b, c, y, residual=residual)


def call_public(fn, e, w, b, c, y, residual=True):
    if fn == "ce_mean":
        return ops.head_ce(e, w, b, c, y, TAU, residual=residual)
    if fn == "ce_none":
        return ops.head_ce(e, w, b, c, y, TAU, residual=residual, reduction="none")
    if fn == "logits":
        return ops.head_logits(e, w, b, c, TAU, residual=residual)
    return ops.head_target_cos(e, w, b, c, y, residual=residual)


def grads(fn_call, fn, e, w, b, c, y, residual=True):
    """Output and gradients for e, W, b under a fixed random upstream gradient."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (e, w, b)]
    out = fn_call(fn, *leaves, c, y, residual=residual)
    # upstream gradient at the scale of a mean loss (1/sqrt(numel)): unit-variance gradients on
    # B x K logits sum to entries of ~50 whose fp32 round-off alone exceeds the fp32 atol
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    g = g / max(out.numel(), 1) ** 0.5
    present = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(out, present, g))
    return out.detach(), tuple(None if t is None else next(got) for t in leaves)


def check(impl, fn, bsz, d, k, dtype, device="cpu", residual=True):
    """Forward and gradients of ``impl`` vs the fp32 reference on the same (rounded) inputs;
    low precision: at most LOWP_FACTOR x the error of the reference run in that precision."""
    e, w, b, c, y = make_inputs(bsz, d, k, dtype, device, residual=residual)
    out, g = grads(impl, fn, e, w, b, c, y, residual)
    ref32, g32 = grads(call_ref, fn, e.float(), w.float(), b.float(), c.float(), y, residual)
    lowp, glowp = (None, (None,) * 3)
    if dtype != torch.float32:
        lowp, glowp = grads(call_ref, fn, e, w, b, c, y, residual)
        lowp = lowp.to(dtype)  # carries the precision for the tolerance table
    assert out.dtype == torch.float32
    assert_close_to_ref(out, ref32, lowp)
    for got, ref, low, name in zip(g, g32, glowp, ("e", "weight", "bias"), strict=True):
        assert got.dtype == dtype, name
        assert_close_to_ref(got, ref, low)
    return g, g32, glowp


# -------------------------------------------------------------- CPU: custom ops vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bsz", "d", "k"), CPU_SHAPES)
@pytest.mark.parametrize("fn", FNS)
def test_forward_vs_ref(fn, bsz, d, k, dtype):
    e, w, b, c, y = make_inputs(bsz, d, k, dtype)
    out = call_op(fn, e, w, b, c, y)
    ref32 = call_ref(fn, e.float(), w.float(), b.float(), c.float(), y)
    lowp = None if dtype == torch.float32 else call_ref(fn, e, w, b, c, y).to(dtype)
    assert_close_to_ref(out, ref32, lowp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bsz", "d", "k"), CPU_SHAPES[:3])
@pytest.mark.parametrize("fn", FNS)
def test_grads_vs_ref(fn, bsz, d, k, dtype):
    check(call_op, fn, bsz, d, k, dtype)


@pytest.mark.parametrize("fn", FNS)
def test_plain_linear_and_identity_heads(fn):
    e, _, b, c, y = make_inputs(7, 33, 10, torch.float32)
    check(call_op, fn, 7, 33, 10, torch.float32, residual=False)
    # identity head (weight None, bias present / absent)
    for bias in (b, None):
        out = call_op(fn, e, None, bias, c, y)
        assert_close_to_ref(out, call_ref(fn, e, None, bias, c, y))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fn", ["ce_mean", "logits"])
def test_tolerance_check_rejects_wrong_gradients(fn, dtype):
    """The comparison used above can fail: a zero gradient, one 10% too large and one with a
    single row off by 10% of the scale are rejected."""
    g, g32, glow = check(call_op, fn, 127, 33, 1000, dtype)
    for got, want, low in zip(g, g32, glow, strict=True):
        row = got.clone()
        row[-1] += 0.1 * want.abs().max().to(dtype)
        for wrong in (torch.zeros_like(got), got * 1.1, row):
            with pytest.raises(AssertionError):
                assert_close_to_ref(wrong, want, low)


def test_inputs_are_not_saturated():
    e, w, b, c, y = make_inputs(127, 1024, 1000, torch.float32)
    p = ops.head_logits_ref(e, w, b, c, TAU).softmax(-1)[torch.arange(127), y]
    assert 0.01 < p.mean() < 0.9 and p.max() < 0.99


def _compare_rows(got, want, clamped: int) -> None:
    """A row below the eps clamp has a gradient ~1e12 larger: compare it on its own scale."""
    if want.dim() == 0 or want.shape[0] <= clamped:
        assert_close_to_ref(got, want)
        return
    keep = torch.arange(got.shape[0]) != clamped
    assert_close_to_ref(got[keep], want[keep])
    assert_close_to_ref(got[clamped], want[clamped])


def test_eps_clamp_matches_f_normalize():
    """A row whose projected norm is below eps=1e-12: F.normalize divides by eps instead and
    its gradient skips the projection term. Identity head so z = e exactly."""
    e, _, _, c, y = make_inputs(5, 33, 10, torch.float32)
    e[2] = e[2] / e[2].norm() * 1e-13
    for fn in FNS:
        out, g = grads(call_op, fn, e, None, None, c, y)
        ref, gr = grads(call_ref, fn, e, None, None, c, y)
        assert_close_to_ref(out, ref)
        _compare_rows(g[0], gr[0], 2)


@pytest.mark.parametrize("mode", [HEAD.MODE_CE, HEAD.MODE_LOGITS, HEAD.MODE_COS])
def test_opcheck(mode):
    e, w, b, c, y = make_inputs(7, 33, 10, torch.float32)
    e.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    labels = None if mode == HEAD.MODE_LOGITS else y
    args = (e, w, b, c, labels, TAU, True, mode, mode == HEAD.MODE_CE)
    torch.library.opcheck(torch.ops.advcal.head_fwd.default, args)
    out, z, pc = torch.ops.advcal.head_fwd(*args)
    grad = torch.randn_like(out)
    bwd_args = (grad, z.detach(), pc.detach(), c, labels, e.detach(), w.detach(), b.detach())
    torch.library.opcheck(
        torch.ops.advcal.head_bwd.default, (*bwd_args, TAU, True, mode, True, True, True)
    )


def test_compile_fullgraph():
    e, w, b, c, y = make_inputs(7, 33, 10, torch.float32)

    def step(e, w, b):
        loss = HEAD._head_ce_op(e, w, b, c, y, TAU)
        return loss - HEAD._head_target_cos_op(e, w, b, c, y).mean()

    compiled = torch.compile(step, fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in (e, w, b)]
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (e, w, b)]
    ref = (
        ops.head_ce_ref(*ref_leaves, c, y, TAU) - ops.head_target_cos_ref(*ref_leaves, c, y).mean()
    )
    ref.backward()
    assert_close_to_ref(out, ref)
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert_close_to_ref(got.grad, want.grad)


def test_compile_fullgraph_public_cpu_path(monkeypatch):
    """The CPU path (backend ``cpu``: an autograd.Function over the ops; forced, since this
    shape is below CPU_MIN_MACS) compiles with fullgraph, gradients for e, W, b through all
    three entry points."""
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cpu")
    e, w, b, c, y = make_inputs(7, 33, 10, torch.float32)

    def step(e, w, b, fns):
        ce, logits, cos = fns
        return (
            ce(e, w, b, c, y, TAU)
            + logits(e, w, b, c, TAU).square().mean()
            - cos(e, w, b, c, y).mean()
        )

    public = (ops.head_ce, ops.head_logits, ops.head_target_cos)
    refs = (ops.head_ce_ref, ops.head_logits_ref, ops.head_target_cos_ref)
    assert _dispatch.select("head_ce", e, w, b, c, y, TAU).name == "cpu"
    compiled = torch.compile(lambda e, w, b: step(e, w, b, public), fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in (e, w, b)]
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (e, w, b)]
    ref = step(*ref_leaves, refs)
    ref.backward()
    assert_close_to_ref(out, ref)
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert_close_to_ref(got.grad, want.grad)


# ------------------------------------------------------------------------------ dispatcher


def test_dispatch_cpu_uses_the_fused_cpu_kernels_and_forced_triton_says_why(monkeypatch):
    e, w, b, c, y = make_inputs(128, 256, 10, torch.float32)  # the demo's: above CPU_MIN_MACS
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    for op in ("head_ce", "head_logits", "head_target_cos"):
        assert op in _dispatch.describe()
        assert set(_dispatch.describe()[op]) == {"triton", "cpu", "ref"}
        assert _dispatch.chosen_by_device("cpu")[op] == "cpu"
    assert _dispatch.select("head_ce", e, w, b, c, y, TAU).name == "cpu"
    assert_close_to_ref(ops.head_ce(e, w, b, c, y, TAU), ops.head_ce_ref(e, w, b, c, y, TAU))
    # below CPU_MIN_MACS the reference is the default (faster there), unless cpu is forced
    small = make_inputs(64, 128, 10, torch.float32)
    assert HEAD._head_macs(small[0], small[1], small[3]) < HEAD.CPU_MIN_MACS
    assert "CPU_MIN_MACS" in HEAD._why_not_head_cpu(*small, TAU)
    assert _dispatch.select("head_ce", *small, TAU).name == "ref"
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cpu")
    assert _dispatch.select("head_ce", *small, TAU).name == "cpu"
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "triton")
    with pytest.raises(_dispatch.BackendUnavailableError, match="cpu"):
        ops.head_ce(e, w, b, c, y, TAU)
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cpu")
    assert _dispatch.select("head_logits", e, w, b, c, TAU).name == "cpu"
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "ref")
    assert _dispatch.select("head_logits", e, w, b, c, TAU).name == "ref"
    # centers that require grad, or mixed dtypes: the reference (the op has no centers grad)
    monkeypatch.delenv(_dispatch.BACKEND_ENV)
    c_grad = c.clone().requires_grad_(True)
    assert "centers.requires_grad" in HEAD._why_not_head_cpu(e, w, b, c_grad, y, TAU)
    assert _dispatch.select("head_ce", e, w, b, c_grad, y, TAU).name == "ref"
    assert _dispatch.select("head_ce", e.bfloat16(), w, b, c, y, TAU).name == "ref"


# (B, D, K) where every GEMM of the forward and backward is on oneDNN (>= ONEDNN_MIN_MACS
# multiply-adds: 257 x 1024 x 1024 projection, 257 x 1000 x 1024 logits), and the demo's shape
# (the projection on oneDNN, the K = 10 GEMMs on MKL)
ONEDNN_SHAPES = [(257, 1024, 1000), (128, 256, 10)]


def onednn_calls(fn) -> int:
    """Runs ``fn`` under the profiler; how many oneDNN linears (mkldnn::_linear_pointwise) ran,
    from the Python kernels or the C++ ones (both go through the dispatcher)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(ev.name == "mkldnn::_linear_pointwise" for ev in prof.events())


def use_kernels(impl: str, monkeypatch, module=HEAD) -> None:
    """``cpp``: the C++ CPU kernels (skip when advcal._C lacks them); ``python``: the twins."""
    if impl == "cpp" and not module.cpp_kernels():
        pytest.skip("advcal._C is not built with the C++ CPU kernels")
    if impl == "python":
        monkeypatch.setattr(module, "cpp_kernels", lambda: False)


# (dtype, oneDNN on, kernels): the C++ kernels with and without oneDNN, bf16, and the Python
# twins once (test_cpp_kernels_equal_their_python_twins pins them to the C++ bit for bit)
CPU_PATHS = [
    (torch.float32, True, "cpp"),
    (torch.float32, False, "cpp"),
    (torch.bfloat16, True, "cpp"),
    (torch.float32, True, "python"),
]
CPU_PATH_IDS = ["fp32-onednn-cpp", "fp32-mkl-cpp", "bf16-onednn-cpp", "fp32-onednn-python"]


@pytest.mark.parametrize(("dtype", "onednn", "impl"), CPU_PATHS, ids=CPU_PATH_IDS)
@pytest.mark.parametrize(("bsz", "d", "k"), ONEDNN_SHAPES)
@pytest.mark.parametrize("fn", FNS)
def test_public_api_on_cpu_vs_ref(fn, bsz, d, k, dtype, onednn, impl, monkeypatch):
    """The default CPU path (backend ``cpu``), forward and gradients for e, W, b, at the
    benchmark's shapes, C++ kernels and their Python twins, with torch.backends.mkldnn on
    (oneDNN GEMMs: seen in the profile) and off (none)."""
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    assert _dispatch.select("head_ce", *make_inputs(bsz, d, k, dtype), TAU).name == "cpu"
    use_kernels(impl, monkeypatch)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn)
    calls = onednn_calls(lambda: check(call_public, fn, bsz, d, k, dtype))
    # fp32 at these shapes: at least the projection; bf16 keeps the projection in bf16 like
    # the reference (its fp32 logits GEMM may qualify)
    if not onednn:
        assert calls == 0
    elif dtype == torch.float32:
        assert calls > 0


def test_no_grad_forward_skips_the_backward_gemm(monkeypatch):
    """Under torch.no_grad (the evaluator) the CE forward makes two GEMMs (projection,
    logits), not the third (softmax C) that only the backward needs, even when the tensors
    require grad; with grad enabled it makes all three."""
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    e, w, b, c, y = make_inputs(257, 1024, 1000, torch.float32)
    for t in (e, w, b):
        t.requires_grad_(True)
    with torch.no_grad():
        assert onednn_calls(lambda: ops.head_ce(e, w, b, c, y, TAU)) == 2
    assert onednn_calls(lambda: ops.head_ce(e, w, b, c, y, TAU)) == 3


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bsz", "d", "k"), [(7, 33, 10), (129, 1024, 1000)])
@pytest.mark.parametrize("mode", [HEAD.MODE_CE, HEAD.MODE_LOGITS, HEAD.MODE_COS])
def test_cpp_kernels_equal_their_python_twins(mode, bsz, d, k, dtype, residual):
    """csrc/head_cpu.cpp makes the Python twins' ATen calls in the same order: bit-identical
    forward and backward, every mode, the identity head and an eps-clamped row included."""
    if not HEAD.cpp_kernels():
        pytest.skip("advcal._C is not built with the C++ CPU kernels")
    e, w, b, c, y = make_inputs(bsz, d, k, dtype, residual=residual)
    e[1] = e[1] / e[1].float().norm() * 1e-13  # below eps: the clamped branch
    labels = None if mode == HEAD.MODE_LOGITS else y
    heads = [(w, b), (None, b), (None, None)]
    for weight, bias in heads:
        args = (e, weight, bias, c, labels, TAU, residual, mode, mode == HEAD.MODE_CE)
        got = torch.ops.advcal.head_fwd_cpu(*args)
        want = HEAD._head_fwd_py(*args)
        for g_, w_ in zip(got, want, strict=True):
            assert torch.equal(g_, w_)
        out, z, pc = want
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        bargs = (grad, z, pc, c, labels, e, weight, bias, TAU, residual, mode, True, True, True)
        for g_, w_ in zip(
            torch.ops.advcal.head_bwd_cpu(*bargs), HEAD._head_bwd_py(*bargs), strict=True
        ):
            assert torch.equal(g_, w_)


@pytest.mark.parametrize("fn", FNS)
def test_gradient_for_the_embedding_only(fn):
    """The attack's case: a frozen head (W, b without grad) asks the op for de alone."""
    e, w, b, c, y = make_inputs(129, 1024, 1000, torch.float32)
    le, lr = e.clone().requires_grad_(True), e.clone().requires_grad_(True)
    out = call_public(fn, le, w, b, c, y)
    ref = call_ref(fn, lr, w, b, c, y)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)) / out.numel() ** 0.5
    (got,) = torch.autograd.grad(out, le, g)
    (want,) = torch.autograd.grad(ref, lr, g)
    assert_close_to_ref(out.detach(), ref.detach())
    assert_close_to_ref(got, want)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("m", "n", "k", "transpose"),
    [(256, 1024, 1024, ""), (128, 256, 256, "w"), (1024, 1024, 129, "xw"), (7, 10, 33, "")],
)
def test_linear_cpu_matches_f_linear(m, n, k, transpose, bias):
    """HEAD.linear_cpu (oneDNN above ONEDNN_MIN_MACS, MKL below) vs F.linear, for transposed
    views as the backward passes them; fp32 round-off only (the error of either against fp64
    is ~1e-6 of the scale)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k, m, generator=g).t() if "x" in transpose else torch.randn(m, k, generator=g)
    w = torch.randn(k, n, generator=g).t() if "w" in transpose else torch.randn(n, k, generator=g)
    bvec = torch.randn(n, generator=g) if bias else None
    out = HEAD.linear_cpu(x, w, bvec)
    want = F.linear(x.double(), w.double(), None if bvec is None else bvec.double())
    assert out.shape == (m, n) and out.dtype == torch.float32 and out.is_contiguous()
    assert_close_to_ref(out, want.float())
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()


def test_errors_name_the_argument():
    e, w, b, c, y = make_inputs(7, 33, 10, torch.float32)
    with pytest.raises(ValueError, match="centers"):
        ops.head_ce(e, w, b, c[:, :20], y, TAU)
    with pytest.raises(ValueError, match="labels"):
        ops.head_ce(e, w, b, c, y[:3], TAU)
    with pytest.raises(ValueError, match="reduction"):
        ops.head_ce(e, w, b, c, y, TAU, reduction="max")
    with pytest.raises(ValueError, match="tau"):
        ops.head_logits(e, w, b, c, 0.0)
    with pytest.raises(ValueError, match="residual"):
        ops.head_ce(e, w[:20], b[:20], c[:, :20], y, TAU)


@pytest.mark.parametrize("bad", [10, -1])
def test_out_of_range_labels_raise_before_any_work(bad, monkeypatch):
    """Host labels are checked in the op layer, for every backend (the reference would raise an
    IndexError from inside cross_entropy, the kernels would write NaN rows)."""
    e, w, b, c, y = make_inputs(7, 33, 10, torch.float32)
    y[3] = bad
    for backend in ("auto", "ref"):
        monkeypatch.setenv(_dispatch.BACKEND_ENV, backend)
        with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*got " + str(bad)):
            ops.head_ce(e, w, b, c, y, TAU)
        with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
            ops.head_target_cos(e, w, b, c, y)
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "triton")  # the fast path: refused before dispatch
    with pytest.raises(ValueError, match="labels must be in"):
        ops.head_ce(e, w, b, c, y, TAU)


def test_float16_goes_to_the_reference_and_kernels_refuse_it(monkeypatch):
    from advcal.kernels import head_ce as kernels

    e, w, b, c, y = (t.half() if t.is_floating_point() else t
                     for t in make_inputs(7, 33, 10, torch.float32))  # fmt: skip
    reason = HEAD._why_not_head(e, w, b, c, y, TAU)
    assert reason is not None and "float16" in reason
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    assert _dispatch.select("head_ce", e, w, b, c, y, TAU).name == "ref"
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "triton")
    with pytest.raises(_dispatch.BackendUnavailableError, match="float16"):
        ops.head_ce(e, w, b, c, y, TAU)
    with pytest.raises(TypeError, match=r"torch\.float16"):
        kernels.project(e, w, b, True)
    with pytest.raises(TypeError, match=r"torch\.float16"):
        kernels.head_bwd(e.float(), c, TAU, HEAD.MODE_COS, out_dtype=torch.float16, labels=y,
                         grad_rows=torch.ones(7))  # fmt: skip


def test_wide_rows_go_to_the_reference():
    """D=2048 (D_PAD > 1024): the Triton backend declines it, the launchers refuse it."""
    from advcal.kernels import head_ce as kernels

    e, _, _, c, y = make_inputs(3, 2048, 4, torch.float32)
    assert "D=2048" in HEAD._why_not_head(e, None, None, c, y, TAU)
    with pytest.raises(ValueError, match="D=2048"):
        kernels.head_rows(e, c, y, TAU, HEAD.MODE_CE, compute_dtype=torch.float32)


# -------------------------------------------------------- shared memory of every launch config


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 33, 300, 384, 513, 1000, 1024])
def test_launch_configs_fit_sm90_shared_memory(d, dtype):
    """Every config the launchers pick fits H100/H200's 227 KiB per block (the estimate is an
    upper bound: test_aot_compiled_shared_memory checks it against the compiler)."""
    from advcal.kernels import _common
    from advcal.kernels import head_ce as kernels

    for bsz in (1, 256, 4096):  # the projection's tiles depend on the batch
        for name, cfg in kernels.configs(dtype, d, bsz).items():
            assert cfg.smem <= _common.SMEM_LIMIT, (name, d, dtype, bsz, cfg)


def test_launchers_use_the_checked_configs():
    """The launchers launch exactly what configs() reports (so the guard covers them)."""
    from advcal.kernels import _aot
    from advcal.kernels import head_ce as kernels

    for dtype in DTYPES:
        for d in (33, 300, 1024):
            cfgs = kernels.configs(dtype, d, 8)
            launches = [x for x, _ in _aot.launches_of_width(d, dtype, k=40)
                        if x.kernel.__module__ == kernels.__name__]  # fmt: skip
            assert {x.name for x in launches} == set(cfgs)
            for launch in launches:
                cfg = cfgs[launch.name].kwargs()
                assert {k: launch.meta[k] for k in cfg} == cfg


def test_aot_compiled_shared_memory():
    """Compile the widest row-kernel launches that stage tiles (CE with pc, LOGITS backward)
    for sm_90 without a GPU; check the real shared memory against the limit and the estimate."""
    from advcal.kernels import _aot, _common

    if INTERP:
        pytest.skip("the interpreter replaces the kernels")
    if not _aot.aot_available():
        pytest.skip("Triton's CUDA backend / its ptxas is not installed")
    for dtype in DTYPES:
        for launch, est in _aot.launches_of_width(1024, dtype):
            mode = launch.meta.get("MODE")
            if (launch.name, mode) in (("_head_rows_kernel", 0), ("_head_bwd_kernel", 1)):
                compiled = _aot.compile_launch(launch, arch=90)
                assert compiled.shared <= min(est, _common.SMEM_LIMIT), (dtype, compiled, est)


# ------------------------------------------------------- Triton kernels under the interpreter


def _kernel_path(fn, e, w, b, c, y, residual=True):
    """The CUDA implementations of the custom ops, called directly: on CPU tensors they run
    the Triton launchers under the interpreter."""
    mode = {"ce_mean": 0, "ce_none": 0, "logits": 1, "cos": 2}[fn]
    labels = None if mode == 1 else y
    out, z, pc = HEAD._head_fwd_cuda(e, w, b, c, labels, TAU, residual, mode, True)

    class _Out(torch.autograd.Function):
        @staticmethod
        def forward(ctx, e_, w_, b_):
            return out.clone()

        @staticmethod
        def backward(ctx, grad):
            grads_ = HEAD._head_bwd_cuda(
                grad, z, pc, c, labels, e, w, b, TAU, residual, mode, True, True, True
            )
            return tuple(t if t.numel() else None for t in grads_)  # empty: input was None

    rows = _Out.apply(e, w, b)
    return rows.mean() if fn == "ce_mean" else rows


interp = pytest.mark.skipif(
    not INTERP, reason="runs in the TRITON_INTERPRET=1 subprocess of test_kernels_in_interpreter"
)


@interp
def test_interp_is_active():
    from advcal.kernels import head_ce as kernels
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(kernels._head_rows_kernel, InterpretedFunction)


@interp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bsz", "d", "k"), INTERP_SHAPES)
@pytest.mark.parametrize("fn", FNS)
def test_interp_kernels_vs_ref(fn, bsz, d, k, dtype):
    check(_kernel_path, fn, bsz, d, k, dtype)


@interp
@pytest.mark.parametrize("fn", FNS)
def test_interp_plain_linear_identity_and_eps(fn):
    check(_kernel_path, fn, 7, 40, 10, torch.float32, residual=False)
    e, _, b, c, y = make_inputs(5, 33, 10, torch.float32)
    e[2] = e[2] / e[2].norm() * 1e-13
    for bias in (None, b):
        ref, gr = grads(call_ref, fn, e, None, bias, c, y)
        out, g = grads(_kernel_path, fn, e, None, bias, c, y)
        _compare_rows(out, ref, 2)
        for got, want in zip(g, gr, strict=True):
            if want is not None:
                _compare_rows(got, want, 2) if want.dim() == 2 else assert_close_to_ref(got, want)


@interp
@pytest.mark.parametrize("fn", ["ce_none", "cos"])
def test_interp_out_of_range_label_poisons_its_row(fn):
    """CUDA labels are not read back by the op layer (no sync): the kernels give the row of an
    out-of-range label a NaN loss/cos and a NaN gradient, and leave the other rows exact."""
    e, w, b, c, y = make_inputs(7, 33, 10, torch.float32)
    bad = y.clone()
    bad[3] = 10
    out, g = grads(_kernel_path, fn, e, w, b, c, bad)
    ref, gr = grads(call_ref, fn, e, w, b, c, y)
    keep = torch.arange(7) != 3
    assert out[3].isnan() and g[0][3].isnan().all()
    assert_close_to_ref(out[keep], ref[keep])
    assert_close_to_ref(g[0][keep], gr[0][keep])


def test_kernels_in_interpreter():
    """Run this file's ``interp`` tests in a child with TRITON_INTERPRET=1 set before Triton
    is imported; they assert the kernels are InterpretedFunctions (the interpreter really ran)."""
    if INTERP:
        pytest.skip("already inside the interpreter run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-q",
            "-k",
            "test_interp_",
            "-p",
            "no:cacheprovider",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail


# ------------------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bsz", "d", "k"), GPU_SHAPES)
@pytest.mark.parametrize("fn", FNS)
def test_gpu_public_api_vs_ref(fn, bsz, d, k, dtype, monkeypatch):
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    e, w, b, c, y = make_inputs(bsz, d, k, dtype, "cuda")
    assert _dispatch.select("head_ce", e, w, b, c, y, TAU).name == "triton"
    check(call_public, fn, bsz, d, k, dtype, "cuda")


@requires_cuda
def test_gpu_compile_fullgraph():
    e, w, b, c, y = make_inputs(257, 1024, 1000, torch.bfloat16, "cuda")
    w.requires_grad_(True)
    f = torch.compile(lambda e, w: ops.head_ce(e, w, b, c, y, TAU), fullgraph=True)
    f(e, w).backward()
    assert torch.isfinite(w.grad).all()
