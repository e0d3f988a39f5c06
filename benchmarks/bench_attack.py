"""Full PGD-K attacks per second: eager vs torch.compile vs CUDA graph (advcal.cuda_graph).

Backbones: the embedded ``minibind`` image tower (``advcal.backbones.load("minibind")``, when
available) and a ViT-B-sized random-weight encoder (12 x 768, 197 tokens, SDPA attention).
One attack = random start + K x (forward, cross-entropy vs 10 random centers, input-gradient
backward, fused ``advcal.ops.pgd_step_``). GPU: bf16 autocast, batch 64; CPU: ``--quick`` smoke
(tiny ViT, batch 2, graph arm skipped).

    python benchmarks/bench_attack.py [--quick] [--steps 10] [--batch 64] [--json out.json]
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advcal import profiling
from advcal.cuda_graph import GraphedStep
from advcal.ops import pgd_step_, random_start_
from benchmarks.harness import Case, Table, parser, run_sweep

EPS, ALPHA = 8 / 255, 2 / 255


class ViT(nn.Module):
    """Random-weight ViT: patch embed, pre-norm encoder (SDPA), mean-pooled head."""

    def __init__(self, dim=768, depth=12, heads=12, patch=16, image=224, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, 0.0, "gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        return self.head(self.encoder(t)[:, 0])


def minibind_image(device):
    try:
        from advcal import backbones

        bb = backbones.load("minibind", device=device)
    except Exception as exc:  # being written by another engineer; optional here
        raise NotImplementedError(f"minibind unavailable: {type(exc).__name__}: {exc}") from exc
    spec = bb.spec("image")
    centers = torch.randn(10, bb.embed_dim, device=device)
    centers = F.normalize(centers, dim=-1)

    class Clf(nn.Module):
        def forward(self, x):
            return F.normalize(bb.encode("image", x, check=False).float(), dim=-1) @ centers.T

    return Clf(), tuple(spec.shape)


def pgd(model, x0, y, steps, mode, autocast):
    """Returns a zero-arg callable running one full PGD-``steps`` attack."""
    x_adv = x0.clone()
    gen = torch.Generator(x0.device).manual_seed(0)

    def grad_step():
        with profiling.range("attack/step"):
            x = x_adv.detach().requires_grad_(True)
            with autocast():
                loss = F.cross_entropy(model(x).float(), y)
            (g,) = torch.autograd.grad(loss, x)
            with profiling.range("attack/update"):
                pgd_step_(x_adv, g, x0, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0)

    if mode == "graph":
        if x0.device.type != "cuda":
            raise NotImplementedError("CUDA graphs need a GPU")
        step = GraphedStep(grad_step, [x_adv, x0, y])
        run_step = step.replay
    elif mode == "compiled":
        run_step = torch.compile(grad_step)
    else:
        run_step = grad_step

    def attack():
        with profiling.range("attack"):
            random_start_(x_adv, x0, eps=EPS, lo=0.0, hi=1.0, generator=gen)
            for _ in range(steps):
                run_step()
        return x_adv

    return attack


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (64 if gpu else 2)
    if gpu:

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    vit_cfg = {} if gpu and not args.quick else {"dim": 64, "depth": 2, "heads": 4, "image": 32}
    cases = [
        Case("vit-b" if not vit_cfg else "vit-tiny", {"B": batch, "steps": args.steps}),
        Case("minibind-image", {"B": batch, "steps": args.steps}),
    ]

    def make(case, mode):
        if case.name.startswith("vit"):
            model = ViT(**vit_cfg).to(device)
            image = vit_cfg.get("image", 224)
            shape = (3, image, image)
        else:
            model, shape = minibind_image(device)
        model.eval().requires_grad_(False)
        x0 = torch.rand(batch, *shape, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        fn = pgd(model, x0, y, args.steps, mode, autocast)
        fn()  # warm-up / compile / capture outside the timing
        return fn

    arms = {m: (lambda case, m=m: make(case, m)) for m in ("eager", "compiled", "graph")}
    table = Table("attack", device)
    run_sweep(table, cases, arms, phase=f"pgd-{args.steps}")
    table.print()
    for r in table.results:
        print(
            f"  {r.case}/{r.arm}: {1e3 / r.timing.median_ms:.3g} attacks/s "
            f"({batch * 1e3 / r.timing.median_ms:.3g} examples/s)"
        )
    if args.json:
        table.write_json(args.json)


if __name__ == "__main__":
    main()
