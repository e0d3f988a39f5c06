"""Data-loader throughput per decoder: samples/s of one pass over a generated ``folder:``
dataset through ``DataLoader(collate_fn=advcal.data.collate)`` at 0 and 2 workers.

Decoders (one case each): JPEG (Pillow), wav (soundfile + soxr resampling), mp4 (PyAV), txt
point clouds (numpy), N-Caltech101 ``.bin`` events (numpy). Transforms: ImageBind's recipe
(image 224 crop, 16 kHz audio clip window, 5 x 2 s clips x 3 crops of video at 224, EventBind
frames at 224) and Point-Bind's FPS + ``pc_normalize`` (8192 points of 10k); ``--quick``
uses small files, minibind's 32 x 32 recipe and 8 items per case (a few seconds, CI smoke).
A timed call is one full pass (persistent workers, so worker start-up is not timed);
``samples_per_s`` = items / median pass time, in each result's ``extra``. CPU: host clock.

    .venv/bin/python benchmarks/bench_loader.py --quick
    .venv/bin/python benchmarks/bench_loader.py --json benchmarks/results/loader.json
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Case, Result, Table, measure, parser

import advcal.data as D
from advcal.data import miniature as M
from advcal.data.transforms import (
    EventTransform,
    imagebind_transforms,
    minibind_transforms,
    pointbind_point_transform,
)

DECODERS = ("jpeg", "wav", "mp4", "txt_points", "bin_events")
WORKERS = (0, 2)


def write_dataset(root: Path, decoder: str, n: int, quick: bool) -> Path:
    """``n`` files in 2 class folders under ``root/decoder``."""
    base = root / decoder
    for k in range(n):
        d = base / f"class{k % 2}"
        if decoder == "jpeg":
            M.write_image(d / f"{k}.jpg", k, *((48, 64) if quick else (375, 500)))
        elif decoder == "wav":
            M.write_wav(d / f"{k}.wav", k, 0.5 if quick else 5.0, 44100)
        elif decoder == "mp4":
            frames, fps, h, w = (12, 6, 48, 64) if quick else (150, 30, 240, 320)
            M.write_video(d / f"{k}.mp4", k, frames, fps, h, w)
        elif decoder == "txt_points":
            d.mkdir(parents=True, exist_ok=True)
            pts = M.cloud(k, 300 if quick else 10000)
            np.savetxt(d / f"{k}.txt", pts, fmt="%.6f", delimiter=",")
        elif decoder == "bin_events":
            ev = M.events(k, 500 if quick else 50000, 180, 240)
            M.write_bin_events(d / f"{k}.bin", ev)
    return base


def transforms(quick: bool) -> dict:
    if quick:
        return minibind_transforms()
    t = imagebind_transforms()
    t["point"] = pointbind_point_transform(8192)
    t["event"] = EventTransform(224)
    return t


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--items", type=int, default=None, help="files per decoder (default 64; 8 quick)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reps", type=int, default=3, help="timed passes per case")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # loader work is per-sample; workers are the parallelism measured
    n = args.items or (8 if args.quick else 64)
    tfm = transforms(args.quick)
    table = Table("loader", "cpu", baselines=("workers0",), subject="workers2")
    with tempfile.TemporaryDirectory() as tmp:
        for dec in DECODERS:
            root = write_dataset(Path(tmp), dec, n, args.quick)
            case = Case(dec, {"items": n, "batch_size": args.batch_size, "quick": args.quick})
            for w in WORKERS:
                ds = D.open(f"folder:{root}", "all", transforms=tfm)
                loader = DataLoader(
                    ds,
                    batch_size=args.batch_size,
                    num_workers=w,
                    collate_fn=D.collate,
                    persistent_workers=w > 0,
                )

                def one_pass(loader=loader) -> int:
                    return sum(len(b) for b in loader)

                got = one_pass()  # also the warm-up (workers start here)
                if got != n:
                    raise RuntimeError(f"{dec}: a pass read {got} of {n} items")
                t = measure(one_pass, "cpu", warmup=0, rep=args.reps)
                shape = tuple(ds[0]["inputs"][ds.info.modalities[0]].shape)
                extra = {"samples_per_s": n / (t.median_ms / 1e3), "modality":
                         ds.info.modalities[0], "sample_shape": shape}  # fmt: skip
                table.add(Result("loader", dec, case.params, f"workers{w}", "pass", t, extra=extra))
                del loader
    table.print()
    print("\nsamples/s per decoder:")
    for r in table.results:
        e = r.extra
        shape = f"{e['modality']} {e['sample_shape']}"
        print(f"  {r.case:<11} {r.arm:<9} {e['samples_per_s']:9.1f}  {shape}")
    if args.json:
        table.results = [dataclasses.replace(r, extra=dict(r.extra)) for r in table.results]
        table.write_json(args.json)


if __name__ == "__main__":
    main()
