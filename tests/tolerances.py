"""The one table of test tolerances (STYLE rule 7). Tests import from here; nothing else
defines an atol. fp32 is tight. For bf16/fp16 a kernel must be within ``LOWP_FACTOR`` times the
error plain PyTorch makes at the same precision, both measured against an fp32 reference
(see :func:`assert_close_to_ref`)."""

from __future__ import annotations

import torch

# (rtol, atol) for comparing an implementation against its fp32 reference in fp32.
FP32 = {"rtol": 1e-5, "atol": 1e-5}
# Parity with recorded official outputs (fixtures), fp32.
PARITY_ATOL = 1e-5
# Low precision: kernel error vs fp32 ref <= LOWP_FACTOR * (torch error vs fp32 ref) + floor.
LOWP_FACTOR = 2.0
LOWP_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-4}


def assert_close_to_ref(
    out: torch.Tensor, ref_fp32: torch.Tensor, torch_lowp: torch.Tensor | None = None
) -> None:
    """fp32 outputs: tight. Low-precision outputs: at most LOWP_FACTOR x PyTorch's own error."""
    out, ref = out.float(), ref_fp32.float()
    if torch_lowp is None:
        torch.testing.assert_close(out, ref, **FP32)
        return
    err = (out - ref).abs().max().item()
    base = (torch_lowp.float() - ref).abs().max().item()
    floor = LOWP_FLOOR.get(torch_lowp.dtype, 1e-4)
    assert err <= LOWP_FACTOR * base + floor, (
        f"low-precision error {err:.3g} exceeds {LOWP_FACTOR} x PyTorch's {base:.3g} + {floor:g}"
    )
