"""Point grouping (FPS + kNN) of the Point-Bind encoder: advcal's batched pure-torch version
vs a naive per-cloud, per-centre implementation, in the same run.

advcal (``advcal.backbones.pointbert.group_points``): FPS is one batched ``(B, N)`` distance
update + argmax per pick (G picks); kNN is one batched matmul distance ``(B, G, N)`` + topk.
naive: a Python loop over clouds, FPS on one cloud at a time, kNN as one full argsort per
centre. Bytes written out: FPS reads the cloud and reads/writes the running distance per pick,
``G * B * N * (3 + 2) * 4``; kNN reads/writes the ``(B, G, N)`` distance matrix twice,
``2 * B * G * N * 4``.

    .venv/bin/python benchmarks/bench_fps_knn.py --quick          # CPU smoke
    .venv/bin/python benchmarks/bench_fps_knn.py --threads 1 --json benchmarks/results/fps_knn.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Case, Table, copy_bandwidth, parser, run_sweep

from advcal.backbones.pointbert import group_points


def naive_group(
    xyz: torch.Tensor, g: int, m: int, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One cloud at a time; FPS pick by pick; kNN by a full sort per centre."""
    nbs, cs = [], []
    for cloud in xyz:
        picked = [start]
        dist = torch.full((cloud.shape[0],), float("inf"), device=cloud.device)
        for _ in range(g - 1):
            dist = torch.minimum(dist, ((cloud - cloud[picked[-1]]) ** 2).sum(-1))
            picked.append(int(dist.argmax()))
        centers = cloud[picked]
        groups = []
        for c in centers:
            idx = ((cloud - c) ** 2).sum(-1).argsort()[:m]
            groups.append(cloud[idx] - c)
        nbs.append(torch.stack(groups))
        cs.append(centers)
    return torch.stack(nbs), torch.stack(cs)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 = stable on a shared box)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.quick:
        shapes = [(2, 1024, 64, 16)]
    else:  # (B, N, G, M): tiny fixture, ModelNet-style 1k, released Point-Bind 8192/512/32
        shapes = [(2, 256, 16, 8), (8, 1024, 64, 32), (8, 8192, 512, 32)]
    cases = [Case(f"B{b}_N{n}_G{g}_M{m}", dict(B=b, N=n, G=g, M=m)) for b, n, g, m in shapes]

    def inputs(c: Case) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(c.params["B"], c.params["N"], 3, generator=gen) * 2 - 1
        return x.to(dev)

    def make_naive(c: Case):
        x = inputs(c)
        if dev.type == "cpu" and c.params["N"] * c.params["G"] * c.params["B"] > 2**23:
            raise NotImplementedError("naive loop too slow for this size on CPU")
        return lambda: naive_group(x, c.params["G"], c.params["M"])

    def make_advcal(c: Case):
        x = inputs(c)
        return lambda: group_points(x, c.params["G"], c.params["M"], start=0)

    def nbytes(c: Case) -> float:
        b, n, g = c.params["B"], c.params["N"], c.params["G"]
        return g * b * n * 5 * 4 + 2 * b * g * n * 4

    # correctness in the same run: identical centres and neighbourhood sets
    for c in cases[:1]:
        x = inputs(c)
        nb, ce = group_points(x, c.params["G"], c.params["M"], start=0)
        nb2, ce2 = naive_group(x, c.params["G"], c.params["M"])
        assert torch.equal(ce, ce2), "FPS centres differ from the naive reference"
        d = torch.cdist(nb.flatten(0, 1), nb2.flatten(0, 1)).amin(-1).max()
        assert d <= 1e-6, f"kNN groups differ from the naive reference ({d})"

    table = Table("fps_knn", dev, limits={"copy_gbps": copy_bandwidth(dev)})
    run_sweep(
        table, cases, {"naive": make_naive, "advcal": make_advcal}, phase="fwd", nbytes=nbytes
    )
    table.print()
    if args.json:
        table.write_json(args.json)


if __name__ == "__main__":
    main()
