"""The one table of test tolerances (STYLE rule 7). Tests import from here; nothing else
defines an atol.

Errors are measured against the fp32 reference *relative to the reference's scale*
(``max |ref|`` of the tensor compared), not in absolute units: gradients of a mean loss are
~1e-5..1e-3, so an absolute atol of 1e-5 (fp32) or a 1e-3 floor (bf16) would accept anything,
a zero gradient included. fp32 is tight. For bf16/fp16 a kernel's scaled error must be within
``LOWP_FACTOR`` times the scaled error plain PyTorch makes at the same precision (both against
the fp32 reference), plus a floor of a fraction of one rounding of the output
(:func:`assert_close_to_ref`). Meta-tests in tests/test_head_ce.py and tests/test_infonce.py
prove the check rejects a zero gradient and one 10% too large, in fp32 and bf16.
"""

from __future__ import annotations

import torch

# Elementwise (rtol, atol) for O(1) quantities compared in fp32 (parity fixtures, images).
FP32 = {"rtol": 1e-5, "atol": 1e-5}
# Parity with recorded official outputs (fixtures), fp32.
PARITY_ATOL = 1e-5
# fp32 against the fp32 reference: |out - ref| <= FP32_RTOL |ref| + FP32_SCALE_ATOL max|ref|.
FP32_RTOL = 1e-5
FP32_SCALE_ATOL = 1e-5
# Low precision: max|out - ref| / max|ref| <= LOWP_FACTOR * (the same for PyTorch) + floor.
LOWP_FACTOR = 2.0
# Floors, relative to max|ref| (about 1/4 and 1/10 of one bf16 / fp16 ulp at the scale), for
# outputs PyTorch happens to round exactly (e.g. a 0-dim loss); the same numbers as the former
# absolute floors, so tensors of unit scale (images in [0, 1]) are judged exactly as before.
LOWP_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-4}


def _scale(ref: torch.Tensor) -> float:
    finite = ref[torch.isfinite(ref)]
    s = finite.abs().max().item() if finite.numel() else 0.0
    return s if s > 0 else 1.0  # an all-zero reference: absolute units


def scaled_error(out: torch.Tensor, ref_fp32: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` (NaN/Inf in the same places count as equal)."""
    out, ref = out.float(), ref_fp32.float()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    same_nonfinite = (~torch.isfinite(ref)) & ((out == ref) | (out.isnan() & ref.isnan()))
    if not torch.equal(torch.isfinite(out) | same_nonfinite, torch.ones_like(out, dtype=bool)):
        raise AssertionError("non-finite values where the reference has finite ones")
    diff = torch.where(same_nonfinite, 0.0, (out - ref).abs())
    return diff.max().item() / _scale(ref) if diff.numel() else 0.0


def assert_close_to_ref(
    out: torch.Tensor, ref_fp32: torch.Tensor, torch_lowp: torch.Tensor | None = None
) -> None:
    """fp32 (``torch_lowp`` None): tight, elementwise, with an atol scaled to ``max|ref|``.
    Low precision: the scaled error is at most LOWP_FACTOR x PyTorch's own (``torch_lowp``:
    plain PyTorch's result at that precision, in that dtype) + LOWP_FLOOR."""
    out_f, ref = out.float(), ref_fp32.float()
    if torch_lowp is None:
        atol = FP32_SCALE_ATOL * _scale(ref)
        torch.testing.assert_close(out_f, ref, rtol=FP32_RTOL, atol=atol, equal_nan=True)
        return
    err = scaled_error(out_f, ref)
    base = scaled_error(torch_lowp, ref)
    floor = LOWP_FLOOR[torch_lowp.dtype]
    assert err <= LOWP_FACTOR * base + floor, (
        f"low-precision error {err:.3g} (relative to max|ref| = {_scale(ref):.3g}) exceeds "
        f"{LOWP_FACTOR} x PyTorch's {base:.3g} + {floor:.3g}"
    )
