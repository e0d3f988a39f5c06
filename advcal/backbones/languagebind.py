"""Native LanguageBind (PKU-YuanGroup) towers: image, video, audio, depth, thermal + text.

Our own implementation of the released ``LanguageBind<Tower>`` models (HF CLIP ViT geometry),
with the official parameter names so a released checkpoint directory (``config.json`` +
``pytorch_model.bin`` / ``model.safetensors``) loads strictly. Attention runs through
``scaled_dot_product_attention``. Parity with the official classes is checked against
``languagebind_tiny_A`` (``tests/test_languagebind.py``).

Architecture (every tower = CLIP text transformer + CLIP vision transformer + projections):

- Pre-LN blocks: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``, quick-GELU MLP, LN eps 1e-5.
- Vision: conv patchify (no bias) + CLS + learned positions -> ``pre_layrnorm`` -> blocks ->
  ``post_layernorm(x[:, 0])`` -> ``visual_projection`` (no bias).
- Video (``add_time_attn``): frames ``(B, C, T, H, W)`` run as ``B*T`` images; every block first
  adds ``temporal_embedding[:, :T]`` and runs a pre-LN attention across the T frames of each
  token (``temporal_layer_norm1`` / ``temporal_attn``, residual); pooled CLS features are
  averaged over T.
- Audio: the same vision tower on a 3-chunk normalised fbank ``(B, 3, mel, frames)``; its
  position table is sized to the (mel/patch) x (frames/patch) grid (667 rows when released).
- Text: causal + padding mask, ``final_layer_norm``, pooled at ``argmax(input_ids)`` (first eot).

Preprocessing (``LanguageBindBackbone``) is differentiable and deterministic. Upstream data
loading is stochastic in places (random flips / random audio chunks in some versions); ours is
not: audio longer than the target takes the first start of each third of the valid chunk
starts (front / middle / back, as the current upstream processor does), no flips, no crops.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from advcal.backbones.base import Backbone
from advcal.specs import InputSpec

log = logging.getLogger(__name__)

TOWERS = ("image", "video", "audio", "depth", "thermal")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# LanguageBind audio normalisation: (fbank - mean) / (2 * std), as its released processor.
AUDIO_MEAN = -4.2677393
AUDIO_STD = 4.5689974


# -- configuration -----------------------------------------------------------------------------
def _known(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only the fields ``cls`` declares (HF config.json files carry many others)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class LanguageBindTextConfig:
    """CLIP text transformer sizes (``text_config`` of a LanguageBind config.json)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    def __post_init__(self) -> None:
        _check_heads("text_config", self.hidden_size, self.num_attention_heads)
        _check_act("text_config", self.hidden_act)


@dataclass(frozen=True)
class LanguageBindVisionConfig:
    """CLIP vision transformer sizes plus LanguageBind's tower options (``vision_config``).

    ``lora_r > 0`` means the released weights carry peft LoRA adapters on the attention
    projections; the loader merges them (``W += B @ A * lora_alpha / lora_r``).
    ``num_mel_bins``/``target_length`` > 0 make it the audio tower (non-square patch grid).
    """

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    add_time_attn: bool = False
    num_frames: int = 1
    num_mel_bins: int = 0
    target_length: int = 0
    force_patch_dropout: float = 0.0
    max_depth: float = 10.0
    audio_sample_rate: int = 16000

    def __post_init__(self) -> None:
        _check_heads("vision_config", self.hidden_size, self.num_attention_heads)
        _check_act("vision_config", self.hidden_act)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config.image_size={self.image_size} must be a multiple of "
                f"patch_size={self.patch_size}"
            )
        if self.add_time_attn and self.num_frames < 1:
            raise ValueError("vision_config.num_frames must be >= 1 with add_time_attn")
        if (self.num_mel_bins > 0) != (self.target_length > 0):
            raise ValueError(
                "vision_config.num_mel_bins and target_length must both be > 0 (audio tower) "
                f"or both 0; got {self.num_mel_bins}, {self.target_length}"
            )

    @property
    def is_audio(self) -> bool:
        return self.num_mel_bins > 0

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols): (mel/p, frames/p) for audio, (S/p, S/p) otherwise."""
        p = self.patch_size
        if self.is_audio:
            return self.num_mel_bins // p, self.target_length // p
        return self.image_size // p, self.image_size // p


def _check_heads(where: str, dim: int, heads: int) -> None:
    if heads < 1 or dim % heads:
        raise ValueError(f"{where}.hidden_size={dim} must be divisible by num_attention_heads")


def _check_act(where: str, act: str) -> None:
    if act not in _ACTS:
        raise ValueError(f"{where}.hidden_act={act!r} unsupported; use one of {sorted(_ACTS)}")


@dataclass(frozen=True)
class LanguageBindConfig:
    """``LanguageBind<Tower>Config(text_config, vision_config, projection_dim)``.

    Sub-configs may be given as dicts (as in ``config.json``); unknown keys are ignored, as HF
    does. ``tower`` is ours (image/video/audio/depth/thermal): it only picks preprocessing.
    """

    text_config: LanguageBindTextConfig | Mapping[str, Any] = field(
        default_factory=LanguageBindTextConfig
    )
    vision_config: LanguageBindVisionConfig | Mapping[str, Any] = field(
        default_factory=LanguageBindVisionConfig
    )
    projection_dim: int = 768
    logit_scale_init_value: float = 2.6592

    def __post_init__(self) -> None:
        tc, vc = self.text_config, self.vision_config
        if not isinstance(tc, LanguageBindTextConfig):
            tc = LanguageBindTextConfig(**_known(LanguageBindTextConfig, dict(tc or {})))
        if not isinstance(vc, LanguageBindVisionConfig):
            vc = LanguageBindVisionConfig(**_known(LanguageBindVisionConfig, dict(vc or {})))
        object.__setattr__(self, "text_config", tc)
        object.__setattr__(self, "vision_config", vc)
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {self.projection_dim}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LanguageBindConfig:
        return cls(**_known(cls, d))

    @classmethod
    def from_json_file(cls, path: str | Path) -> LanguageBindConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def infer_tower(self) -> str:
        vc = self.vision_config
        assert isinstance(vc, LanguageBindVisionConfig)
        if vc.is_audio:
            return "audio"
        if vc.add_time_attn:
            return "video"
        return "image"


# -- modules (official parameter names) --------------------------------------------------------
def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class CLIPAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (HF CLIP names)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x (N, L, D) -> q/k/v (N, H, L, D/H); mask: bool (N|1, 1, L, L), True = attend.
        n, length, d = x.shape
        h = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(n, length, d))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.act = _ACTS[act]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block; with ``num_frames`` set it first runs LanguageBind's temporal attention."""

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: int,
        act: str,
        eps: float,
        num_frames: int | None = None,
    ) -> None:
        super().__init__()
        self.add_time_attn = num_frames is not None
        if num_frames is not None:
            self.temporal_embedding = nn.Parameter(torch.zeros(1, num_frames, dim))
            self.temporal_attn = CLIPAttention(dim, heads)
            self.temporal_layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, hidden, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def _temporal(self, x: torch.Tensor, t: int) -> torch.Tensor:
        # x (B*T, N, D), frames of one clip adjacent -> (B*N, T, D): attention across frames.
        bt, n, d = x.shape
        b = bt // t
        xt = x.view(b, t, n, d).transpose(1, 2).reshape(b * n, t, d)
        if t != 1:
            xt = xt + self.temporal_embedding[:, :t]
        xt = xt + self.temporal_attn(self.temporal_layer_norm1(xt))
        return xt.view(b, n, t, d).transpose(1, 2).reshape(bt, n, d)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, num_frames: int = 1
    ) -> torch.Tensor:
        if self.add_time_attn:
            x = self._temporal(x, num_frames)
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, layers: list[CLIPEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, num_frames: int = 1
    ) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask, num_frames)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: LanguageBindTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        # persistent: transformers 4.30 (the release) saves it, so manifests list it
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).unsqueeze(0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding(
            self.position_ids[:, :length]
        )


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: LanguageBindTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(
            [
                CLIPEncoderLayer(
                    cfg.hidden_size,
                    cfg.num_attention_heads,
                    cfg.intermediate_size,
                    cfg.hidden_act,
                    cfg.layer_norm_eps,
                )
                for _ in range(cfg.num_hidden_layers)
            ]
        )
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids (B, L)`` -> (last_hidden_state (B, L, D), pooled (B, D) at first eot)."""
        b, length = input_ids.shape
        x = self.embeddings(input_ids)
        # bool mask (B|1, 1, L, L): causal, and keys outside attention_mask never attended.
        mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.to(torch.bool)[:, None, None, :]
        x = self.final_layer_norm(self.encoder(x, mask))
        eot = input_ids.to(torch.int64).argmax(dim=-1)
        return x, x[torch.arange(b, device=x.device), eot]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: LanguageBindVisionConfig) -> None:
        super().__init__()
        d, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, p, stride=p, bias=False)
        rows, cols = cfg.grid
        self.num_positions = rows * cols + 1
        self.position_embedding = nn.Embedding(self.num_positions, d)
        self.register_buffer("position_ids", torch.arange(self.num_positions).unsqueeze(0))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> patches (N, rows*cols, D), row-major over (H, W) -> + CLS + positions
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)
        if x.shape[1] + 1 != self.num_positions:
            raise ValueError(
                f"input of spatial size {tuple(pixel_values.shape[-2:])} gives "
                f"{x.shape[1]} patches; this tower's position table has "
                f"{self.num_positions - 1}"
            )
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + self.position_embedding(self.position_ids)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: LanguageBindVisionConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        frames = cfg.num_frames if cfg.add_time_attn else None
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(d, eps=eps)  # sic: the official name
        self.encoder = CLIPEncoder(
            [
                CLIPEncoderLayer(
                    d, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act, eps, frames
                )
                for _ in range(cfg.num_hidden_layers)
            ]
        )
        self.post_layernorm = nn.LayerNorm(d, eps=eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` or video ``(B, C, T, H, W)`` -> (last_hidden_state, pooled (B, D)).

        For video, last_hidden_state is ``(B*T, N, D)`` and pooled is the mean over T of the
        per-frame ``post_layernorm(CLS)``.
        """
        t = 1
        if pixel_values.dim() == 5:
            b, c, t, h, w = pixel_values.shape
            pixel_values = pixel_values.transpose(1, 2).reshape(b * t, c, h, w)
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x = self.encoder(x, None, t)
        pooled = self.post_layernorm(x[:, 0])
        if t > 1:
            pooled = pooled.view(-1, t, pooled.shape[-1]).mean(1)
        return x, pooled


class LanguageBindOutput(NamedTuple):
    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    text_embeds: torch.Tensor
    image_embeds: torch.Tensor


class LanguageBindModel(nn.Module):
    """One LanguageBind tower (``LanguageBind{Image,Video,Audio,Depth,Thermal}``)."""

    def __init__(self, config: LanguageBindConfig) -> None:
        super().__init__()
        tc, vc = config.text_config, config.vision_config
        assert isinstance(tc, LanguageBindTextConfig)
        assert isinstance(vc, LanguageBindVisionConfig)
        self.config = config
        self.text_model = CLIPTextTransformer(tc)
        self.vision_model = CLIPVisionTransformer(vc)
        self.visual_projection = nn.Linear(vc.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(tc.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised modality features ``(B, projection_dim)``."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> LanguageBindOutput:
        image = F.normalize(self.get_image_features(pixel_values), dim=-1)
        text = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        logits_per_text = self.logit_scale.exp() * text @ image.t()
        return LanguageBindOutput(logits_per_text.t(), logits_per_text, text, image)


# -- checkpoints -------------------------------------------------------------------------------
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_LORA_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file or HF directory, loaded safely (no arbitrary unpickling).

    Reads ``*.safetensors`` with safetensors and anything else with
    ``torch.load(weights_only=True)``; a directory may hold a single file or a sharded
    ``*.index.json``.
    """
    path = Path(path)
    if path.is_dir():
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                return read_state_dict(path / name)
            index = path / f"{name}.index.json"
            if index.is_file():
                shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                sd: dict[str, torch.Tensor] = {}
                for shard in sorted(set(shards.values())):
                    sd.update(read_state_dict(path / shard))
                return sd
        raise FileNotFoundError(
            f"no weights in checkpoint directory {path}: expected one of {list(_WEIGHT_FILES)} "
            "(or a sharded *.index.json)"
        )
    # one file: the shared safe reader (safetensors or torch.load(weights_only=True))
    from advcal.backbones.imagebind import read_checkpoint

    return read_checkpoint(path)


def merge_lora(
    sd: Mapping[str, torch.Tensor], scaling: float | None = None, *, lora_alpha: float = 16.0
) -> tuple[dict[str, torch.Tensor], int]:
    """Undo peft's wrapping and fold LoRA adapters into the base weights.

    peft renames ``vision_model.encoder.X`` to ``vision_model.encoder.base_model.model.X`` and
    adds ``<mod>.lora_A[.default].weight`` (r, in) / ``lora_B`` (out, r) next to the base
    ``<mod>.weight`` (or ``<mod>.base_layer.weight`` in newer peft). The merged weight is
    ``W + (B @ A) * scaling``, ``scaling = lora_alpha / r`` unless given. Returns the plain
    state_dict and the number of merged pairs.
    """
    plain: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        k = k.replace(".base_model.model.", ".").replace(".base_layer.", ".")
        m = _LORA_RE.match(k)
        if m:
            lora.setdefault(m["mod"], {})[m["ab"]] = v
        else:
            plain[k] = v
    for mod, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter of {mod} is incomplete: has only lora_{set(ab)}")
        a, b = ab["A"].float(), ab["B"].float()
        key = f"{mod}.weight"
        if key not in plain:
            raise ValueError(f"LoRA adapter for {mod} but no base weight {key} in the checkpoint")
        s = lora_alpha / a.shape[0] if scaling is None else scaling
        w = plain[key]
        plain[key] = (w.float() + (b @ a) * s).to(w.dtype)
    return plain, len(lora)


def load_state_dict_checked(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    what: str,
    optional: Sequence[str] = ("position_ids", "num_batches_tracked"),
    only: Callable[[str], bool] | None = None,
) -> None:
    """Strict, shape-checked load with one clear error naming missing/unexpected/mismatched keys.

    Keys ending in one of ``optional`` may be absent (they are recomputed buffers). Works for a
    module built on the ``meta`` device: tensors are assigned, not copied. ``only`` restricts the
    check and the load to the module keys it accepts (a part of a larger model).
    """
    own = module.state_dict(keep_vars=True)
    if only is not None:
        own = {k: v for k, v in own.items() if only(k)}
    missing = [k for k in own if k not in sd and not k.endswith(tuple(optional))]
    unexpected = [k for k in sd if k not in own]
    bad = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or bad:

        def show(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f" ... ({len(xs)} in all)" if len(xs) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if bad:
            parts.append(f"shape mismatches: {show(bad)}")
        raise ValueError(
            f"checkpoint does not fit {what}: " + "; ".join(parts) + ". Check that "
            "config.json matches the weights (sizes, tower options, lora_r) and that the "
            "checkpoint is of this model."
        )
    full = dict(sd)
    for k, t in own.items():
        if k not in full:  # an optional buffer: keep the module's own (recomputed) value
            if t.is_meta:
                raise ValueError(f"{what}: buffer {k} absent from checkpoint and not recomputable")
            full[k] = t.detach()
    module.load_state_dict(full, strict=only is None, assign=True)


def _meta_safe_buffers(model: nn.Module) -> None:
    """Recompute ``position_ids`` buffers of a model built on the meta device."""
    for mod in model.modules():
        if isinstance(mod, (CLIPTextEmbeddings, CLIPVisionEmbeddings)) and mod.position_ids.is_meta:
            n = mod.position_ids.shape[1]
            mod.position_ids = torch.arange(n).unsqueeze(0)


def load_languagebind_model(
    checkpoint: str | Path,
    config: LanguageBindConfig | Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = torch.float32,
) -> LanguageBindModel:
    """Build a LanguageBind tower from a released checkpoint (directory or weights file).

    The sizes come from ``config.json`` next to the weights (or ``config=``). LoRA-tuned
    checkpoints (peft key names) are merged at load time, with a warning saying so.
    """
    path = Path(checkpoint)
    if config is None:
        cfg_path = (path if path.is_dir() else path.parent) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"no config.json at {cfg_path}: LanguageBind reads its sizes from it "
                "(or pass config=)"
            )
        config = LanguageBindConfig.from_json_file(cfg_path)
    elif not isinstance(config, LanguageBindConfig):
        config = LanguageBindConfig.from_dict(config)
    sd = read_state_dict(path)
    if any(".lora_A" in k or ".base_model.model." in k for k in sd):
        vc = config.vision_config
        assert isinstance(vc, LanguageBindVisionConfig)
        sd, n = merge_lora(sd, lora_alpha=vc.lora_alpha)
        log.warning(
            "LanguageBind checkpoint %s is LoRA-tuned (peft keys): merged %d LoRA adapter "
            "pairs into the base weights (scaling lora_alpha/r, lora_alpha=%g)",
            path,
            n,
            vc.lora_alpha,
        )
    with torch.device("meta"):
        model = LanguageBindModel(config)
    _meta_safe_buffers(model)
    load_state_dict_checked(model, sd, what=f"LanguageBind model from {path}")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# -- the Backbone ------------------------------------------------------------------------------
def _tower_of(name: str) -> str | None:
    """``languagebind_video_ft`` -> ``video``; ``languagebind``/``languagebind_all`` -> None."""
    rest = name.lower().removeprefix("languagebind").strip("_")
    rest = rest.removesuffix("_ft").removesuffix("_huge")
    if rest in ("", "all"):
        return None
    if rest not in TOWERS:
        raise ValueError(f"unknown LanguageBind tower in {name!r}; towers: {list(TOWERS)}")
    return rest


class LanguageBindBackbone(Backbone):
    """LanguageBind towers as one advcal Backbone; all modalities share one text tower.

    Input conventions (all differentiable; attacks act on these):

    - ``image``: ``(3, S, S)`` RGB in [0, 1] at the tower's ``image_size`` (no resize inside);
      CLIP mean/std normalisation inside.
    - ``video``: ``(T, 3, S, S)`` frames in [0, 1], **time first** (the convention of every
      advcal backbone's ``encode("video", x)``: ImageBind, minibind), T = the tower's
      ``num_frames``; rearranged inside to the official ``(3, T, S, S)`` pixel_values (the
      model-level :meth:`LanguageBindModel.forward` keeps the official layout).
    - ``depth``: ``(1, S, S)`` in metres, valid [0, max_depth]; clamped to
      [0.01, max_depth], divided by max_depth, repeated to 3 channels, CLIP-normalised (as the
      upstream processor). Default L-inf eps = max_depth * 4/255 (same relative budget).
    - ``thermal``: ``(1, S, S)`` in [0, 1], repeated to 3 channels, CLIP-normalised.
    - ``audio``: ``audio_input="waveform"`` (default): ``(N,)`` mono 16 kHz in [-1, 1],
      ``N = target_length * 160`` by default; mean removed, Kaldi fbank (mel bins
      ``num_mel_bins``, 25/10 ms, Hann) through the shared :mod:`advcal.backbones.audio`,
      3 chunks of ``target_length`` frames stacked as channels, normalised
      ``(x + 4.2677393) / (2 * 4.5689974)``. ``audio_input="fbank"``: ``(3, mel, frames)`` the
      normalised fbank itself (unbounded; eps in normalised units).

    Embeddings are the official ``image_embeds``/``text_embeds``: projected and L2-normalised.
    """

    name = "languagebind"

    def __init__(
        self,
        towers: Mapping[str, LanguageBindModel],
        *,
        audio_input: str = "waveform",
        audio_samples: int | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        if not towers:
            raise ValueError("LanguageBindBackbone needs at least one tower")
        bad = [t for t in towers if t not in TOWERS]
        if bad:
            raise ValueError(f"unknown LanguageBind towers {bad}; use {list(TOWERS)}")
        if audio_input not in ("waveform", "fbank"):
            raise ValueError(f"audio_input must be 'waveform' or 'fbank', got {audio_input!r}")
        dims = {m.config.projection_dim for m in towers.values()}
        if len(dims) != 1:
            raise ValueError(f"towers project to different widths {sorted(dims)}")
        self.audio_input = audio_input
        specs = {t: self._make_spec(t, m, audio_samples) for t, m in towers.items()}
        super().__init__(specs, dims.pop())
        self.towers = nn.ModuleDict(dict(towers))
        self._share_text()
        self._tokenizer = tokenizer
        self.fbank: nn.Module | None = None
        if "audio" in towers and audio_input == "waveform":
            from advcal.backbones.audio import FbankConfig, KaldiFbank

            avc = towers["audio"].config.vision_config
            assert isinstance(avc, LanguageBindVisionConfig)
            # Kaldi fbank as upstream: Hann window, 25 ms / 10 ms, htk-compatible, no dither
            self.fbank = KaldiFbank(
                FbankConfig(sample_rate=avc.audio_sample_rate, num_mel_bins=avc.num_mel_bins)
            )
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    # -- construction helpers ------------------------------------------------------------------
    def _make_spec(self, tower: str, model: LanguageBindModel, audio_samples: int | None):
        vc = model.config.vision_config
        assert isinstance(vc, LanguageBindVisionConfig)
        s = vc.image_size
        if tower == "image":
            return InputSpec((3, s, s), description="RGB in [0,1], CLIP-normalised inside")
        if tower == "video":
            return InputSpec(
                (vc.num_frames, 3, s, s), description="frames (T,C,H,W) in [0,1], time first"
            )
        if tower == "thermal":
            return InputSpec((1, s, s), description="thermal map in [0,1]")
        if tower == "depth":
            return InputSpec(
                (1, s, s),
                lo=0.0,
                hi=vc.max_depth,
                eps=vc.max_depth * 4 / 255,
                space="metres",
                description=f"depth in metres, valid [0, {vc.max_depth:g}]",
            )
        if not vc.is_audio:
            raise ValueError("the audio tower needs num_mel_bins/target_length in its config")
        if self.audio_input == "fbank":
            return InputSpec(
                (3, vc.num_mel_bins, vc.target_length),
                lo=None,
                hi=None,
                eps=0.25,
                space="fbank",
                description="normalised log-mel fbank, 3 chunks (LanguageBind units)",
            )
        n = audio_samples or vc.target_length * vc.audio_sample_rate // 100
        return InputSpec(
            (n,),
            lo=-1.0,
            hi=1.0,
            eps=0.002,
            space="waveform",
            description=f"mono waveform at {vc.audio_sample_rate} Hz in [-1,1]",
        )

    def _share_text(self) -> None:
        """Keep one text tower: later towers reuse the first's when their weights are equal."""
        first = next(iter(self.towers.values()))
        for t, m in list(self.towers.items())[1:]:
            mine, theirs = first.text_model.state_dict(), m.text_model.state_dict()
            same = (
                mine.keys() == theirs.keys()
                and all(
                    mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k])
                    for k in mine
                )
                and torch.equal(first.text_projection.weight, m.text_projection.weight)
            )
            if same:
                m.text_model = first.text_model
                m.text_projection = first.text_projection
            else:
                log.warning(
                    "LanguageBind %s tower's text weights differ from the %s tower's; "
                    "encode_text uses the %s tower",
                    t,
                    next(iter(self.towers)),
                    next(iter(self.towers)),
                )

    # -- preprocessing ----------------------------------------------------------------------
    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def preprocess(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Valid-range input -> the official ``pixel_values`` of the tower (differentiable)."""
        vc = self.towers[modality].config.vision_config
        assert isinstance(vc, LanguageBindVisionConfig)
        if modality == "image":
            return self._normalise(x)
        if modality == "video":
            # (B, T, 3, H, W) time first -> official (B, 3, T, H, W), per-channel CLIP norm
            b, t = x.shape[:2]
            px = self._normalise(x.reshape(b * t, *x.shape[2:])).view(x.shape)
            return px.transpose(1, 2)
        if modality == "thermal":
            return self._normalise(x.expand(-1, 3, -1, -1))
        if modality == "depth":
            d = x.clamp(0.01, vc.max_depth) / vc.max_depth
            return self._normalise(d.expand(-1, 3, -1, -1))
        if self.audio_input == "fbank":
            return x
        return self.waveform_to_fbank(x)

    def waveform_to_fbank(self, wav: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` waveform -> ``(B, 3, mel, target_length)`` normalised fbank chunks."""
        if self.fbank is None:
            raise ValueError("this backbone was built with audio_input='fbank'")
        vc = self.towers["audio"].config.vision_config
        assert isinstance(vc, LanguageBindVisionConfig)
        sr, target = vc.audio_sample_rate, vc.target_length
        max_len = target * sr // 100
        wav = wav.float()
        n = wav.shape[-1]
        if n < max_len:  # repeat whole copies, then zero-pad (upstream)
            wav = wav.repeat(1, max_len // n)
            wav = F.pad(wav, (0, max_len - wav.shape[-1]))
        wav = wav - wav.mean(dim=-1, keepdim=True)
        mel = self.fbank(wav)  # (B, frames, mel)
        frames = mel.shape[1]
        if n > max_len and frames > target:
            # deterministic chunk starts: first start of each third of range(frames - target + 1)
            k = frames - target + 1
            sizes = [k // 3 + (1 if i < k % 3 else 0) for i in range(3)]
            starts = [0, sizes[0] if sizes[1] else 0, sizes[0] + sizes[1] if sizes[2] else 0]
            chunks = torch.stack([mel[:, s : s + target] for s in starts], dim=1)
        else:
            chunks = mel.unsqueeze(1).expand(-1, 3, -1, -1)
        p = target - chunks.shape[2]
        if p > 0:
            chunks = F.pad(chunks, (0, 0, 0, p))
        chunks = chunks[:, :, :target]
        # (B, 3, frames, mel) -> (B, 3, mel, frames), then LanguageBind's normalisation
        return (chunks.transpose(2, 3) - AUDIO_MEAN) / (2 * AUDIO_STD)

    # -- Backbone API ---------------------------------------------------------------------------
    def _encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        model = self.towers[modality]
        w = model.visual_projection.weight
        px = self.preprocess(modality, x)
        return F.normalize(model.get_image_features(px.to(w.dtype)), dim=-1)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP BPE ids ``(N, 77)`` and the attention mask (1 from sot to eot)."""
        if self._tokenizer is None:
            from advcal.backbones.clip_tokenizer import get_tokenizer

            # HF CLIPTokenizer(max_length=77, truncation=True) keeps eot: truncate="eot"
            self._tokenizer = get_tokenizer(77)
        ids = self._tokenizer(list(prompts))
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        ids = ids.to(torch.int64)
        eot = ids.argmax(dim=-1, keepdim=True)
        mask = (torch.arange(ids.shape[1]).unsqueeze(0) <= eot).to(torch.int64)
        return ids, mask

    def transforms(self) -> dict[str, Any]:
        """LanguageBind's preprocessing up to each tower's input (DATA.md §1.2, see
        :func:`advcal.data.transforms.languagebind_transforms`); the audio transform tiles to
        this backbone's waveform length (none with ``audio_input="fbank"``)."""
        from advcal.data.transforms import languagebind_transforms

        out: dict[str, Any] = {}
        for t, model in self.towers.items():
            vc = model.config.vision_config
            assert isinstance(vc, LanguageBindVisionConfig)
            if t == "audio" and self.audio_input != "waveform":
                continue
            samples = self.spec("audio").shape[0] if t == "audio" else None
            out[t] = languagebind_transforms(
                vc.image_size,
                num_frames=vc.num_frames,
                audio_samples=samples,
                max_depth=vc.max_depth,
            )[t]
        return out

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        model = next(iter(self.towers.values()))
        ids, mask = self.tokenize(prompts)
        dev = model.text_projection.weight.device
        return F.normalize(model.get_text_features(ids.to(dev), mask.to(dev)), dim=-1)


def _find_tower_dirs(root: Path) -> dict[str, Path]:
    """Sub-directories of ``root`` named like ``LanguageBind_Video_FT`` -> {tower: path}."""
    found: dict[str, Path] = {}
    for sub in sorted(root.iterdir()):
        if not (sub.is_dir() and (sub / "config.json").is_file()):
            continue
        t = sub.name.lower().removeprefix("languagebind").strip("_").removesuffix("_ft")
        if t in TOWERS and (t not in found or sub.name.lower().endswith("_ft")):
            found[t] = sub  # prefer the fully fine-tuned (_FT) release when both exist
    return found


def load(
    name: str = "languagebind_image",
    checkpoint: str | Path | Mapping[str, str | Path] | None = None,
    device: str | torch.device | None = None,
    *,
    config: LanguageBindConfig | Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = torch.float32,
    audio_input: str = "waveform",
    audio_samples: int | None = None,
    tokenizer: Any | None = None,
) -> LanguageBindBackbone:
    """Registry entry for ``languagebind_<tower>[_ft]`` and ``languagebind_all``.

    ``checkpoint``: for one tower, its HF directory (``config.json`` + weights) or a weights
    file (then ``config.json`` beside it, or ``config=``). For ``languagebind_all``: a
    ``{tower: path}`` mapping, or a root directory holding ``LanguageBind_<Tower>[_FT]/``.
    Nothing is downloaded.
    """
    if checkpoint is None:
        raise ValueError(
            f"backbone {name!r} needs checkpoint=: a local LanguageBind checkpoint directory "
            "(config.json + pytorch_model.bin/model.safetensors); nothing is downloaded"
        )
    tower = _tower_of(name)
    if isinstance(checkpoint, Mapping):
        paths = {str(t): Path(p) for t, p in checkpoint.items()}
    elif tower is None:
        paths = _find_tower_dirs(Path(checkpoint))
        if not paths:
            raise FileNotFoundError(
                f"no LanguageBind_<Tower> checkpoint directories in {checkpoint}"
            )
    else:
        paths = {tower: Path(checkpoint)}
    towers = {t: load_languagebind_model(p, config, dtype=dtype) for t, p in paths.items()}
    bb = LanguageBindBackbone(
        towers, audio_input=audio_input, audio_samples=audio_samples, tokenizer=tokenizer
    )
    bb.name = name
    if device is not None:
        bb.to(device)
    return bb


__all__ = [
    "LanguageBindBackbone",
    "LanguageBindConfig",
    "LanguageBindModel",
    "LanguageBindOutput",
    "LanguageBindTextConfig",
    "LanguageBindVisionConfig",
    "load",
    "load_languagebind_model",
    "load_state_dict_checked",
    "merge_lora",
    "read_state_dict",
]
