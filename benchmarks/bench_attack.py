"""Full PGD-K attacks per second: the library's attack eager vs under a CUDA graph, and a
hand-written attack loop eager vs torch.compile.

Backbones: the embedded ``minibind`` image tower (``advcal.backbones.load("minibind")``) and a
ViT-B-sized random-weight encoder (12 x 768, 197 tokens, SDPA attention), each wrapped as a
zero-shot classifier against 10 random unit centers. One attack = random start + K x (forward,
cross-entropy, input-gradient backward, fused ``advcal.ops.pgd_step_``).

Arms: ``eager`` = ``advcal.PGD(...)``; ``advcal_graph`` = ``advcal.PGD(..., cuda_graph=True)``
(the whole step captured once, replayed K times; before timing, the run checks that it returns
exactly the eager attack's adversarial examples and records ``identical`` in ``extra``);
``loop_eager`` / ``loop_compiled`` = the same attack as a plain loop, eager and with the step
under ``torch.compile``. GPU: bf16 autocast, batch 64; CPU: ``--quick`` smoke (tiny ViT,
batch 2, graph arm skipped).

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
from advcal.attacks import PGD
from advcal.ops import pgd_step_, random_start_
from benchmarks.harness import Case, Table, parser, run_sweep

EPS, ALPHA = 8 / 255, 2 / 255
ARMS = ("eager", "advcal_graph", "loop_eager", "loop_compiled")


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


def minibind_backbone(device, quick: bool):
    """The embedded backbone; ``quick``: a tiny 1-epoch config (a smoke run, seconds to
    pretrain) instead of the default (a minute to pretrain once, then cached)."""
    from advcal import backbones

    small = {"embed_dim": 32, "width": 4, "epochs": 1, "modalities": ("image",)} if quick else {}
    return backbones.load("minibind", device=device, progress=False, **small), "image"


def vit_backbone(device, cfg):
    from advcal import backbones
    from advcal.specs import InputSpec

    vit = ViT(**cfg).to(device)
    image = cfg.get("image", 224)
    dim = cfg.get("dim", 768)
    vit.head = nn.Identity()  # the embedding, not class logits
    spec = InputSpec((3, image, image), 0.0, 1.0, EPS)
    return backbones.wrap({"image": vit}, {"image": spec}, embed_dim=dim), "image"


def classifier(backbone, modality, device):
    from advcal.attacks import ZeroShotClassifier

    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(10, backbone.embed_dim, generator=g), dim=-1)
    return ZeroShotClassifier(backbone.eval(), modality, centers.to(device)).eval()


def loop_attack(clf, x0, y, steps, compiled, autocast):
    """The attack as a plain loop (random start + K fused steps), for the compile arm."""
    x_adv = x0.clone()
    gen = torch.Generator(x0.device).manual_seed(0)

    def grad_step():
        x = x_adv.detach().requires_grad_(True)
        with autocast():
            loss = F.cross_entropy(clf(x).float(), y)
        (g,) = torch.autograd.grad(loss, x)
        pgd_step_(x_adv, g, x0, alpha=ALPHA, eps=EPS, lo=0.0, hi=1.0)

    run_step = torch.compile(grad_step) if compiled else grad_step

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
            backbone, m = vit_backbone(device, vit_cfg)
        else:
            backbone, m = minibind_backbone(device, args.quick)
        clf = classifier(backbone, m, device)
        shape = backbone.spec(m).shape
        g = torch.Generator().manual_seed(1)
        x0 = torch.rand(batch, *shape, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        if mode.startswith("loop"):
            fn = loop_attack(clf, x0, y, args.steps, mode == "loop_compiled", autocast)
            fn()  # warm-up / compile outside the timing
            return fn
        if mode == "advcal_graph" and not gpu:
            raise NotImplementedError("CUDA graphs need a GPU")
        atk = PGD(clf, eps=EPS, alpha=ALPHA, steps=args.steps, cuda_graph=mode == "advcal_graph")

        def fn():
            with autocast():
                return atk(x0, y)

        out = fn()  # warm-up (and capture) outside the timing
        if mode == "advcal_graph":
            eager = PGD(clf, eps=EPS, alpha=ALPHA, steps=args.steps)
            with autocast():
                ref = eager(x0, y)
            identical[case.name] = bool(torch.equal(out, ref))
        return fn

    identical: dict[str, bool] = {}
    arms = {m: (lambda case, m=m: make(case, m)) for m in ARMS}
    table = Table("attack", device)
    run_sweep(table, cases, arms, phase=f"pgd-{args.steps}")
    for r in table.results:
        if r.arm == "advcal_graph" and r.case in identical:
            r.extra["identical_to_eager"] = identical[r.case]
    table.print()
    for case, same in identical.items():
        print(f"  {case}: graph gives {'identical' if same else 'DIFFERENT'} adversarial examples")
    for r in table.results:
        if r.timing is None:
            continue
        print(
            f"  {r.case}/{r.arm}: {1e3 / r.timing.median_ms:.3g} attacks/s "
            f"({batch * 1e3 / r.timing.median_ms:.3g} examples/s)"
        )
    if args.json:
        table.write_json(args.json)


if __name__ == "__main__":
    main()
