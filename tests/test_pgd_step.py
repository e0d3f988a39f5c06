"""advcal.ops.pgd_step_ / random_start_: kernel vs reference, invariants, opcheck, compile,
errors. Extension-specific tests skip (with the reason) when advcal._C is not built; the rest
then exercise the reference path."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, requires_cuda
from tolerances import assert_close_to_ref

from advcal import _ext
from advcal.ops import _dispatch
from advcal.ops.pgd_step import pgd_step_, pgd_step_ref_, random_start_, random_start_ref_

requires_ext = pytest.mark.skipif(
    not _ext.available(), reason=f"advcal._C not built: {_ext.why_unavailable()}"
)

# 1, primes, one past the CPU SIMD widths (4/8/16 floats) and the CUDA tile (4096).
SHAPES = [(1,), (2,), (5,), (17,), (3, 7, 11), (2, 3, 31, 31), (3, 4097), (1, 65537)]
LOWP = [torch.bfloat16, torch.float16]
EPS, ALPHA = 8 / 255, 2 / 255


def make(shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g)
    x = (x0 + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, grad, x0)]


def naive_lowp(x, g, x0, norm, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0):
    """Plain PyTorch at the tensors' own precision (the baseline error for low precision)."""
    x = x.clone()
    if norm == "linf":
        x.add_(torch.sign(g), alpha=alpha)
        x.copy_(torch.minimum(torch.maximum(x, x0 - eps), x0 + eps))
    else:
        gn = g.reshape(len(g), -1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))
        x.add_(g / gn, alpha=alpha)
        d = x - x0
        dn = d.reshape(len(d), -1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (d.dim() - 1))
        x.copy_(x0 + d * torch.clamp(eps / dn, max=1.0))
    return x.clamp_(lo, hi)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_bit_exact_vs_ref(shape, norm):
    x, g, x0 = make(shape)
    ref = x.clone()
    pgd_step_ref_([ref], [g], [x0], alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    out = x.clone()
    pgd_step_(out, g, x0, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    assert torch.equal(out, ref)
    assert not torch.equal(out, x)  # the step did something


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("shape", [(5,), (3, 7, 11), (2, 3, 31, 31), (3, 4097)])
def test_lowp_vs_fp32_ref(shape, dtype, norm):
    x, g, x0 = make(shape, dtype)
    ref32 = x.float()
    pgd_step_ref_(
        [ref32], [g.float()], [x0.float()], alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm
    )
    out = x.clone()
    pgd_step_(out, g, x0, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    assert out.dtype == dtype
    assert_close_to_ref(out, ref32, naive_lowp(x, g, x0, norm))
    # and on CPU the kernel performs the reference's operations exactly, at any dtype
    same = x.clone()
    pgd_step_ref_([same], [g], [x0], alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    assert torch.equal(out, same)


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
@pytest.mark.parametrize("shape", [(17,), (4, 3, 9, 9)])
def test_linf_stays_in_ball_and_range(shape, dtype):
    x, g, x0 = make(shape, dtype)
    for _ in range(5):
        pgd_step_(x, g, x0, alpha=0.1, eps=EPS, lo=0.0, hi=1.0)
        g = torch.randn(shape).to(dtype)
    assert x.min() >= 0 and x.max() <= 1
    # the bounds as the kernel computes them: fp32, rounded once to the storage dtype
    assert (x >= (x0.float() - EPS).to(dtype)).all()
    assert (x <= (x0.float() + EPS).to(dtype)).all()


@pytest.mark.parametrize("shape", [(3, 17), (4, 3, 9, 9), (2, 4097)])
def test_l2_lands_on_or_inside_ball(shape):
    x, g, x0 = make(shape)
    x.copy_(x0)
    # big step, no range clamp: every sample is projected back onto the sphere
    pgd_step_(x, g, x0, alpha=10.0, eps=0.5, norm="l2")
    n = (x - x0).reshape(len(x), -1).norm(dim=1)
    torch.testing.assert_close(n, torch.full_like(n, 0.5), rtol=1e-5, atol=0)
    # small step: inside the ball, unchanged direction
    x.copy_(x0)
    pgd_step_(x, g, x0, alpha=0.01, eps=0.5, norm="l2")
    n = (x - x0).reshape(len(x), -1).norm(dim=1)
    assert (n <= 0.5 * (1 + 1e-6)).all()
    torch.testing.assert_close(n, torch.full_like(n, 0.01), rtol=1e-4, atol=0)
    # with the range clamp the norm can only shrink (x0 lies in [lo, hi])
    pgd_step_(x, g, x0, alpha=10.0, eps=0.5, lo=0.0, hi=1.0, norm="l2")
    n = (x - x0).reshape(len(x), -1).norm(dim=1)
    assert (n <= 0.5 * (1 + 1e-5)).all() and x.min() >= 0 and x.max() <= 1


def test_list_mixing_dtypes_shapes_and_per_tensor_args():
    specs = [
        ((3, 5), torch.float32),
        ((2, 7, 3), torch.bfloat16),
        ((17,), torch.float16),
        ((1,), torch.float32),
    ]
    xs, gs, x0s = zip(*[make(s, d, seed=i) for i, (s, d) in enumerate(specs)], strict=True)
    alpha, eps = [0.01, 0.02, 0.03, 0.04], [0.05, 0.1, 0.15, 0.2]
    lo, hi = [0.0, None, -1.0, None], [1.0, 0.9, None, None]
    for norm in ("linf", "l2"):
        ref = [x.clone() for x in xs]
        pgd_step_ref_(ref, gs, x0s, alpha=alpha, eps=eps, lo=lo, hi=hi, norm=norm)
        out = [x.clone() for x in xs]
        pgd_step_(out, list(gs), list(x0s), alpha=alpha, eps=eps, lo=lo, hi=hi, norm=norm)
        for o, r in zip(out, ref, strict=True):
            assert torch.equal(o, r)


def test_zero_grad_and_empty_tensors():
    x, g, x0 = make((3, 4))
    out = x.clone()
    pgd_step_(
        [out, torch.empty(0, 3)],
        [torch.zeros_like(g), torch.empty(0, 3)],
        [x0, torch.empty(0, 3)],
        alpha=ALPHA,
        eps=1.0,
        lo=0.0,
        hi=1.0,
    )
    assert torch.equal(out, x)
    pgd_step_([], [], [], alpha=ALPHA, eps=EPS)  # no-op


# ----------------------------------------------------------------------- random start


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
@pytest.mark.parametrize("shape", [(1,), (17,), (3, 5, 7), (2, 4097)])
def test_random_start_matches_ref_and_bounds(shape, dtype, norm):
    _, _, x0 = make(shape, dtype)
    ref, out = torch.full_like(x0, -7.0), torch.full_like(x0, -7.0)  # poisoned
    random_start_ref_(
        [ref], [x0], eps=EPS, lo=0.0, hi=1.0, norm=norm, generator=torch.Generator().manual_seed(5)
    )
    random_start_(
        out, x0, eps=EPS, lo=0.0, hi=1.0, norm=norm, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(out, ref)  # same draws, same arithmetic
    assert out.min() >= 0 and out.max() <= 1
    if norm == "linf":
        assert (out >= (x0.float() - EPS).to(dtype)).all()
        assert (out <= (x0.float() + EPS).to(dtype)).all()
    else:
        n = (out.float() - x0.float()).reshape(len(out), -1).norm(dim=1)
        assert (n <= EPS * 1.01).all()


def test_random_start_covers_the_box():
    x0 = torch.full((100_000,), 0.5)
    out = torch.empty_like(x0)
    random_start_(out, x0, eps=0.25, generator=torch.Generator().manual_seed(0))
    d = out - x0
    assert d.min() < -0.24 and d.max() > 0.24 and abs(d.mean()) < 0.01


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grad": "short"}, r"grad has 1 tensors but x_adv has 2"),
        ({"grad": "shape"}, r"grad\[1\] has shape \(3, 5\) but x_adv\[1\] has \(3, 4\)"),
        ({"grad": "dtype"}, r"grad\[1\] has dtype torch.float16 but x_adv\[1\]"),
        ({"eps": -1.0}, r"eps\[0\] = -1.0 must be >= 0"),
        ({"alpha": [0.1]}, r"alpha has 1 entries for 2 tensors"),
        ({"lo": 1.0, "hi": 0.0}, r"lo\[0\] = 1.0 > hi\[0\] = 0.0"),
        ({"norm": "l1"}, r"norm must be 'linf' or 'l2'"),
        ({"x": "int"}, r"x_adv\[0\] has dtype torch.int64"),
    ],
)
def test_python_errors_name_the_argument(kwargs, match):
    xs = [torch.rand(2, 4), torch.rand(3, 4)]
    gs = [torch.randn(2, 4), torch.randn(3, 4)]
    x0s = [x.clone() for x in xs]
    if kwargs.get("x") == "int":
        xs[0], gs[0], x0s[0] = (torch.ones(2, 4, dtype=torch.int64) for _ in range(3))
    g = kwargs.get("grad")
    if g == "short":
        gs = gs[:1]
    elif g == "shape":
        gs[1] = torch.randn(3, 5)
    elif g == "dtype":
        gs[1] = gs[1].half()
    args = {"alpha": 0.1, "eps": 0.1, "lo": None, "hi": None, "norm": "linf"}
    args.update({k: v for k, v in kwargs.items() if k in args})
    with pytest.raises(ValueError, match=match):
        pgd_step_(xs, gs, x0s, **args)


@requires_ext
@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.update(g=[a["g"][0]]), r"grad has 1 entries but x_adv has 2"),
        (lambda a: a.update(alpha=[0.1]), r"alpha has 1 entries"),
        (lambda a: a["g"].__setitem__(1, torch.randn(3, 5)), r"grad\[1\] has shape"),
        (lambda a: a["x0"].__setitem__(0, a["x0"][0].double()), r"x_orig\[0\] has dtype Double"),
        (lambda a: a["g"].__setitem__(0, torch.randn(4, 2).t()), r"grad\[0\] is not contiguous"),
        (lambda a: a.update(eps=[0.1, -0.5]), r"eps\[1\] = -0.5 must be >= 0"),
        (lambda a: a.update(norm="l1"), r"norm must be 'linf' or 'l2'"),
    ],
)
def test_cpp_checks_name_the_argument(mutate, match):
    a = {
        "x": [torch.rand(2, 4), torch.rand(3, 4)],
        "g": [torch.randn(2, 4), torch.randn(3, 4)],
        "x0": [torch.rand(2, 4), torch.rand(3, 4)],
        "alpha": [0.1, 0.1],
        "eps": [0.1, 0.1],
        "norm": "linf",
    }
    mutate(a)
    inf = math.inf
    with pytest.raises(RuntimeError, match=match):
        torch.ops.advcal.pgd_step_(
            a["x"], a["g"], a["x0"], a["alpha"], a["eps"], [-inf] * 2, [inf] * 2, a["norm"]
        )


# --------------------------------------------------------------- dispatch and fallback


def test_forced_ref_backend_gives_same_result(monkeypatch):
    x, g, x0 = make((3, 33))
    a, b = x.clone(), x.clone()
    pgd_step_(a, g, x0, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0)
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "ref")
    assert (
        _dispatch.select("pgd_step_", [b], [g], [x0], [ALPHA], [EPS], [0.0], [1.0], "linf").name
        == "ref"
    )
    pgd_step_(b, g, x0, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0)
    assert torch.equal(a, b)


def test_forced_cuda_backend_on_cpu_raises(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cuda")
    x, g, x0 = make((4,))
    with pytest.raises(_dispatch.BackendUnavailableError, match=r"cannot run advcal\.pgd_step_"):
        pgd_step_(x, g, x0, alpha=ALPHA, eps=EPS)


@requires_ext
def test_cpu_tensors_use_the_cpp_kernel():
    x, g, x0 = make((4,))
    backend = _dispatch.select("pgd_step_", [x], [g], [x0], [ALPHA], [EPS], [0.0], [1.0], "linf")
    assert backend.name == "cpp"


def test_works_with_one_warning_when_extension_missing():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import advcal.ops as o\n"
        "    x = torch.rand(5); g = torch.randn(5); x0 = x.clone()\n"
        "    for _ in range(3):\n"
        "        o.pgd_step_(x, g, x0, alpha=0.1, eps=0.1)\n"
        "        o.random_start_(x, x0, eps=0.1)\n"
        "msgs = [str(m.message) for m in w if 'advcal._C' in str(m.message)]\n"
        "assert len(msgs) == 1 and 'ADVCAL_DISABLE_EXT' in msgs[0], msgs\n"
        "assert (x - x0).abs().max() <= 0.1\n"
    )
    env = {**os.environ, "ADVCAL_DISABLE_EXT": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]


# --------------------------------------------------------------- opcheck and compile


@requires_ext
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_opcheck_pgd_step(norm):
    x, g, x0 = make((3, 7, 5))
    x2, g2, x02 = make((4, 9), torch.bfloat16, seed=1)
    args = (
        [x, x2],
        [g, g2],
        [x0, x02],
        [ALPHA, 0.1],
        [EPS, 0.2],
        [0.0, -math.inf],
        [1.0, math.inf],
        norm,
    )
    torch.library.opcheck(torch.ops.advcal.pgd_step_.default, args)


@requires_ext
def test_opcheck_random_start():
    _, _, x0 = make((3, 7))
    args = ([torch.empty_like(x0)], [x0], [EPS], [0.0], [1.0], "linf", None)
    # no test_schema/aot checks that run the op twice and compare: it draws fresh numbers
    torch.library.opcheck(
        torch.ops.advcal.random_start_.default, args, test_utils=("test_faketensor",)
    )


@requires_ext
def test_compile_fullgraph_op():
    x, g, x0 = make((4, 3, 8, 8))
    inf = math.inf

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, g, x0):
        torch.ops.advcal.pgd_step_([x], [g * 2.0], [x0], [ALPHA], [EPS], [0.0], [inf], "linf")
        return x.sum()

    a, b = x.clone(), x.clone()
    step(a, g, x0)
    pgd_step_ref_([b], [g * 2.0], [x0], alpha=ALPHA, eps=EPS, lo=0.0, hi=None)
    assert torch.equal(a, b)


def test_compile_fullgraph_public():
    x, g, x0 = make((4, 9))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, g, x0):
        pgd_step_(x, g, x0, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm="l2")
        return x

    a, b = x.clone(), x.clone()
    step(a, g, x0)
    pgd_step_ref_([b], [g], [x0], alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm="l2")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------- CUDA


@requires_cuda
@requires_ext
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_kernel_vs_ref(shape, dtype, norm):
    if not _ext.has_kernel("pgd_step_", "CUDA"):
        pytest.skip("advcal._C built without CUDA kernels")
    x, g, x0 = make(shape, dtype, device="cuda")
    ref = x.clone()
    pgd_step_ref_([ref], [g], [x0], alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    out = x.clone()
    pgd_step_(out, g, x0, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    if norm == "linf":
        assert torch.equal(out, ref)  # elementwise, same operations: bit-exact
    else:  # per-sample norms reduced in another order; d stored in x's dtype
        ref32 = x.float()
        pgd_step_ref_(
            [ref32], [g.float()], [x0.float()], alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm
        )
        assert_close_to_ref(
            out, ref32, None if dtype == torch.float32 else naive_lowp(x, g, x0, norm)
        )
    again = x.clone()
    pgd_step_(again, g, x0, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    assert torch.equal(out, again)  # deterministic (no float atomics)


@requires_cuda
@requires_ext
def test_cuda_random_start_bounds_and_determinism():
    if not _ext.has_kernel("random_start_", "CUDA"):
        pytest.skip("advcal._C built without CUDA kernels")
    x0 = torch.rand(3, 4099, device="cuda")
    a, b = torch.empty_like(x0), torch.empty_like(x0)
    random_start_(a, x0, eps=EPS, lo=0.0, hi=1.0, generator=torch.Generator("cuda").manual_seed(1))
    random_start_(b, x0, eps=EPS, lo=0.0, hi=1.0, generator=torch.Generator("cuda").manual_seed(1))
    assert torch.equal(a, b)
    assert ((a - x0).abs() <= EPS + 1e-7).all() and a.min() >= 0 and a.max() <= 1
    d = (torch.empty(1_000_000, device="cuda"), torch.full((1_000_000,), 0.5, device="cuda"))
    random_start_(d[0], d[1], eps=0.25)
    u = d[0] - 0.5
    assert u.min() < -0.249 and u.max() > 0.249 and abs(u.mean().item()) < 1e-3
