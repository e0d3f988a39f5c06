"""Probe the frozen minibind encoders: clean and PGD robust top-1 per modality on digits test.

Self-contained (its own small PGD, not advcal.attacks): L-inf, random start, step eps/4,
loss = fixed-center CE of ``cos(e, C) / tau``; eps = each modality's spec default
(4/255 for pixels and waveform, the points' own scale) unless ``--eps-scale`` changes it.

    .venv/bin/python scripts/probe_minibind.py              # cached/pretrained default
    .venv/bin/python scripts/probe_minibind.py --retrain --set epochs=6 --set width=12
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from advcal.backbones.minibind import MiniBind, MiniBindConfig, load, pretrain
from advcal.data.digits import digits


def pgd(
    model: MiniBind,
    m: str,
    x: torch.Tensor,
    y: torch.Tensor,
    centers: torch.Tensor,
    eps: float,
    steps: int,
    tau: float,
    g: torch.Generator,
) -> torch.Tensor:
    """L-inf PGD with random start and step eps/4; returns x_adv in the spec's range."""
    spec = model.spec(m)

    def clamp(v: torch.Tensor) -> torch.Tensor:
        return v.clamp(spec.lo, spec.hi) if spec.lo is not None else v

    alpha = eps / 4
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
    x_adv = clamp(x + delta)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        z = F.normalize(model.encode(m, x_adv, check=False), dim=-1)
        loss = F.cross_entropy(z @ centers.T / tau, y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = clamp(x + (x_adv - x).clamp(-eps, eps))
    return x_adv.detach()


def probe(
    model: MiniBind, steps: int = 20, eps_scale: float = 1.0, limit: int | None = None
) -> dict[str, dict[str, float]]:
    data = digits("test", modalities=model.modalities, limit=limit)
    centers = model.centers(data.class_names, data.templates)
    g = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    for m in model.modalities:
        clean = robust = 0
        eps = model.spec(m).eps * eps_scale
        for idx in data.batches(150):
            x, y = data.inputs[m][idx], data.labels[idx]
            with torch.no_grad():
                pred = (model.encode(m, x) @ centers.T).argmax(1)
            clean += int((pred == y).sum())
            if steps:
                xa = pgd(model, m, x, y, centers, eps, steps, model.config.tau, g)
                with torch.no_grad():
                    robust += int(((model.encode(m, xa) @ centers.T).argmax(1) == y).sum())
        out[m] = {"eps": eps, "clean": 100 * clean / len(data), "robust": 100 * robust / len(data)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", help="a minibind safetensors file (default: cache/pretrain)")
    ap.add_argument("--retrain", action="store_true", help="pretrain now, ignore the cache")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eps-scale", type=float, default=1.0)
    ap.add_argument("--limit", type=int, default=None, help="first N test samples only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the table here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        try:
            overrides[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            overrides[k] = v
    t0 = time.perf_counter()
    if args.checkpoint:
        model = MiniBind.from_checkpoint(args.checkpoint)
    elif args.retrain:
        model = pretrain(replace(MiniBindConfig(), **overrides))
    else:
        model = load("minibind", **overrides)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = probe(model, args.steps, args.eps_scale, args.limit)
    t_probe = time.perf_counter() - t0

    print(f"config {model.config.hash()}: {model.config.to_json()}")
    print(f"load/pretrain {t_load:.1f} s, probe {t_probe:.1f} s")
    print(f"| modality | eps | clean top-1 | PGD-{args.steps} top-1 | drop |")
    print("|---|---|---|---|---|")
    for m, r in table.items():
        print(
            f"| {m} | {r['eps']:.4f} | {r['clean']:.1f} | {r['robust']:.1f} | "
            f"{r['clean'] - r['robust']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": json.loads(model.config.to_json()), "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
