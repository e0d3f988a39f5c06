"""Where the time of an attack and of a calibration epoch goes (torch.profiler, any device).

Profiles, on the embedded ``minibind`` + ``digits`` (the demo's world):

* ``calibration``: ``--calib-steps`` steps of the demo's calibration (every modality, the
  training attack, the objective, the optimizer step);
* ``evaluation``: one attack of the evaluation on one batch of one modality (``--attack``, default
  the standard suite's APGD-T; ``pgd-50`` for the attack the old suite ran).

advcal's ranges (:mod:`advcal.profiling`: ``attack/<name>``, ``backbone_forward``,
``head_loss``, ``backward``, ``update``, ``calibration_step``) become ``torch.profiler``
ranges while it records, so the time splits into backbone forward, head + loss, input-gradient
backward and update; what no range covers is bookkeeping (Python, random starts, tracking,
allocation). The top ATen ops by self time are listed too. Prints a Markdown table and writes
JSON (``--json``).

    python benchmarks/profile_attack.py [--modality image] [--batch 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import advcal
from advcal.attacks import APGD, APGDT, PGD, ZeroShotClassifier
from advcal.calibrate import CalibConfig, Calibrator

RANGES = ("backbone_forward", "head_loss", "backward", "update")


def breakdown(prof, wall_s: float) -> dict:
    """Seconds per advcal range (self time of nested ranges excluded) and the rest."""
    events = {e.key: e for e in prof.key_averages()}
    out = {}
    for r in RANGES:
        e = events.get(f"advcal:{r}")
        out[r] = (e.cpu_time_total / 1e6) if e is not None else 0.0
    # the forward inside backward's range is not double-counted: the ranges do not nest
    covered = sum(out.values())
    out["other (python, bookkeeping, allocation)"] = max(wall_s - covered, 0.0)
    top = sorted(
        (e for e in prof.key_averages() if not e.key.startswith("advcal:")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )[:8]
    return {
        "wall_s": wall_s,
        "seconds": out,
        "share": {k: v / wall_s for k, v in out.items()},
        "top_ops": [
            {"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top
        ],
    }


def profiled(fn) -> dict:
    fn()  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return breakdown(prof, wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--modality", default="image")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--attack", default="apgd-t", choices=("apgd-t", "apgd-ce", "pgd-50"))
    p.add_argument("--calib-steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = advcal.backbones.load("minibind", progress=False)
    train = advcal.data.load_dataset("digits", "train")
    test = advcal.data.load_dataset("digits", "test")
    centers = bb.centers(test.class_names, test.templates)
    clf = ZeroShotClassifier(bb, args.modality, centers).eval()
    x, y = test.inputs[args.modality][: args.batch], test.labels[: args.batch]
    attack = {
        "apgd-t": lambda: APGDT(clf, steps=100),
        "apgd-ce": lambda: APGD(clf, steps=100),
        "pgd-50": lambda: PGD(clf, steps=50, alpha_ratio=0.1, early_stop=True),
    }[args.attack]()
    results = {"evaluation": profiled(lambda: attack(x, y))}
    subset = train.subset(torch.arange(args.batch * args.calib_steps))
    cfg = CalibConfig(epochs=1, cache=False)
    results["calibration"] = profiled(
        lambda: Calibrator(bb, centers, train.modalities, cfg).fit(subset, progress=False)
    )
    meta = {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "modality": args.modality,
        "batch": args.batch,
        "attack": args.attack,
        "calibration_steps": args.calib_steps,
    }
    print(f"profile on {meta['device']} ({meta['threads']} threads), minibind {args.modality}")
    for what, r in results.items():
        print(f"\n{what}: {r['wall_s']:.2f} s")
        print("| part | seconds | share |\n|---|---|---|")
        for k, v in r["seconds"].items():
            print(f"| {k} | {v:.3f} | {100 * r['share'][k]:.0f}% |")
        print(
            "top ops (self time): "
            + ", ".join(f"{o['op']} {o['self_s']:.3f}s" for o in r["top_ops"][:5])
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, **results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
