"""infonce: the tiled path against :func:`advcal.ops.infonce_ref`.

Forward, gradients, opcheck and torch.compile on CPU through the ``advcal::infonce_*`` custom
ops (their CPU kernels); the Triton kernels under ``TRITON_INTERPRET=1`` in a subprocess
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
from tolerances import assert_close_to_ref

import advcal.ops as ops
from advcal.ops import _dispatch

NCE = importlib.import_module("advcal.ops.infonce")  # the module (ops.infonce is the function)
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
TAU = 0.1
DTYPES = [torch.float32, torch.bfloat16]
CPU_SHAPES = [(1, 33), (7, 384), (127, 1024), (257, 33)]
INTERP_SHAPES = [(1, 33), (17, 40), (70, 64)]  # 17/70: one past BLOCK_M, several tiles
GPU_SHAPES = [(b, d) for b in (1, 7, 127, 257, 4099) for d in (33, 384, 1024)]


def make_inputs(bsz, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(bsz, d, generator=g)
    c = a + 0.5 * torch.randn(bsz, d, generator=g)  # positives correlate, like clean vs adv
    return a.to(device=device, dtype=dtype), c.to(device=device, dtype=dtype)


def check(impl, bsz, d, dtype, symmetric, device="cpu"):
    """Loss and both input gradients of ``impl`` vs the fp32 reference on the same inputs."""
    a, c = make_inputs(bsz, d, dtype, device)

    def run(fn, a_, c_):
        la, lc = (t.detach().clone().requires_grad_(True) for t in (a_, c_))
        out = fn(la, lc, TAU, symmetric=symmetric)
        return out.detach(), torch.autograd.grad(out * 1.7, (la, lc))

    out, g = run(impl, a, c)
    ref, gref = run(ops.infonce_ref, a.float(), c.float())
    low, glow = None, (None, None)
    if dtype != torch.float32:
        low, glow = run(ops.infonce_ref, a, c)
        low = low.to(dtype)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert_close_to_ref(out, ref, low)
    for got, want, lp in zip(g, gref, glow, strict=True):
        assert got.dtype == dtype
        assert_close_to_ref(got, want, lp)


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


def test_frozen_clean_side_and_eps_clamp():
    a, c = make_inputs(9, 33, torch.float32)
    a[3] = a[3] / a[3].norm() * 1e-13  # below eps: F.normalize divides by eps
    la = a.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(NCE._infonce_op(la, c, TAU), (la,))
    lr = a.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(ops.infonce_ref(lr, c, TAU), (lr,))
    torch.testing.assert_close(ga, gr, rtol=1e-5, atol=1e-5)


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
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(la.grad, lr.grad, rtol=1e-5, atol=1e-5)


def test_dispatch_and_errors(monkeypatch):
    a, c = make_inputs(7, 33, torch.float32)
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    assert set(_dispatch.describe()["infonce"]) == {"triton", "ref"}
    assert _dispatch.select("infonce", a, c, TAU).name == "ref"
    torch.testing.assert_close(ops.infonce(a, c, TAU), ops.infonce_ref(a, c, TAU))
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "triton")
    with pytest.raises(_dispatch.BackendUnavailableError, match="cpu"):
        ops.infonce(a, c, TAU)
    with pytest.raises(ValueError, match="z_clean"):
        ops.infonce(a, c[:5], TAU)
    with pytest.raises(ValueError, match="tau"):
        ops.infonce(a, c, -1.0)


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
    torch.testing.assert_close(ga, gr, rtol=1e-5, atol=1e-5)


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
