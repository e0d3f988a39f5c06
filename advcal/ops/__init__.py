"""advcal's fast ops. Each has a plain-PyTorch ``*_ref`` next to it; one dispatcher picks the
backend (``advcal.ops._dispatch``)."""

from advcal.ops.head_ce import (
    head_ce,
    head_ce_ref,
    head_logits,
    head_logits_ref,
    head_target_cos,
    head_target_cos_ref,
)
from advcal.ops.infonce import infonce, infonce_ref
from advcal.ops.pgd_step import pgd_step_, pgd_step_ref_, random_start_, random_start_ref_

__all__ = [
    "head_ce",
    "head_ce_ref",
    "head_logits",
    "head_logits_ref",
    "head_target_cos",
    "head_target_cos_ref",
    "infonce",
    "infonce_ref",
    "pgd_step_",
    "pgd_step_ref_",
    "random_start_",
    "random_start_ref_",
]
