"""advcal.ops.pgd_step_ / random_start_: kernel vs reference, invariants, opcheck, compile,
errors. Extension-specific tests skip (with the reason) when advcal._C is not built; the rest
then exercise the reference path."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

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


def requires_cuda_kernel(op="pgd_step_"):
    if not _ext.has_kernel(op, "CUDA"):
        pytest.skip("advcal._C built without CUDA kernels")


def offset_view(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of ``t`` living at storage offset ``offset`` (a ``buf[offset:]`` view)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    v = buf[offset:].view(t.shape)
    v.copy_(t)
    assert v.is_contiguous() and v.storage_offset() == offset
    return v


# per-tensor arguments for long lists (more tensors than one CUDA launch takes: 24)
LONG_SPECS = [
    ((3, 5), torch.float32),
    ((2, 7, 3), torch.bfloat16),
    ((17,), torch.float16),
    ((1,), torch.float32),
    ((4, 3, 8, 8), torch.float32),
    ((2, 4097), torch.bfloat16),
    ((5, 9), torch.float16),
    ((1, 33), torch.float32),
] * 4  # 32 tensors: two launches


def long_list(device="cpu"):
    xs, gs, x0s = zip(
        *[make(sh, dt, seed=i, device=device) for i, (sh, dt) in enumerate(LONG_SPECS)],
        strict=True,
    )
    n = len(xs)
    kw = {
        "alpha": [0.01 * (1 + i % 5) for i in range(n)],
        "eps": [0.03 * (1 + i % 7) for i in range(n)],
        "lo": [None if i % 3 == 2 else 0.0 for i in range(n)],
        "hi": [None if i % 4 == 3 else 1.0 for i in range(n)],
    }
    return list(xs), list(gs), list(x0s), kw


# NaN semantics (pgd_step_ref_'s docstring): B = 5 samples; an inf in grad of sample 0, a NaN
# in grad of sample 1, in x of sample 2, in x_orig of sample 3; sample 4 clean.
NAN_AT = {"g_inf": (0, 1, 1), "g": (1, 2, 3), "x": (2, 0, 0), "x0": (3, 4, 6)}


def nan_inputs(dtype=torch.float32, device="cpu"):
    x, g, x0 = make((5, 5, 7), dtype, device=device)
    g[NAN_AT["g_inf"]] = math.inf
    g[NAN_AT["g"]] = math.nan
    x[NAN_AT["x"]] = math.nan
    x0[NAN_AT["x0"]] = math.nan
    return x, g, x0


def expected_nan_mask(norm, shape=(5, 5, 7)):
    mask = torch.zeros(shape, dtype=torch.bool)
    if norm == "linf":  # elementwise, from x and x0; sign(NaN grad) = 0, sign(inf) = 1
        for k in ("x", "x0"):
            mask[NAN_AT[k]] = True
    else:  # the whole sample: samples 0 (inf * 0) to 3
        mask[:4] = True
    return mask


def assert_nan_grad_element_did_not_step(out, x, x0, eps=EPS, lo=0.0, hi=1.0):
    """L-inf: the element with a NaN gradient stays at x, projected into the ball and range."""
    i = NAN_AT["g"]
    xf, x0f = x[i].float(), x0[i].float()
    want = torch.minimum(torch.maximum(xf, x0f - eps), x0f + eps).clamp(lo, hi).to(out.dtype)
    assert torch.equal(out[i], want)


def assert_finite_part_in_ball(out, x0, norm, eps=EPS, lo=0.0, hi=1.0):
    """Every non-NaN element (L-inf) or sample (L2) lies in [lo, hi] and in the eps-ball."""
    if norm == "linf":
        ok = ~torch.isnan(out)
        o, o0 = out[ok], x0[ok]
        assert o.min() >= lo and o.max() <= hi
        assert (o >= (o0.float() - eps).to(out.dtype)).all()
        assert (o <= (o0.float() + eps).to(out.dtype)).all()
        return
    ok = ~torch.isnan(out).reshape(len(out), -1).any(dim=1)
    o, o0 = out[ok].float(), x0[ok].float()
    assert torch.isfinite(o).all() and o.min() >= lo and o.max() <= hi
    n = (o - o0).reshape(len(o), -1).norm(dim=1)
    assert (n <= eps * (1 + 1e-5)).all()


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


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ref_nan_semantics(norm):
    """Pins the reference's documented NaN semantics: NaN where torch's ops put it, never a
    finite value outside the eps-ball or the range."""
    x, g, x0 = nan_inputs()
    out = x.clone()
    pgd_step_ref_([out], [g], [x0], alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    assert torch.equal(torch.isnan(out), expected_nan_mask(norm))
    assert_finite_part_in_ball(out, x0, norm)
    if norm == "linf":
        assert_nan_grad_element_did_not_step(out, x, x0)


@requires_ext
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
def test_cpp_nan_semantics_match_ref(norm, dtype):
    x, g, x0 = nan_inputs(dtype)
    ref, out = x.clone(), x.clone()
    pgd_step_ref_([ref], [g], [x0], alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    inf = math.inf
    torch.ops.advcal.pgd_step_([out], [g], [x0], [ALPHA], [EPS], [0.0], [1.0], norm)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    # unbounded range: NaN still stays NaN (no clamp to hide it)
    ref, out = x.clone(), x.clone()
    pgd_step_ref_([ref], [g], [x0], alpha=ALPHA, eps=EPS, norm=norm)
    torch.ops.advcal.pgd_step_([out], [g], [x0], [ALPHA], [EPS], [-inf], [inf], norm)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.isnan(out), expected_nan_mask(norm))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offsets", [(1, 1, 1), (1, 2, 3), (0, 3, 0)])
def test_misaligned_views_match_ref(offsets, dtype, norm):
    x, g, x0 = make((3, 4099), dtype)
    ref = x.clone()
    pgd_step_ref_([ref], [g], [x0], alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    xv, gv, x0v = (offset_view(t, o) for t, o in zip((x, g, x0), offsets, strict=True))
    pgd_step_(xv, gv, x0v, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    assert torch.equal(xv, ref)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_long_mixed_list_matches_ref(norm):
    xs, gs, x0s, kw = long_list()
    ref = [x.clone() for x in xs]
    pgd_step_ref_(ref, gs, x0s, norm=norm, **kw)
    out = [x.clone() for x in xs]
    pgd_step_(out, gs, x0s, norm=norm, **kw)
    for i, (o, r) in enumerate(zip(out, ref, strict=True)):
        assert torch.equal(o, r), i


# Sizes that put the CPU kernel's thread chunks (one range over the whole list, >= 128K
# elements each) in the middle of tensors and of samples, mixed dtypes: ~420K elements.
SPLIT_SPECS = [
    ((3, 40001), torch.float32),
    ((1,), torch.float32),
    ((5, 7, 1009), torch.bfloat16),
    ((2, 33333), torch.float16),
    ((4, 3, 97, 101), torch.float32),
    ((7, 17), torch.bfloat16),
    ((2, 65537), torch.float32),
]


@requires_ext
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_list_split_across_threads_matches_ref(norm, threads):
    """The CPU kernel splits the concatenated list over threads: any split gives the
    reference's result bit for bit, every dtype, L-inf and L2 (whose per-sample factors
    cross chunk boundaries)."""
    xs, gs, x0s = zip(
        *[make(sh, dt, seed=i) for i, (sh, dt) in enumerate(SPLIT_SPECS)], strict=True
    )
    kw = {"alpha": 0.02, "eps": 0.05, "lo": [0.0, None] * 3 + [0.1], "hi": 1.0, "norm": norm}
    ref = [x.clone() for x in xs]
    pgd_step_ref_(ref, gs, x0s, **kw)
    out = [x.clone() for x in xs]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        pgd_step_(out, list(gs), list(x0s), **kw)
    finally:
        torch.set_num_threads(before)
    for i, (o, r) in enumerate(zip(out, ref, strict=True)):
        assert torch.equal(o, r), (i, SPLIT_SPECS[i])


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
        ({"lo": math.nan}, r"lo\[0\] = nan.*must not be NaN"),
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
        (lambda a: a.update(hi=[1.0, math.nan]), r"hi\[1\] = nan: bounds must not be NaN"),
    ],
)
def test_cpp_checks_name_the_argument(mutate, match):
    a = {
        "x": [torch.rand(2, 4), torch.rand(3, 4)],
        "g": [torch.randn(2, 4), torch.randn(3, 4)],
        "x0": [torch.rand(2, 4), torch.rand(3, 4)],
        "alpha": [0.1, 0.1],
        "eps": [0.1, 0.1],
        "lo": [-math.inf] * 2,
        "hi": [math.inf] * 2,
        "norm": "linf",
    }
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.advcal.pgd_step_(
            a["x"], a["g"], a["x0"], a["alpha"], a["eps"], a["lo"], a["hi"], a["norm"]
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


@requires_ext
@pytest.mark.parametrize("forced", [None, "cpp", "ref"])
def test_compile_follows_forced_backend(monkeypatch, forced):
    """Under torch.compile the backend is chosen as in eager, ADVCAL_BACKEND included."""
    if forced is None:
        monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(_dispatch.BACKEND_ENV, forced)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, g, x0 = make((4, 9))
    torch._dynamo.reset()
    try:

        @torch.compile(fullgraph=True, backend=record)
        def step(x, g, x0):
            pgd_step_(x, g, x0, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0)
            return x

        a, b = x.clone(), x.clone()
        step(a, g, x0)
    finally:
        torch._dynamo.reset()
    pgd_step_ref_([b], [g], [x0], alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0)
    assert torch.equal(a, b)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes}
    assert any("advcal.pgd_step_" in t for t in targets) == (forced != "ref"), targets


def test_compile_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cuda")
    x, g, x0 = make((4,))
    torch._dynamo.reset()
    try:

        @torch.compile(fullgraph=True, backend="aot_eager")
        def step(x, g, x0):
            pgd_step_(x, g, x0, alpha=ALPHA, eps=EPS)
            return x

        with pytest.raises(Exception, match=r"ADVCAL_BACKEND=cuda cannot run advcal\.pgd_step_"):
            step(x, g, x0)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------- CUDA


# B > 1 with a per-sample size divisible by 8: the L2 vector path (and one tile exactly, and
# one past it); SHAPES has the scalar L2 path (per-sample sizes not divisible by 4).
CUDA_SHAPES = [*SHAPES, (4, 3, 32, 32), (8, 4096), (3, 8200)]


def assert_cuda_matches_ref(out, x, g, x0, norm, **kw):
    """L-inf: bit-exact vs the reference; L2: close to the fp32 reference (norms reduced in
    another order), low precision within the tolerance table's factor of plain PyTorch."""
    kw = {"alpha": ALPHA, "eps": EPS, "lo": 0.0, "hi": 1.0, **kw}
    if norm == "linf":
        ref = x.clone()
        pgd_step_ref_([ref], [g], [x0], norm=norm, **kw)
        assert torch.equal(out, ref)
        return
    ref32 = x.float()
    pgd_step_ref_([ref32], [g.float()], [x0.float()], norm=norm, **kw)
    lowp = None
    if x.dtype != torch.float32:
        lowp = naive_lowp(x, g, x0, norm, kw["alpha"], kw["eps"], kw["lo"], kw["hi"])
    assert_close_to_ref(out, ref32, lowp)


@requires_cuda
@requires_ext
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_kernel_vs_ref(shape, dtype, norm):
    requires_cuda_kernel()
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


@requires_cuda
@requires_ext
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
@pytest.mark.parametrize("offsets", [(1, 1, 1), (3, 3, 3), (1, 2, 3), (0, 1, 0)])
@pytest.mark.parametrize("shape", [(4099,), (4, 3, 32, 32)])
def test_cuda_misaligned_views(shape, offsets, dtype, norm):
    """Storage-offset views: equal offsets take the vector path after a scalar head (L-inf),
    unequal ones the scalar path; the results do not depend on it."""
    requires_cuda_kernel()
    x, g, x0 = make(shape, dtype, device="cuda")
    xv, gv, x0v = (offset_view(t, o) for t, o in zip((x, g, x0), offsets, strict=True))
    pgd_step_(xv, gv, x0v, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    assert_cuda_matches_ref(xv, x, g, x0, norm)
    aligned = x.clone()
    pgd_step_(aligned, g, x0, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    if norm == "linf":
        assert torch.equal(xv, aligned)
    elif dtype == torch.float32:  # scalar vs vector L2 path: another summation order
        torch.testing.assert_close(xv, aligned, rtol=1e-6, atol=1e-7)


@requires_cuda
@requires_ext
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_cuda_long_mixed_list(norm):
    """32 tensors of mixed shapes and dtypes: more than one launch (24 tensors each)."""
    requires_cuda_kernel()
    xs, gs, x0s, kw = long_list("cuda")
    out = [x.clone() for x in xs]
    pgd_step_(out, gs, x0s, norm=norm, **kw)
    for i, (o, x, g, x0) in enumerate(zip(out, xs, gs, x0s, strict=True)):
        one = {k: v[i] for k, v in kw.items()}
        lo = -math.inf if one["lo"] is None else one["lo"]
        hi = math.inf if one["hi"] is None else one["hi"]
        assert_cuda_matches_ref(o, x, g, x0, norm, **{**one, "lo": lo, "hi": hi})
        single = x.clone()
        pgd_step_(single, g, x0, norm=norm, **one)
        assert torch.equal(o, single), i  # the split does not change any tensor's result


@requires_cuda
@requires_ext
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
def test_cuda_nan_semantics_match_ref(norm, dtype):
    """A NaN in grad never moves a sample to lo/hi outside the eps-ball (the reference's
    semantics: NaN where torch's ops put it, the rest updated as usual)."""
    requires_cuda_kernel()
    x, g, x0 = nan_inputs(dtype, "cuda")
    out = x.clone()
    pgd_step_(out, g, x0, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
    assert torch.equal(torch.isnan(out).cpu(), expected_nan_mask(norm))
    assert_finite_part_in_ball(out, x0, norm)
    if norm == "linf":
        assert_nan_grad_element_did_not_step(out, x, x0)
        ref = x.clone()
        pgd_step_ref_([ref], [g], [x0], alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0, norm=norm)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    else:  # the clean sample as the reference computes it
        clean = slice(4, 5)
        assert_cuda_matches_ref(out[clean], x[clean], g[clean], x0[clean], norm)


@requires_cuda
@requires_ext
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_cuda_random_start_l2_and_linf_bounds(norm):
    requires_cuda_kernel("random_start_")
    x0 = torch.rand(6, 3, 33, 33, device="cuda")
    out = torch.full_like(x0, -7.0)
    random_start_(out, x0, eps=EPS, norm=norm, generator=torch.Generator("cuda").manual_seed(3))
    d = (out - x0).reshape(len(out), -1)
    if norm == "linf":
        assert d.abs().max() <= EPS + 1e-7  # + the rounding of x0 + delta
    else:  # radius eps * r, r ~ U(0, 1) per sample, on a uniform direction
        n = d.norm(dim=1)
        assert (n <= EPS * (1 + 1e-4)).all() and (n > 0).all()
        assert len(set(n.tolist())) == len(n)  # a radius per sample
        assert d.mean().abs() < 0.05 * EPS
    clamped = torch.full_like(x0, -7.0)
    random_start_(
        clamped,
        x0,
        eps=EPS,
        lo=0.0,
        hi=1.0,
        norm=norm,
        generator=torch.Generator("cuda").manual_seed(3),
    )
    assert clamped.min() >= 0 and clamped.max() <= 1
    assert torch.equal(clamped, out.clamp(0, 1))  # same draws, clamp last


@requires_cuda
@requires_ext
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_random_start_draws_follow_element_index(norm, dtype):
    """Vector and scalar paths, aligned or not, one launch or several: the same draws."""
    requires_cuda_kernel("random_start_")
    x0s = [torch.rand(s, device="cuda").to(dtype) for s, _ in LONG_SPECS]
    seed = 11

    def run(xs, x0s):
        random_start_(
            xs, x0s, eps=EPS, norm=norm, generator=torch.Generator("cuda").manual_seed(seed)
        )
        return xs

    plain = run([torch.empty_like(t) for t in x0s], x0s)
    views = run(
        [offset_view(torch.empty_like(t), 1) for t in x0s], [offset_view(t, 3) for t in x0s]
    )
    for a, b in zip(plain, views, strict=True):
        assert torch.equal(a, b)


@requires_cuda
@requires_ext
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_cuda_random_start_in_graph_capture(norm):
    """Captured random start: each replay draws afresh from the generator's state at replay
    time, exactly what the eager call draws from the same state."""
    requires_cuda_kernel("random_start_")
    x0 = torch.rand(3, 4099, device="cuda")
    kw = {"eps": EPS, "lo": 0.0, "hi": 1.0, "norm": norm}
    torch.cuda.manual_seed(123)
    eager = torch.full_like(x0, -7.0)
    random_start_(eager, x0, **kw)
    eager_next = torch.full_like(x0, -7.0)
    random_start_(eager_next, x0, **kw)
    static = torch.full_like(x0, -7.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        random_start_(static, x0, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        random_start_(static, x0, **kw)
    torch.cuda.manual_seed(123)
    graph.replay()
    first = static.clone()
    graph.replay()
    second = static.clone()
    torch.cuda.synchronize()
    assert torch.equal(first, eager) and torch.equal(second, eager_next)
    assert not torch.equal(first, second)
    for out in (first, second):
        assert out.min() >= 0 and out.max() <= 1
        d = (out - x0).reshape(len(out), -1)
        if norm == "linf":
            assert d.abs().max() <= EPS + 1e-7  # + the rounding of x0 + delta
        else:
            assert (d.norm(dim=1) <= EPS * (1 + 1e-4)).all()


@requires_ext
def test_strided_gradient_keeps_the_fused_kernel():
    """autograd hands back the gradient of a transposed input as a transposed view: the
    public op copies it once instead of dropping to the reference."""
    torch.manual_seed(3)
    x0 = torch.rand(8, 16, 3)
    g = torch.randn(8, 3, 16).transpose(1, 2)  # strided, as from a (B, C, N) encoder
    assert not g.is_contiguous()
    a, b = x0.clone(), x0.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "using the reference" warning
        pgd_step_(a, g, x0, alpha=0.01, eps=0.03, lo=0.0, hi=1.0)
    pgd_step_ref_(b, g.contiguous(), x0, alpha=0.01, eps=0.03, lo=0.0, hi=1.0)
    assert torch.equal(a, b)


@requires_ext
def test_strided_x_adv_falls_back_with_the_reason(monkeypatch):
    import advcal.ops.pgd_step as mod

    monkeypatch.setattr(mod, "_warned", set())  # the warning is once per process and reason
    x0 = torch.rand(3, 4)
    x = torch.rand(4, 3).t()  # written in place: cannot be copied
    with pytest.warns(RuntimeWarning, match="not contiguous"):
        pgd_step_(x, torch.randn(3, 4), x0, alpha=0.01, eps=0.03, lo=0.0, hi=1.0)
