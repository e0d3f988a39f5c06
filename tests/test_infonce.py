"""infonce: the tiled path against :func:`advcal.ops.infonce_ref`.

Forward, gradients, opcheck and torch.compile on CPU through the ``advcal::infonce_*`` custom
ops (their CPU kernels, the default CPU backend ``cpu``: also through the public API, with the
oneDNN GEMMs on and off); the Triton kernels under ``TRITON_INTERPRET=1`` in a subprocess
(set before Triton is imported); the dispatcher; the full sweep on a GPU (skipped here).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, requires_cuda
from test_head_ce import CPU_PATH_IDS, CPU_PATHS
from tolerances import assert_close_to_ref

import advcal.ops as ops
from advcal.ops import _dispatch

NCE = importlib.import_module("advcal.ops.infonce")  # the module (ops.infonce is the function)
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
TAU = 0.1
DTYPES = [torch.float32, torch.bfloat16]
CPU_SHAPES = [(1, 33), (7, 384), (127, 1024), (257, 33)]
# 17/70: one past a BLOCK_M/BLOCK_N (32/64), several tiles; 65 x 300: D_PAD=512 configs
# (BLOCK_M=16: 5 row blocks), 65 one past the lse kernel's 64-row block
INTERP_SHAPES = [(1, 33), (17, 40), (70, 64), (65, 300)]
GPU_SHAPES = [(b, d) for b in (1, 7, 127, 257, 4099) for d in (33, 384, 1024)]


def make_inputs(bsz, d, dtype, device="cpu", seed=0):
    """Non-saturated pairs: rows come in groups of ~4 around shared prototypes (hard
    negatives), the positive is a heavily perturbed copy, and row norms vary (e^{0.5 N(0,1)}),
    so p_ii spreads over ~0.01..0.98 and the loss is ~1-3, not ~0."""
    g = torch.Generator().manual_seed(seed)
    groups = max(bsz // 4, 1)
    protos = torch.randn(groups, d, generator=g)
    a = protos[torch.randint(0, groups, (bsz,), generator=g)] + torch.randn(bsz, d, generator=g)
    c = a + 3.0 * torch.randn(bsz, d, generator=g)
    a = a * torch.exp(0.5 * torch.randn(bsz, 1, generator=g))
    return a.to(device=device, dtype=dtype), c.to(device=device, dtype=dtype)


def run(fn, a, c, symmetric):
    """Loss and (d z_adv, d z_clean) of ``fn`` under an upstream gradient of 1.7."""
    la, lc = (t.detach().clone().requires_grad_(True) for t in (a, c))
    out = fn(la, lc, TAU, symmetric=symmetric)
    return out.detach(), torch.autograd.grad(out * 1.7, (la, lc))


def check(impl, bsz, d, dtype, symmetric, device="cpu"):
    """Loss and both input gradients of ``impl`` vs the fp32 reference on the same inputs;
    bf16: at most LOWP_FACTOR x the error of the reference run on the bf16 inputs (it computes
    in fp32 and rounds the gradients to bf16: the tightest plain-PyTorch baseline)."""
    a, c = make_inputs(bsz, d, dtype, device)
    out, g = run(impl, a, c, symmetric)
    ref, gref = run(ops.infonce_ref, a.float(), c.float(), symmetric)
    low, glow = None, (None, None)
    if dtype != torch.float32:
        low, glow = run(ops.infonce_ref, a, c, symmetric)
        low = low.to(dtype)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert_close_to_ref(out, ref, low)
    for got, want, lp in zip(g, gref, glow, strict=True):
        assert got.dtype == dtype
        assert_close_to_ref(got, want, lp)
    return g, gref, glow


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bsz", "d"), CPU_SHAPES)
def test_forward_vs_ref(bsz, d, dtype, symmetric):
    a, c = make_inputs(bsz, d, dtype)
    out = NCE._infonce_op(a, c, TAU, symmetric=symmetric)
    low = None if dtype == torch.float32 else ops.infonce_ref(a, c, TAU, symmetric=symmetric)
    ref = ops.infonce_ref(a.float(), c.float(), TAU, symmetric=symmetric)
    assert_close_to_ref(out, ref, None if low is None else low.to(dtype))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bsz", "d"), CPU_SHAPES)
def test_grads_vs_ref(bsz, d, dtype, symmetric):
    check(NCE._infonce_op, bsz, d, dtype, symmetric)


@pytest.mark.parametrize(("dtype", "onednn", "impl"), CPU_PATHS, ids=CPU_PATH_IDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("bsz", "d"), [(256, 1024), (128, 256)])
def test_public_api_on_cpu_vs_ref(bsz, d, dtype, symmetric, onednn, impl, monkeypatch):
    """The default CPU path (backend ``cpu``) at the benchmark's shapes, both input
    gradients, C++ kernels and their Python twins, with torch.backends.mkldnn on (oneDNN
    GEMMs: S = a c^T and dS c are fp32, seen in the profile) and off (none)."""
    from test_head_ce import onednn_calls, use_kernels

    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    assert _dispatch.select("infonce", *make_inputs(bsz, d, dtype), TAU).name == "cpu"
    use_kernels(impl, monkeypatch, NCE)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn)
    calls = onednn_calls(lambda: check(ops.infonce, bsz, d, dtype, symmetric))
    assert (calls > 0) == onednn, calls


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bsz", "d"), [(9, 33), (256, 1024)])
def test_cpp_kernels_equal_their_python_twins(bsz, d, dtype, symmetric):
    """csrc/head_cpu.cpp makes the Python twins' ATen calls in the same order: bit-identical
    forward and backward (both input gradients), an eps-clamped row included."""
    if not NCE.cpp_kernels():
        pytest.skip("advcal._C is not built with the C++ CPU kernels")
    a, c = make_inputs(bsz, d, dtype)
    a[2] = a[2] / a[2].float().norm() * 1e-13  # below eps: the clamped branch
    got = torch.ops.advcal.infonce_fwd_cpu(a, c, TAU, symmetric)
    want = NCE._infonce_fwd_py(a, c, TAU, symmetric)
    for g_, w_ in zip(got, want, strict=True):
        assert torch.equal(g_, w_)
    s = want[5].clone()
    bargs = (torch.tensor(1.3), a, c, *want[1:], TAU, symmetric, True, True)
    got = torch.ops.advcal.infonce_bwd_cpu(*bargs)
    for g_, w_ in zip(got, NCE._infonce_bwd_py(*bargs), strict=True):
        assert torch.equal(g_, w_)
    assert torch.equal(want[5], s)  # S not modified by either backward
    # an empty S is recomputed (the custom op's backward): the same gradients
    recomputed = (*bargs[:7], a.new_empty(0), *bargs[8:])
    for impl in (torch.ops.advcal.infonce_bwd_cpu, NCE._infonce_bwd_py):
        for g_, w_ in zip(impl(*recomputed), got, strict=True):
            assert torch.equal(g_, w_)


@pytest.mark.parametrize("symmetric", [False, True])
def test_retained_graph_backward_twice(symmetric, monkeypatch):
    """The eager CPU path saves S for the backward and must not modify it: a second backward
    of a retained graph gives the same gradients."""
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cpu")
    a, c = make_inputs(65, 64, torch.float32)
    la, lc = a.clone().requires_grad_(True), c.clone().requires_grad_(True)
    loss = ops.infonce(la, lc, TAU, symmetric=symmetric)
    first = torch.autograd.grad(loss, (la, lc), retain_graph=True)
    second = torch.autograd.grad(loss, (la, lc))
    for f, s in zip(first, second, strict=True):
        assert torch.equal(f, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tolerance_check_rejects_wrong_gradients(dtype):
    """The comparison used above can fail: a zero gradient, one 10% too large and one with a
    single row off by 10% of the scale are rejected at the shapes the tests use."""
    g, gref, glow = check(NCE._infonce_op, 127, 1024, dtype, False)
    got, want, low = g[0], gref[0], glow[0]
    assert 1e-6 < want.abs().max() < 1e-3  # a mean loss's gradient: below the old atols
    row = got.clone()
    row[5] += 0.1 * want.abs().max().to(dtype)
    for wrong in (torch.zeros_like(got), got * 1.1, row):
        with pytest.raises(AssertionError):
            assert_close_to_ref(wrong, want, low)


def test_inputs_are_not_saturated():
    a, c = make_inputs(127, 1024, torch.float32)
    assert 0.5 < ops.infonce_ref(a, c, TAU).item() < 4.0


def _compare_rows(got, want, clamped: int) -> None:
    """A row below the eps clamp has a gradient ~1e12 larger: compare it on its own scale."""
    keep = torch.arange(got.shape[0]) != clamped
    assert_close_to_ref(got[keep], want[keep])
    assert_close_to_ref(got[clamped], want[clamped])


def test_frozen_clean_side_and_eps_clamp():
    a, c = make_inputs(9, 33, torch.float32)
    a[3] = a[3] / a[3].norm() * 1e-13  # below eps: F.normalize divides by eps
    la = a.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(NCE._infonce_op(la, c, TAU), (la,))
    lr = a.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(ops.infonce_ref(lr, c, TAU), (lr,))
    _compare_rows(ga, gr, 3)


@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck(symmetric):
    a, c = make_inputs(7, 33, torch.float32)
    a.requires_grad_(True)
    c.requires_grad_(True)
    torch.library.opcheck(torch.ops.advcal.infonce_fwd.default, (a, c, TAU, symmetric))
    _, rn_a, rn_c, lse_r, lse_c = torch.ops.advcal.infonce_fwd(a, c, TAU, symmetric)
    args = (torch.tensor(1.3), a.detach(), c.detach(), rn_a, rn_c, lse_r, lse_c, TAU, symmetric)
    torch.library.opcheck(torch.ops.advcal.infonce_bwd.default, (*args, True, True))


def test_compile_fullgraph():
    a, c = make_inputs(7, 33, torch.float32)
    f = torch.compile(lambda a, c: NCE._infonce_op(a, c, TAU, symmetric=True), fullgraph=True)
    la = a.clone().requires_grad_(True)
    out = f(la, c)
    out.backward()
    lr = a.clone().requires_grad_(True)
    ref = ops.infonce_ref(lr, c, TAU, symmetric=True)
    ref.backward()
    assert_close_to_ref(out, ref)
    assert_close_to_ref(la.grad, lr.grad)


def test_compile_fullgraph_public_cpu_path(monkeypatch):
    """The CPU path (an autograd.Function over the ops; forced: this shape is below
    CPU_MIN_MACS) compiles with fullgraph."""
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cpu")
    a, c = make_inputs(7, 33, torch.float32)
    assert _dispatch.select("infonce", a, c, TAU).name == "cpu"
    f = torch.compile(lambda a, c: ops.infonce(a, c, TAU, symmetric=True), fullgraph=True)
    la, lc = a.clone().requires_grad_(True), c.clone().requires_grad_(True)
    out = f(la, lc)
    out.backward()
    ra, rc = a.clone().requires_grad_(True), c.clone().requires_grad_(True)
    ref = ops.infonce_ref(ra, rc, TAU, symmetric=True)
    ref.backward()
    assert_close_to_ref(out, ref)
    assert_close_to_ref(la.grad, ra.grad)
    assert_close_to_ref(lc.grad, rc.grad)


def test_dispatch_and_errors(monkeypatch):
    a, c = make_inputs(128, 256, torch.float32)  # above CPU_MIN_MACS (B^2 D = 4.2M)
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    assert set(_dispatch.describe()["infonce"]) == {"triton", "cpu", "ref"}
    assert _dispatch.chosen_by_device("cpu")["infonce"] == "cpu"
    assert _dispatch.select("infonce", a, c, TAU).name == "cpu"
    small = make_inputs(64, 128, torch.float32)  # 0.5M: the reference, unless forced
    assert "CPU_MIN_MACS" in NCE._why_not_infonce_cpu(*small, TAU)
    assert _dispatch.select("infonce", *small, TAU).name == "ref"
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cpu")
    assert _dispatch.select("infonce", *small, TAU).name == "cpu"
    monkeypatch.delenv(_dispatch.BACKEND_ENV)
    assert _dispatch.select("infonce", a.half(), c.half(), TAU).name == "ref"
    assert _dispatch.select("infonce", a, c.bfloat16(), TAU).name == "ref"  # mixed dtypes
    assert_close_to_ref(ops.infonce(a, c, TAU), ops.infonce_ref(a, c, TAU))
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "triton")
    with pytest.raises(_dispatch.BackendUnavailableError, match="cpu"):
        ops.infonce(a, c, TAU)
    with pytest.raises(ValueError, match="z_clean"):
        ops.infonce(a, c[:5], TAU)
    with pytest.raises(ValueError, match="tau"):
        ops.infonce(a, c, -1.0)


def test_float16_goes_to_the_reference_and_kernels_refuse_it(monkeypatch):
    """InfoNCE's dS = w p_ij / |c_j| (w = 1/B) is far below fp16's normal range at real batch
    sizes (~1e-10 at B=16384): the Triton backend declines fp16, the launchers refuse it."""
    from advcal.kernels import infonce as kernels

    a, c = (t.half() for t in make_inputs(7, 33, torch.float32))
    reason = NCE._why_not_infonce(a, c, TAU)
    assert reason is not None and "float16" in reason
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    assert _dispatch.select("infonce", a, c, TAU).name == "ref"
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "triton")
    with pytest.raises(_dispatch.BackendUnavailableError, match="float16"):
        ops.infonce(a, c, TAU)
    v = torch.ones(7)
    with pytest.raises(TypeError, match=r"torch\.float16"):
        kernels.grad(a, c, v, v, v, None, torch.tensor(1.0), 1 / 7, 0.0, TAU)
    with pytest.raises(TypeError, match=r"torch\.float16"):
        kernels.lse(a, c, v, v, TAU)


def test_wide_rows_go_to_the_reference():
    """D=2048 (D_PAD > 1024): the Triton backend declines it, the launcher refuses it."""
    from advcal.kernels import infonce as kernels

    a, c = make_inputs(3, 2048, torch.float32)
    assert "D=2048" in NCE._why_not_infonce(a, c, TAU)
    v = torch.ones(3)
    with pytest.raises(ValueError, match="D=2048"):
        kernels.grad(a, c, v, v, v, None, torch.tensor(1.0), 1 / 3, 0.0, TAU)


# -------------------------------------------------------- shared memory of every launch config


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 33, 300, 384, 513, 1000, 1024])
def test_launch_configs_fit_sm90_shared_memory(d, dtype):
    """Every config the launchers pick fits H100/H200's 227 KiB per block (the estimate is an
    upper bound: test_aot_compiled_shared_memory checks it against the compiler)."""
    from advcal.kernels import _common
    from advcal.kernels import infonce as kernels

    for name, cfg in kernels.configs(dtype, d).items():
        assert cfg.smem <= _common.SMEM_LIMIT, (name, d, dtype, cfg)


def test_launchers_use_the_checked_configs():
    """The launchers launch exactly what configs() reports (so the guard covers them)."""
    from advcal.kernels import _aot
    from advcal.kernels import infonce as kernels

    for dtype in DTYPES:
        for d in (33, 300, 1024):
            launches = [x for x, _ in _aot.launches_of_width(d, dtype) if x.kernel.__module__
                        == kernels.__name__]  # fmt: skip
            cfgs = kernels.configs(dtype, d)
            assert [x.name for x in launches] == list(cfgs)
            for launch in launches:
                cfg = cfgs[launch.name].kwargs()
                assert {k: launch.meta[k] for k in cfg} == cfg


def test_aot_compiled_shared_memory():
    """Compile the widest grad launches for sm_90 (no GPU needed: Triton's bundled ptxas) and
    check the real shared memory: within the limit and within the estimate."""
    from advcal.kernels import _aot, _common

    if INTERP:
        pytest.skip("the interpreter replaces the kernels")
    if not _aot.aot_available():
        pytest.skip("Triton's CUDA backend / its ptxas is not installed")
    for dtype in DTYPES:
        for launch, est in _aot.launches_of_width(1024, dtype):
            if launch.name == "_grad_kernel":
                compiled = _aot.compile_launch(launch, arch=90)
                assert compiled.shared <= min(est, _common.SMEM_LIMIT), (dtype, compiled, est)


# ------------------------------------------------------- Triton kernels under the interpreter


def _kernel_path(a, c, tau, *, symmetric=False):
    """The CUDA implementations of the custom ops called directly on CPU tensors."""
    loss, rn_a, rn_c, lse_r, lse_c = NCE._infonce_fwd_cuda(a, c, tau, symmetric)

    class _Loss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a_, c_):
            return loss.clone()

        @staticmethod
        def backward(ctx, grad):
            return NCE._infonce_bwd_cuda(
                grad, a, c, rn_a, rn_c, lse_r, lse_c, tau, symmetric, True, True
            )

    return _Loss.apply(a, c)


interp = pytest.mark.skipif(
    not INTERP, reason="runs in the TRITON_INTERPRET=1 subprocess of test_kernels_in_interpreter"
)


@interp
def test_interp_is_active():
    from advcal.kernels import infonce as kernels
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(kernels._grad_kernel, InterpretedFunction)


@interp
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bsz", "d"), INTERP_SHAPES)
def test_interp_kernels_vs_ref(bsz, d, dtype, symmetric):
    check(_kernel_path, bsz, d, dtype, symmetric)


@interp
def test_interp_eps_clamp():
    a, c = make_inputs(9, 33, torch.float32)
    a[3] = a[3] / a[3].norm() * 1e-13
    la, lr = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(_kernel_path(la, c, TAU), (la,))
    (gr,) = torch.autograd.grad(ops.infonce_ref(lr, c, TAU), (lr,))
    _compare_rows(ga, gr, 3)


@interp
def test_interp_tolerance_check_rejects_wrong_kernel_gradients():
    g, gref, glow = check(_kernel_path, 65, 300, torch.bfloat16, False)
    for wrong in (torch.zeros_like(g[0]), g[0] * 1.1):
        with pytest.raises(AssertionError):
            assert_close_to_ref(wrong, gref[0], glow[0])


def test_kernels_in_interpreter():
    """Run this file's ``test_interp_*`` tests with TRITON_INTERPRET=1 set before Triton is
    imported; they assert the kernels are InterpretedFunctions (the interpreter really ran)."""
    if INTERP:
        pytest.skip("already inside the interpreter run")
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
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "failed" not in last, tail


# ------------------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bsz", "d"), GPU_SHAPES)
def test_gpu_public_api_vs_ref(bsz, d, dtype, symmetric, monkeypatch):
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    a, c = make_inputs(bsz, d, dtype, "cuda")
    assert _dispatch.select("infonce", a, c, TAU).name == "triton"
    check(ops.infonce, bsz, d, dtype, symmetric, "cuda")


@requires_cuda
def test_gpu_compile_fullgraph():
    a, c = make_inputs(1024, 1024, torch.bfloat16, "cuda")
    a.requires_grad_(True)
    f = torch.compile(lambda a, c: ops.infonce(a, c, TAU), fullgraph=True)
    f(a, c).backward()
    assert torch.isfinite(a.grad).all()
