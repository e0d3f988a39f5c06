"""Scale-out on PyTorch's own engine: ``torchrun`` + ``torch.distributed``.

Under ``torchrun --nproc_per_node N advcal calibrate ...`` each process trains on its shard
of every batch (``DistributedSampler``), the heads are wrapped in
``DistributedDataParallel`` (gradients all-reduced), evaluation metrics are reduced across
ranks, and only rank 0 writes checkpoints and reports. Backend: NCCL on CUDA, gloo on CPU.
Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Initialise the default process group when launched by torchrun; True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return True


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if enabled():
        dist.barrier()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0 (ranks may hold different lengths),
    in rank order."""
    if not enabled():
        return t
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, t.detach().cpu())
    return torch.cat(parts).to(t.device)


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    if enabled():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world_size()
    return t
