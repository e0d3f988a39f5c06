"""Point-Bind's point encoder (PointBERT variant) into the ImageBind space, in pure torch.

Our own implementation of Point-Bind's ``PointTransformer_BIND`` + ``POINTBIND`` point path with
the official parameter names (``point_encoder.*``, ``pc_projection``,
``bind.modality_head_point.*``, ``bind.modality_postprocessor_point.*``), checked against
``pointbind_pointbert_tiny_A`` (``tests/test_pointbert.py``).

Pipeline, for a cloud ``(B, N, 3)`` in coordinate units:

1. grouping: farthest point sampling picks ``num_group`` centres ``(B, G, 3)``; each centre's
   ``group_size`` nearest points (kNN, squared Euclidean) minus the centre form the
   neighbourhoods ``(B, G, M, 3)``. Both are vectorised over the batch and all points; FPS is
   inherently sequential over its G picks (one batched argmax per pick, no loop over points).
2. mini-PointNet per group: Conv1d(3,128)-BN-ReLU-Conv1d(128,256), concat [group max,
   per-point] (512), Conv1d(512,512)-BN-ReLU-Conv1d(512,encoder_dims), max over the group.
3. ``reduce_dim`` -> tokens; learned CLS token/position; positions = MLP(3->128->D) of the
   centres, added before every block; pre-LN ViT blocks (qkv without bias, exact GELU).
4. final LayerNorm; feature = concat(CLS, max over group tokens) ``(B, 2D)``;
   ``@ pc_projection`` -> (B, 512); point head LayerNorm(eps 1e-6) -> Linear -> L2-normalise.

Upstream FPS starts at ``torch.randint(0, N, (B,))`` from the global RNG; ours takes an explicit
start index (default 0 in the Backbone), so an encoding is a deterministic function of the points.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# -- grouping -----------------------------------------------------------------------------------


def farthest_point_sample(
    xyz: torch.Tensor,
    num_samples: int,
    start: torch.Tensor | int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices ``(B, num_samples)`` of farthest point sampling on ``xyz (B, N, 3)``.

    Each pick is the point with the largest running minimum squared distance to the points
    picked so far (first maximum on ties). ``start``: the first index, an int or a ``(B,)``
    tensor; ``None`` draws it uniformly like upstream (``torch.randint`` on ``generator`` or
    the global RNG). Runs under ``no_grad`` (indices carry no gradient).
    """
    b, n, _ = xyz.shape
    if not 0 < num_samples <= n:
        raise ValueError(f"num_samples={num_samples} must be in [1, N={n}]")
    dev = xyz.device
    if start is None:
        start = torch.randint(0, n, (b,), generator=generator, device="cpu").to(dev)
    elif isinstance(start, int):
        start = torch.full((b,), start, dtype=torch.long, device=dev)
    start = start.to(device=dev, dtype=torch.long)
    if start.shape != (b,) or bool(((start < 0) | (start >= n)).any()):
        raise ValueError(f"start must be a (B,)={b} tensor or int of indices in [0, {n})")
    with torch.no_grad():
        pts = xyz.detach()
        idx = torch.empty(b, num_samples, dtype=torch.long, device=dev)
        dist = torch.full((b, n), 1e10, dtype=pts.dtype, device=dev)
        far = start
        rows = torch.arange(b, device=dev)
        for i in range(num_samples):  # sequential over picks; everything else batched
            idx[:, i] = far
            c = pts[rows, far].unsqueeze(1)  # (B, 1, 3)
            # sum of squared differences (not the expanded form): matches upstream's ties
            dist = torch.minimum(dist, ((pts - c) ** 2).sum(-1))
            far = dist.argmax(-1)
    return idx


def square_distance(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``(B, S, 3), (B, N, 3) -> (B, S, N)`` squared distances, ``|s|^2 - 2 s.d + |d|^2``.

    The expanded form (one batched matmul) as upstream's kNN, so neighbour sets agree.
    """
    d = -2.0 * src @ dst.transpose(1, 2)
    d = d + (src**2).sum(-1, keepdim=True)
    return d + (dst**2).sum(-1).unsqueeze(1)


def knn_indices(xyz: torch.Tensor, centers: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, G, k)`` of the ``k`` nearest points of ``xyz`` per centre, nearest first."""
    if not 0 < k <= xyz.shape[1]:
        raise ValueError(f"group size k={k} must be in [1, N={xyz.shape[1]}]")
    with torch.no_grad():
        d = square_distance(centers.detach(), xyz.detach())
        return d.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(
    xyz: torch.Tensor,
    num_group: int,
    group_size: int,
    start: torch.Tensor | int | None = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FPS centres ``(B, G, 3)`` and kNN neighbourhoods relative to them ``(B, G, M, 3)``.

    Differentiable w.r.t. ``xyz`` through the gathered coordinates (the selection is not).
    """
    b = xyz.shape[0]
    cidx = farthest_point_sample(xyz, num_group, start)
    rows = torch.arange(b, device=xyz.device)
    centers = xyz[rows[:, None], cidx]  # (B, G, 3)
    nidx = knn_indices(xyz, centers, group_size)  # (B, G, M)
    neighborhood = xyz[rows[:, None, None], nidx] - centers.unsqueeze(2)
    return neighborhood, centers


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointBERTConfig:
    """``PointTransformer_BIND`` sizes (Point-Bind's ``PointTransformer_8192point.yaml`` keys).

    Released (Point-Bind PointBERT): trans_dim 384, depth 12, heads 6, group 32, 512 groups,
    encoder_dims 256. ``cls_dim`` and ``drop_path_rate`` are unused at inference.
    """

    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    group_size: int = 32
    num_group: int = 512
    encoder_dims: int = 256
    drop_path_rate: float = 0.1
    cls_dim: int = 40

    def __post_init__(self) -> None:
        if self.trans_dim % self.num_heads:
            raise ValueError(
                f"trans_dim={self.trans_dim} must be divisible by num_heads={self.num_heads}"
            )
        for k in ("trans_dim", "depth", "num_heads", "group_size", "num_group", "encoder_dims"):
            if getattr(self, k) < 1:
                raise ValueError(f"PointBERTConfig.{k} must be >= 1, got {getattr(self, k)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PointBERTConfig:
        """Accepts the YAML/EasyDict keys (extra keys such as ``NAME`` are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# -- modules (official names) -------------------------------------------------------------------


class Encoder(nn.Module):
    """Mini-PointNet: ``(B, G, M, 3)`` neighbourhoods -> ``(B, G, encoder_channel)``."""

    def __init__(self, encoder_channel: int) -> None:
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Conv1d(512, encoder_channel, 1),
        )

    def forward(self, point_groups: torch.Tensor) -> torch.Tensor:
        b, g, m, _ = point_groups.shape
        x = point_groups.reshape(b * g, m, 3).transpose(1, 2)  # (BG, 3, M)
        f = self.first_conv(x)  # (BG, 256, M)
        f = torch.cat([f.amax(dim=2, keepdim=True).expand(-1, -1, m), f], dim=1)  # (BG, 512, M)
        f = self.second_conv(f).amax(dim=2)  # (BG, C)
        return f.view(b, g, self.encoder_channel)


class Attention(nn.Module):
    """timm-style MHSA: fused ``qkv`` (no bias) and ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (B, N, 3D) -> (3, B, H, N, D/H)
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN block (drop path is identity at inference)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """Blocks with the positional embedding re-added before each: ``x = block(x + pos)``."""

    def __init__(self, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointTransformer(nn.Module):
    """Point-Bind's ``PointTransformer_BIND``: cloud ``(B, N, 3)`` -> ``(B, 2*trans_dim)``."""

    def __init__(self, config: PointBERTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.trans_dim
        self.encoder = Encoder(config.encoder_dims)
        self.reduce_dim = nn.Linear(config.encoder_dims, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, d))
        self.blocks = TransformerEncoder(d, config.depth, config.num_heads)
        self.norm = nn.LayerNorm(d)

    def group(
        self, pts: torch.Tensor, start: torch.Tensor | int | None = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(neighbourhood (B, G, M, 3), centres (B, G, 3))."""
        return group_points(pts, self.config.num_group, self.config.group_size, start)

    def forward_groups(self, neighborhood: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Encode already-grouped points (lets a caller reuse or check the grouping)."""
        tokens = self.reduce_dim(self.encoder(neighborhood))  # (B, G, D)
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(center)], dim=1)
        x = self.norm(self.blocks(x, pos))
        return torch.cat([x[:, 0], x[:, 1:].amax(dim=1)], dim=-1)

    def forward(self, pts: torch.Tensor, start: torch.Tensor | int | None = 0) -> torch.Tensor:
        return self.forward_groups(*self.group(pts, start))


class Normalize(nn.Module):
    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=self.dim, p=2)


class LogitScaling(nn.Module):
    """``clip(exp(log_logit_scale), max) * x`` with a fixed (buffer) scale, as ImageBind's."""

    def __init__(self, init: float = 1.0, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale
        self.register_buffer("log_logit_scale", torch.tensor(float(init)).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale) * x


def point_head(out_embed_dim: int, in_dim: int = 512) -> nn.Sequential:
    """``modality_head_point``: LayerNorm(eps 1e-6) -> Dropout -> Linear(no bias)."""
    return nn.Sequential(
        nn.LayerNorm(in_dim, eps=1e-6),
        nn.Dropout(0.5),
        nn.Linear(in_dim, out_embed_dim, bias=False),
    )


class PointBindBind(nn.Module):
    """Stand-in for ``POINTBIND.bind`` holding only its point head and postprocessor."""

    def __init__(self, out_embed_dim: int) -> None:
        super().__init__()
        self.modality_head_point = point_head(out_embed_dim)
        self.modality_postprocessor_point = nn.Sequential(Normalize(), LogitScaling(1.0))


class PointBind(nn.Module):
    """Point-Bind's ``POINTBIND`` point path: cloud -> ImageBind-space embedding.

    ``bind``: a module that has (or will get) ``modality_head_point`` /
    ``modality_postprocessor_point``; ``None`` makes a stand-in holding only those (an
    ImageBind model can be passed so the state_dict is the full released ``POINTBIND`` one).
    """

    def __init__(
        self,
        point_encoder: nn.Module,
        pc_feat_dims: int,
        out_embed_dim: int = 1024,
        bind: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.point_encoder = point_encoder
        self.pc_projection = nn.Parameter(torch.empty(pc_feat_dims, 512))
        nn.init.normal_(self.pc_projection, std=512**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1/0.07); unused here
        if bind is None:
            bind = PointBindBind(out_embed_dim)
        else:
            bind.modality_head_point = point_head(out_embed_dim)
            bind.modality_postprocessor_point = nn.Sequential(Normalize(), LogitScaling(1.0))
        self.bind = bind

    def encode_pc(self, pc: torch.Tensor, start: torch.Tensor | int | None = 0) -> torch.Tensor:
        """``(B, N, 3) -> (B, 512)``: encoder feature @ pc_projection."""
        return self.point_encoder(pc, start) @ self.pc_projection

    def head(self, pc_feat: torch.Tensor) -> torch.Tensor:
        """``(B, 512)`` -> head output ``(B, out)``, before normalisation."""
        return self.bind.modality_head_point(pc_feat)

    def forward(self, pc: torch.Tensor, start: torch.Tensor | int | None = 0) -> torch.Tensor:
        """``pc_embed`` (unit norm x fixed scale 1.0), as ``POINTBIND.forward(...)['pc_embed']``."""
        return self.bind.modality_postprocessor_point(self.head(self.encode_pc(pc, start)))


def pointbind_pointbert(
    config: PointBERTConfig | Mapping[str, Any] | None = None,
    *,
    out_embed_dim: int = 1024,
    pc_feat_dims: int | None = None,
    bind: nn.Module | None = None,
) -> PointBind:
    """``PointBind_PointBERT``: PointBERT encoder + projection + point head.

    ``pc_feat_dims`` defaults to ``2 * trans_dim`` (the encoder's CLS+max feature).
    """
    if config is None:
        config = PointBERTConfig()
    elif not isinstance(config, PointBERTConfig):
        config = PointBERTConfig.from_dict(config)
    return PointBind(
        PointTransformer(config),
        pc_feat_dims or 2 * config.trans_dim,
        out_embed_dim=out_embed_dim,
        bind=bind,
    )


POINT_KEY_PREFIXES = (
    "point_encoder.",
    "pc_projection",
    "logit_scale",
    "bind.modality_head_point.",
    "bind.modality_postprocessor_point.",
)


def point_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The point-path keys of a Point-Bind checkpoint (``module.`` prefixes stripped)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith(POINT_KEY_PREFIXES):
            out[k] = v
    return out


__all__ = [
    "Encoder",
    "PointBERTConfig",
    "PointBind",
    "PointTransformer",
    "farthest_point_sample",
    "group_points",
    "knn_indices",
    "point_state_dict",
    "pointbind_pointbert",
    "square_distance",
]
