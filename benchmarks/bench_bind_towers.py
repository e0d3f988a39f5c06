"""Attack-step throughput of each Bind family's largest tower: forward + input-gradient backward.

One PGD step through a frozen backbone costs one forward and one backward to the *input* (no
weight gradients). This bench times exactly that step (valid-range input -> backbone encode
-> cosine logits over 10 random centres -> cross-entropy -> grad w.r.t. the input) under bf16
autocast, with random weights at the released sizes, and reports samples/s and the fraction of
the bf16 matmul rate measured in the same run (:func:`harness.matmul_rate`).

Towers (cases; ``--towers`` picks a subset):
  - ``imagebind_vision``:   ImageBind-Huge vision (ViT-H/14, 1280 x 32, 257 tokens); the model
                            and FLOP count are those of ``bench_backbone.py`` (imported, not
                            copied), which also compares attention implementations.
  - ``languagebind_image``: LanguageBind image tower, CLIP ViT-L/14 (1024 x 24, 16 heads, MLP
                            4096, quick-GELU, 224 px -> 257 tokens), CLIP normalisation inside.
  - ``languagebind_video``: LanguageBind video tower: ViT-L/14 with add_time_attn, 8 frames
                            (each layer: temporal attention across the 8 frames, then spatial).
  - ``pointbert``:          Point-Bind's PointBERT point encoder (UniBind/Point-Bind point path):
                            8192 points -> FPS 512 centres x kNN 32 -> mini-PointNet -> 384 x 12
                            transformer (513 tokens) -> pc_projection -> point head.
  The text towers are not timed (built tiny so construction stays cheap).

FLOPs per sample (matmuls/convs only, 2 per MAC, written out in each case's params):
  ViT block, L tokens, width D, MLP width F:
      forward  = 8*L*D^2 (q, k, v, out) + 4*L*D*F (MLP) + 4*L^2*D (QK^T, PV)
      backward to the input, frozen weights: every linear one matmul (the input gradient),
      attention four (dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q)
               = 8*L*D^2 + 4*L*D*F + 8*L^2*D
  patch stem 2*(L-1)*D*(C*p*p) each way; projection 2*D*E each way.
  Video: T frames x (image cost) + per layer temporal attention on L sequences of T frames:
      forward + 8*T*L*D^2 + 4*T^2*L*D, backward + 8*T*L*D^2 + 8*T^2*L*D.
  PointBERT, G groups of M points, encoder dims C, width D, L = G + 1:
      kNN distances 2*G*N*3 (forward only), mini-PointNet 2*G*M*(3*128 + 128*256 + 512*512
      + 512*C), reduce 2*G*C*D, pos-embed 2*G*(3*128 + 128*D), blocks as ViT (F = 4D),
      projection 2*2D*512, head 2*512*E; backward the same without kNN, with 8*L^2*D for
      attention. FPS (elementwise, no FLOPs counted) and kNN are in the timed step: the attack
      recomputes the grouping every step.
  At released sizes, GFLOP per sample forward / backward: ImageBind vision 335 / 346,
  LanguageBind image 162 / 169, video (8 frames) 1712 / 1765, PointBERT (8192 points) 41 / 46.
  Checked on the tiny configs against ``torch.utils.flop_counter``: every linear/conv term
  matches exactly; the counter does not count CPU SDPA, which is the whole remaining gap.
  The ``tflops``/``frac_matmul`` columns use **2 x forward** FLOPs per step (as the ImageBind
  issue's acceptance rule: frozen weights, so the backward is input gradients only); the
  detailed fwd+bwd count is kept as ``flops_per_step_detailed`` and ``tflops_detailed``.

Usage:
  .venv/bin/python benchmarks/bench_bind_towers.py                  # released sizes, GPU
  .venv/bin/python benchmarks/bench_bind_towers.py --tiny --threads 1   # CPU smoke test
  ... --towers languagebind_video,pointbert --batch 8 --json benchmarks/results/bind_towers.json
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advcal.backbones import imagebind as ib
from advcal.backbones import languagebind as lb
from advcal.backbones import pointbert as pb
from benchmarks.bench_backbone import _vision_only, vision_flops
from benchmarks.harness import Case, Table, matmul_rate, parser, run_sweep

TOWERS = ("imagebind_vision", "languagebind_image", "languagebind_video", "pointbert")
NUM_CENTERS = 10


# -- FLOP counts -------------------------------------------------------------------------------
def vit_flops(L: int, D: int, F_: int, blocks: int, stem_in: int, E: int) -> tuple[float, float]:
    """(forward, input-gradient backward) FLOPs of one image through a pre-LN ViT."""
    stem = 2 * (L - 1) * D * stem_in
    fwd = stem + blocks * (8 * L * D * D + 4 * L * D * F_ + 4 * L * L * D) + 2 * D * E
    bwd = stem + blocks * (8 * L * D * D + 4 * L * D * F_ + 8 * L * L * D) + 2 * D * E
    return float(fwd), float(bwd)


def languagebind_flops(cfg: lb.LanguageBindConfig) -> tuple[float, float]:
    """Per sample (one image, or one clip of ``num_frames`` frames with time attention)."""
    vc = cfg.vision_config
    assert isinstance(vc, lb.LanguageBindVisionConfig)
    D, F_, blocks = vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers
    L = (vc.image_size // vc.patch_size) ** 2 + 1
    fwd, bwd = vit_flops(L, D, F_, blocks, vc.num_channels * vc.patch_size**2, cfg.projection_dim)
    if not vc.add_time_attn:
        return fwd, bwd
    T = vc.num_frames
    proj = 2 * D * cfg.projection_dim  # counted once per clip, not per frame
    fwd = T * (fwd - proj) + proj + blocks * (8 * T * L * D * D + 4 * T * T * L * D)
    bwd = T * (bwd - proj) + proj + blocks * (8 * T * L * D * D + 8 * T * T * L * D)
    return float(fwd), float(bwd)


def pointbert_flops(
    cfg: pb.PointBERTConfig, n_points: int, pc_feat: int, E: int
) -> tuple[float, float]:
    G, M, C, D = cfg.num_group, cfg.group_size, cfg.encoder_dims, cfg.trans_dim
    L = G + 1
    pointnet = 2 * G * M * (3 * 128 + 128 * 256 + 512 * 512 + 512 * C)
    front = pointnet + 2 * G * C * D + 2 * G * (3 * 128 + 128 * D)
    back = 2 * pc_feat * 512 + 2 * 512 * E
    lin = cfg.depth * 24 * L * D * D
    knn = 2 * G * n_points * 3  # centre-to-point distances (forward only: indices)
    fwd = knn + front + lin + cfg.depth * 4 * L * L * D + back
    bwd = front + lin + cfg.depth * 8 * L * L * D + back
    return float(fwd), float(bwd)


# -- towers ------------------------------------------------------------------------------------
@dataclass
class Tower:
    """One benchmarked tower: ``encode(x)`` (valid-range batch -> embeddings) and its inputs."""

    name: str
    encode: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    embed_dim: int
    flops: tuple[float, float]
    params: dict


def _tiny_text(proj: int) -> dict:
    return {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "projection_dim": proj,
    }


def build_imagebind(tiny: bool, batch: int, device: torch.device) -> Tower:
    cfg = ib.imagebind_tiny() if tiny else _vision_only(ib.imagebind_huge())
    with torch.device(device):
        bb = ib.ImageBindBackbone(ib.ImageBind(cfg))
    S = cfg.image_size
    fwd, bwd = vision_flops(cfg)
    return Tower(
        "imagebind_vision",
        lambda x: bb.encode("image", x, check=False),
        torch.rand(batch, 3, S, S, device=device),
        cfg.out_embed_dim,
        (fwd, bwd),
        {
            "input": f"image 3x{S}x{S}",
            "width": cfg.vision_embed_dim,
            "blocks": cfg.vision_num_blocks,
            "tokens": cfg.vision_tokens,
            "params": sum(
                p.numel() for n, p in bb.model.named_parameters() if n.split(".")[1] == "vision"
            ),
        },
    )


def build_languagebind(tower: str, tiny: bool, batch: int, device: torch.device) -> Tower:
    vision: dict = {"add_time_attn": tower == "video", "num_frames": 8 if tower == "video" else 1}
    proj = 768
    if tiny:
        proj = 24
        vision.update(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    vision["projection_dim"] = proj
    cfg = lb.LanguageBindConfig.from_dict(
        {"text_config": _tiny_text(proj), "vision_config": vision, "projection_dim": proj}
    )
    with torch.device(device):
        bb = lb.LanguageBindBackbone({tower: lb.LanguageBindModel(cfg)})
    vc = cfg.vision_config
    assert isinstance(vc, lb.LanguageBindVisionConfig)
    S, T = vc.image_size, vc.num_frames
    shape = (batch, 3, S, S) if tower == "image" else (batch, T, 3, S, S)  # video: time first
    vm = bb.towers[tower].vision_model
    return Tower(
        f"languagebind_{tower}",
        lambda x: bb.encode(tower, x, check=False),
        torch.rand(shape, device=device),
        proj,
        languagebind_flops(cfg),
        {
            "input": f"{tower} " + ("x".join(map(str, shape[1:]))),
            "width": vc.hidden_size,
            "blocks": vc.num_hidden_layers,
            "tokens": (S // vc.patch_size) ** 2 + 1,
            "frames": T if tower == "video" else 1,
            "params": sum(p.numel() for p in vm.parameters()),
        },
    )


def build_pointbert(tiny: bool, batch: int, device: torch.device) -> Tower:
    if tiny:
        cfg = pb.PointBERTConfig(
            trans_dim=32, depth=2, num_heads=2, group_size=8, num_group=32, encoder_dims=32
        )
        n_points, E = 512, 24
    else:
        cfg, n_points, E = pb.PointBERTConfig(), 8192, 1024  # Point-Bind: 8192 points
    with torch.device(device):
        model = pb.pointbind_pointbert(cfg, out_embed_dim=E).eval().requires_grad_(False)
    pc_feat = 2 * cfg.trans_dim
    x = torch.rand(batch, n_points, 3, device=device) * 2 - 1  # unit cube, as U(-1, 1)
    return Tower(
        "pointbert",
        lambda pts: model(pts, 0),
        x,
        E,
        pointbert_flops(cfg, n_points, pc_feat, E),
        {
            "input": f"points {n_points}x3",
            "width": cfg.trans_dim,
            "blocks": cfg.depth,
            "tokens": cfg.num_group + 1,
            "groups": f"{cfg.num_group}x{cfg.group_size}",
            "params": sum(p.numel() for p in model.parameters()),
        },
    )


def build(name: str, tiny: bool, batch: int, device: torch.device) -> Tower:
    if name == "imagebind_vision":
        return build_imagebind(tiny, batch, device)
    if name.startswith("languagebind_"):
        return build_languagebind(name.removeprefix("languagebind_"), tiny, batch, device)
    if name == "pointbert":
        return build_pointbert(tiny, batch, device)
    raise ValueError(f"unknown tower {name!r}; choose from {TOWERS}")


def attack_step(tower: Tower, device: torch.device, compiled: bool) -> Callable[[], torch.Tensor]:
    """The timed call: one forward + input-gradient backward under bf16 autocast."""
    g = torch.Generator(device=device).manual_seed(0)
    centers = F.normalize(torch.randn(NUM_CENTERS, tower.embed_dim, device=device, generator=g), -1)
    y = torch.randint(0, NUM_CENTERS, (tower.x.shape[0],), device=device, generator=g)

    def loss_fn(xa: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            z = tower.encode(xa)
        logits = F.normalize(z.float(), dim=-1) @ centers.t() / 0.07
        return F.cross_entropy(logits, y)

    fn = torch.compile(loss_fn) if compiled else loss_fn

    def step() -> torch.Tensor:
        xa = tower.x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(xa), xa)
        return grad

    step()  # warm up (and compile)
    return step


def main(argv: list[str] | None = None) -> Table:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    p.add_argument("--towers", default=",".join(TOWERS), help=f"comma list of {TOWERS}")
    p.add_argument(
        "--batch", type=int, default=None, help="samples per step (32 images/clouds, 4 clips)"
    )
    p.add_argument("--compile", action="store_true", help="add the torch.compile arm off GPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [t.strip() for t in args.towers.split(",") if t.strip()]
    for n in names:
        if n not in TOWERS:
            p.error(f"unknown tower {n!r}; choose from {', '.join(TOWERS)}")

    def batch_of(name: str) -> int:
        if args.batch:
            return args.batch
        if args.tiny or args.quick:
            return 2
        return 4 if name == "languagebind_video" else 32

    rate = matmul_rate(device, torch.bfloat16)
    table = Table("bench_bind_towers", device, limits={"matmul_tflops": rate})
    size = "tiny" if args.tiny else "released"
    towers: dict[str, Tower] = {}
    cases = []
    for name in names:
        B = batch_of(name)
        cases.append(Case(f"{name}_{size}_B{B}", {"tower": name, "B": B}))

    def arm(compiled: bool):
        def factory(case: Case):
            name = case.params["tower"]
            if name not in towers:  # built once per case, shared by the arms
                torch.manual_seed(0)
                towers[name] = build(name, args.tiny, case.params["B"], device)
            tower = towers[name]
            fwd, bwd = tower.flops
            case.params.update(
                tower.params,
                dtype="bf16-autocast",
                flops_per_sample_fwd=fwd,
                flops_per_sample_bwd=bwd,
                flops_per_step=case.params["B"] * 2 * fwd,
                flops_per_step_detailed=case.params["B"] * (fwd + bwd),
            )
            return attack_step(tower, device, compiled)

        return factory

    arms = {"eager": arm(False)}
    if device.type == "cuda" or args.compile:
        arms["compile"] = arm(True)
    for case in cases:  # one case at a time, so only one released-size tower is alive
        run_sweep(
            table, [case], arms, phase="fwd+bwd(input)", flops=lambda c: c.params["flops_per_step"]
        )
        towers.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def extra(r) -> dict:
        sec = r.timing.median_ms * 1e-3
        tf = r.params["flops_per_step_detailed"] / sec / 1e12
        return {
            "samples_per_s": r.params["B"] / sec,
            "tflops_detailed": tf,
            "frac_matmul_detailed": tf / rate if rate else None,
        }

    table.results[:] = [replace(r, extra={**r.extra, **extra(r)}) for r in table.results]
    table.print()
    for r in table.results:
        gf = 2 * r.params["flops_per_sample_fwd"] / 1e9
        gd = (r.params["flops_per_sample_fwd"] + r.params["flops_per_sample_bwd"]) / 1e9
        print(
            f"  {r.case:>34} {r.arm:>8}: {r.extra['samples_per_s']:10.1f} samples/s  "
            f"({gf:.4g} GFLOP/sample as 2x fwd; {gd:.4g} detailed fwd+bwd)"
        )
    if device.type != "cuda":
        print("  (CPU: the matmul limit is the harness's fp32 rate; fractions are indicative)")
    if args.json:
        table.write_json(args.json)
    return table


if __name__ == "__main__":
    main()
