"""Scale-out on PyTorch's own engine: ``torchrun`` + ``torch.distributed``.

Under ``torchrun --nproc_per_node N advcal calibrate ...`` each process trains on its shard
of every batch (``DistributedSampler``), the heads are wrapped in
``DistributedDataParallel`` (gradients all-reduced), evaluation metrics are reduced across
ranks, and only rank 0 writes checkpoints and reports. Backend: NCCL on CUDA, gloo on CPU.
Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op.

Failure handling. The process group gets a timeout (``RunConfig.dist_timeout``,
``--dist-timeout``; default :data:`DEFAULT_TIMEOUT_S`, not PyTorch's 30 minutes): a rank that
stalls (``SIGSTOP``, a hung file system, a deadlocked loader) makes the others' next
collective fail after that long, and :func:`explain` turns the backend's error into one line
naming the timeout. A watchdog thread backs the backend up: a collective advcal itself
issues that has not returned :data:`WATCHDOG_GRACE` x the timeout later ends the process
(exit code 1) with the same message, whatever the backend did. torchrun then stops the other
ranks, so every rank exits non-zero.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from advcal.errors import DistributedError, UserError

DEFAULT_TIMEOUT_S = 300.0  # 5 minutes: longer than any one phase's imbalance between ranks
WATCHDOG_GRACE = 1.5  # the watchdog fires at 1.5 x the timeout: after the backend's own error

T = TypeVar("T")
_timeout_s = DEFAULT_TIMEOUT_S


def launched() -> bool:
    """True under torchrun with more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device(device: str | torch.device) -> torch.device:
    """The device this rank computes on: under torchrun a bare ``cuda`` becomes
    ``cuda:LOCAL_RANK`` (one GPU per process, the torchrun convention); an explicit
    ``cuda:N`` is kept. The device is never part of a run's saved config (each rank has its
    own), so ``--resume`` works across ranks and machines."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and launched():
        n = torch.cuda.device_count()
        lr = local_rank()
        if lr >= n:
            raise UserError(
                f"LOCAL_RANK={lr} needs cuda:{lr}, but this machine has {n} CUDA device(s); "
                f"start torchrun with --nproc_per_node {n} or fewer"
            )
        dev = torch.device("cuda", lr)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return dev


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Initialise the default process group when launched by torchrun; True if distributed.

    ``timeout_s`` bounds every collective (and the rendezvous): a stalled rank ends the run
    after that long instead of PyTorch's 30-minute default."""
    global _timeout_s
    if not launched():
        return False
    if not timeout_s > 0:
        raise UserError(f"dist_timeout must be > 0 seconds, got {timeout_s}")
    _timeout_s = float(timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    _WATCHDOG.start()
    return True


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def timeout_s() -> float:
    return _timeout_s


# -- failure handling --------------------------------------------------------------------------


def _stall_message(what: str, waited: float) -> str:
    return (
        f"rank {rank()}/{world_size()}: {what} waited {waited:.0f} s for the other ranks "
        f"(timeout {_timeout_s:g} s, --dist-timeout): another rank stalled or died. "
        "Every rank stops; rerun with --resume to continue from the last checkpoint"
    )


_TIMEOUT_WORDS = ("timed out", "timeout", "connection closed by peer", "connection reset")


def explain(err: BaseException) -> DistributedError | None:
    """The backend's error for a stalled or dead rank, as one clear :class:`DistributedError`
    (None when ``err`` is something else or the run is not distributed)."""
    if isinstance(err, DistributedError):
        return err
    if not enabled() or not isinstance(err, RuntimeError):
        return None
    text = str(err).lower()
    if not any(w in text for w in _TIMEOUT_WORDS):
        return None
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return DistributedError(_stall_message("a collective", _timeout_s) + f" [backend: {first}]")


class _Watchdog:
    """Ends the process when a collective advcal issued has not returned long after the
    timeout (the backend should have raised by then; this is the backstop)."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._next = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="advcal-watchdog", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        with self._lock:
            token = self._next
            self._next += 1
            self.pending[token] = (what, time.monotonic())
        try:
            yield
        except RuntimeError as err:
            translated = explain(err)
            if translated is None:
                raise
            raise translated from err
        finally:
            with self._lock:
                del self.pending[token]

    def _loop(self) -> None:
        while True:
            limit = _timeout_s * WATCHDOG_GRACE
            time.sleep(max(0.2, min(5.0, limit / 20)))
            now = time.monotonic()
            with self._lock:
                late = [(w, now - t0) for w, t0 in self.pending.values() if now - t0 > limit]
            if late:
                what, waited = late[0]
                sys.stderr.write(f"advcal: error: {_stall_message(what, waited)}\n")
                sys.stderr.flush()
                os._exit(1)


_WATCHDOG = _Watchdog()


def guard(what: str):
    """Context manager around a collective: a backend timeout becomes a
    :class:`DistributedError`; a collective that never returns ends the process."""
    return _WATCHDOG.guard(what)


# -- collectives -------------------------------------------------------------------------------


def barrier() -> None:
    if enabled():
        with guard("barrier"):
            dist.barrier()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0 (ranks may hold different lengths),
    in rank order. No gradient (see :func:`all_gather_with_grad`)."""
    if not enabled():
        return t
    parts: list = [None] * world_size()
    with guard("all_gather"):
        dist.all_gather_object(parts, t.detach().cpu())
    return torch.cat(parts).to(t.device)


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    if enabled():
        with guard("all_reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world_size()
    return t


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: every rank's ``t`` concatenated along dim 0 in rank order (lengths may
    differ). Backward: every rank's gradient of the whole output is summed (all-reduce) and
    each rank keeps the rows of its own ``t``, the rule of ``torch.distributed.nn``'s
    all_gather: a loss computed on the gathered batch by every rank, then DDP's gradient
    averaging, gives the parameters exactly the single-process gradient of that loss."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
        sizes = [torch.zeros_like(n) for _ in range(world_size())]
        with guard("all_gather_with_grad"):
            dist.all_gather(sizes, n)
            sizes_i = [int(s) for s in sizes]
            top = max(sizes_i)
            padded = t.new_zeros((top, *t.shape[1:]))
            padded[: t.shape[0]] = t
            parts = [torch.empty_like(padded) for _ in sizes_i]
            dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes_i, rank()
        return torch.cat([p[:s] for p, s in zip(parts, sizes_i, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        with guard("all_gather_with_grad.backward"):
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B_r, ...) from every rank concatenated in rank order, ``(sum_r B_r, ...)``,
    differentiable: the gradient reaching this rank's ``t`` is the sum over ranks of each
    rank's gradient for those rows (see :class:`_AllGatherWithGrad`). For a global-batch
    loss (InfoNCE over all ranks' samples). Identity when not distributed."""
    if not enabled():
        return t
    return _AllGatherWithGrad.apply(t)


def on_main(fn: Callable[[], T], what: str = "rank 0") -> T | None:
    """Run ``fn`` on rank 0 only, and make every rank share its failure: when ``fn`` raises,
    rank 0 re-raises and every other rank raises a :class:`UserError` carrying the message
    (instead of waiting in the next collective until the timeout). Returns ``fn()`` on rank
    0 and None elsewhere."""
    result, err = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:
            err = e
    if enabled():
        box = [None if err is None else f"{type(err).__name__}: {err}"]
        with guard(f"{what} (broadcast)"):
            dist.broadcast_object_list(box, src=0)
        if not is_main() and box[0] is not None:
            raise UserError(f"{what} failed: {box[0]}")
    if err is not None:
        raise err
    return result


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "all_gather_cat",
    "all_gather_with_grad",
    "all_reduce_mean_",
    "barrier",
    "enabled",
    "explain",
    "guard",
    "init_from_env",
    "is_main",
    "launched",
    "local_device",
    "local_rank",
    "on_main",
    "rank",
    "timeout_s",
    "world_size",
]
