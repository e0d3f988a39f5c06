"""Capture one attack step in a CUDA graph and replay it.

A PGD step on a small backbone is dozens of short kernels; launching them costs more than
running them. :class:`GraphedStep` captures ``step_fn()`` once (forward, loss, input-gradient
backward, fused update) and :meth:`GraphedStep.replay` relaunches the whole step as one graph.

Rules for ``step_fn`` (those of ``torch.cuda.graph``): it reads and writes *static* tensors in
place (copy inputs into them before replaying; results are read from them after), has static
shapes, makes no host synchronisation (no ``.item()``, ``.cpu()``, printing of values, or
data-dependent Python control flow; early stopping, if any, by masking) and draws random numbers
only on the device (``torch.rand(..., device="cuda")`` and advcal's ``random_start_`` are
graph-safe: their Philox offsets advance at every replay).

Warm-up runs ``step_fn`` a few times on a side stream (lazy initialisation, cuBLAS workspaces,
autograd's caches) before the capture, as ``torch.cuda.graph`` requires. Those runs mutate the
static tensors; ``static_tensors`` lists the ones to snapshot and restore afterwards, so the
state after construction is the state before it.

Example::

    x_adv = x0.clone()                       # static buffers
    def step():
        x = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), y)
        (g,) = torch.autograd.grad(loss, x)
        advcal.ops.pgd_step_(x_adv, g, x0, alpha=a, eps=e, lo=0.0, hi=1.0)
    graphed = GraphedStep(step, [x_adv, x0, y])
    for _ in range(steps):
        graphed.replay()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from advcal.profiling import nvtx_range


class GraphedStep:
    """``step_fn()`` captured once in a CUDA graph; :meth:`replay` runs it again.

    Args:
        step_fn: zero-argument callable reading/writing static CUDA tensors in place.
        static_tensors: the CUDA tensors the step reads or writes; all must be on one CUDA
            device. Their values are restored after warm-up (``restore=True``).
        warmup: eager runs on a side stream before capture (>= 1).
        pool: memory pool handle to share with other graphs (``torch.cuda.graph_pool_handle()``).
        restore: snapshot ``static_tensors`` before warm-up and copy the values back after.
    """

    def __init__(
        self,
        step_fn: Callable[[], object],
        static_tensors: Sequence[torch.Tensor],
        *,
        warmup: int = 3,
        pool=None,
        restore: bool = True,
    ) -> None:
        if not callable(step_fn):
            raise TypeError("step_fn must be callable")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        tensors = list(static_tensors)
        if not tensors:
            raise ValueError("static_tensors is empty: pass the tensors step_fn reads and writes")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"static_tensors[{i}] is a {type(t).__name__}, not a tensor")
            if t.device.type != "cuda":
                raise ValueError(
                    f"static_tensors[{i}] is on {t.device}: CUDA graphs capture CUDA work only; "
                    "run the step eagerly on CPU (cuda_graph=False) or move the tensors to a GPU"
                )
            if t.device != tensors[0].device:
                raise ValueError(
                    f"static_tensors[{i}] is on {t.device} but static_tensors[0] is on "
                    f"{tensors[0].device}; one graph runs on one device"
                )
        if not torch.cuda.is_available():  # pragma: no cover - CUDA tensors imply CUDA
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.step_fn = step_fn
        self.static_tensors = tensors
        self.device = tensors[0].device
        snapshot = [t.detach().clone() for t in tensors] if restore else None
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step_fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):  # captures on its own side stream
                step_fn()
            if snapshot is not None:
                with torch.no_grad():
                    for t, s in zip(tensors, snapshot, strict=True):
                        t.copy_(s)

    def replay(self) -> None:
        """Run the captured step once more (asynchronous, on the current stream)."""
        with nvtx_range("graph_replay"):
            self.graph.replay()

    __call__ = replay

    def pool(self):
        """The graph's memory pool, to share with another :class:`GraphedStep`."""
        return self.graph.pool()
