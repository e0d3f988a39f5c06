"""Native UniBind (QC-LY/UniBind): frozen ImageBind + Point-Bind point encoder, its per-modality
linear heads, and its LLM-augmented multi-center embeddings.

UniBind = ``backbone`` (Point-Bind's ``POINTBIND``: ``bind`` = ImageBind-Huge with a point
head, plus a point encoder and ``pc_projection``) + one ``mlp_for_<modality>`` =
``Linear(1024, 1024)`` per fine-tuned modality. Upstream inference (``infer.py``) embeds with
``encode_vision`` (no MLP), L2-normalises, and predicts the label of the nearest of many
"centre" embeddings per class (LLM-written descriptions, 50 per class, shipped as pickles).

Here:

- :class:`UniBindBackbone` exposes image, video, audio, thermal, event and point. Event
  streams are event *frames* (rendered images, as UniBind's data loader reads them) through
  the vision tower; :func:`events_to_frame` renders a raw ``(x, y, t, p)`` stream to such a
  frame (our renderer). ``point`` uses the Point-Bind PointBERT encoder
  (:mod:`advcal.backbones.pointbert`); UniBind's released point encoder is Point-Bind's I2P-MAE
  variant, which is not implemented natively yet (its checkpoint keys are recognised and the
  point modality is then left out, with a warning).
- ``encode`` follows ``encode_vision`` (unit-norm, no MLP) by default; ``apply_heads=True``
  follows ``encode_vision_with_mlp``. :meth:`UniBindBackbone.head_weights` returns the released
  ``mlp_for_<m>`` weights so a calibration head can start from them.
- :func:`multi_center_logits`: per-class score = max cosine over that class's centres, so the
  top-1 class is the class of the nearest centre (UniBind's rule) and top-5 ranks classes.
- Centre pickles are never unpickled unless asked: :func:`convert_centers` (``trust_pickle``)
  writes safetensors that :func:`load_centers` reads.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from advcal.backbones import imagebind as ib
from advcal.backbones.base import Backbone
from advcal.backbones.pointbert import (
    PointBERTConfig,
    PointBind,
    PointTransformer,
)
from advcal.specs import InputSpec

log = logging.getLogger(__name__)

UNIBIND_MODALITIES = ("image", "video", "audio", "thermal", "event", "point")
CENTERS_FORMAT = "advcal.unibind.centers/1"


# -- the official module layout ----------------------------------------------------------------
class _BindOnly(nn.Module):
    """``backbone`` without a point encoder: holds ``bind`` (+ its point head, if any)."""

    def __init__(self, bind: nn.Module) -> None:
        super().__init__()
        self.bind = bind


class UniBind(nn.Module):
    """UniBind's module tree: ``backbone.bind.*`` (ImageBind + point head),
    ``backbone.point_encoder.*`` / ``backbone.pc_projection``, ``mlp_for_<m>``."""

    def __init__(
        self,
        bind: ib.ImageBind,
        point_config: PointBERTConfig | Mapping[str, Any] | None = None,
        heads: Sequence[str] = (),
        *,
        pc_feat_dims: int | None = None,
    ) -> None:
        super().__init__()
        e = bind.config.out_embed_dim
        if point_config is not None:
            if not isinstance(point_config, PointBERTConfig):
                point_config = PointBERTConfig.from_dict(point_config)
            self.backbone: nn.Module = PointBind(
                PointTransformer(point_config),
                pc_feat_dims or 2 * point_config.trans_dim,
                out_embed_dim=e,
                bind=bind,
            )
        else:
            self.backbone = _BindOnly(bind)
        self.head_modalities = tuple(heads)
        for m in self.head_modalities:
            if m not in UNIBIND_MODALITIES:
                raise ValueError(f"unknown UniBind head modality {m!r}; {UNIBIND_MODALITIES}")
            setattr(self, f"mlp_for_{m}", nn.Linear(e, e))

    @property
    def bind(self) -> ib.ImageBind:
        return self.backbone.bind

    @property
    def has_point(self) -> bool:
        return isinstance(self.backbone, PointBind)

    def head(self, modality: str) -> nn.Linear:
        if modality not in self.head_modalities:
            raise KeyError(
                f"UniBind has no released head (mlp_for_{modality}) loaded; "
                f"heads: {list(self.head_modalities)}"
            )
        return getattr(self, f"mlp_for_{modality}")


# -- the Backbone --------------------------------------------------------------------------------
class UniBindBackbone(Backbone):
    """UniBind as an advcal Backbone (inputs in their valid range, preprocessing inside).

    - ``image``/``video``/``audio``/``thermal``: as :class:`ImageBindBackbone` (pixels in
      [0, 1], waveform in [-1, 1] at 16 kHz, thermal intensity in [0, 1]).
    - ``event``: an event frame ``(3, S, S)`` in [0, 1] through the vision tower (same spec as
      image); raw streams go through :func:`events_to_frame` first.
    - ``point``: ``(N, 3)`` xyz (N free), in coordinate units; upstream normalises clouds to
      the unit sphere. Default threat model: L-inf, ``point_eps=0.02`` (2% of the unit
      radius), unbounded unless ``point_box=(lo, hi)``. FPS starts at index ``fps_start``
      (deterministic; upstream draws it at random).

    ``encode`` returns unit-norm embeddings (``encode_vision``); with ``apply_heads=True`` the
    released ``mlp_for_<m>`` is applied first (``encode_vision_with_mlp``).
    """

    name = "unibind"

    def __init__(
        self,
        model: UniBind,
        *,
        apply_heads: bool = False,
        point_eps: float = 0.02,
        point_norm: str = "linf",
        point_box: tuple[float, float] | None = None,
        num_points: int = -1,
        fps_start: int | torch.Tensor = 0,
        **imagebind_kwargs: Any,
    ) -> None:
        image_bb = ib.ImageBindBackbone(model.bind, **imagebind_kwargs)
        specs: dict[str, InputSpec] = {}
        for m in ("image", "video", "audio", "thermal"):
            specs[m] = image_bb.spec(m)
        img = image_bb.spec("image")
        specs["event"] = InputSpec(
            img.shape,
            img.lo,
            img.hi,
            img.eps,
            img.norm,
            "pixels",
            "event frame (rendered events) in [0, 1]",
        )
        if model.has_point:
            lo, hi = point_box if point_box is not None else (None, None)
            specs["point"] = InputSpec(
                (num_points, 3),
                lo,
                hi,
                point_eps,
                point_norm,  # type: ignore[arg-type]
                "points",
                "xyz point cloud in coordinate units (unit sphere upstream)",
            )
        super().__init__(specs, model.bind.config.out_embed_dim)
        self.model = model
        self.image_bb = image_bb
        self.apply_heads = bool(apply_heads)
        self.fps_start = fps_start
        if apply_heads:
            missing = [m for m in specs if m not in model.head_modalities]
            if missing:
                log.warning("UniBind apply_heads: no released head for %s (identity)", missing)
        self.freeze()

    def head_weights(self, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The released ``mlp_for_<modality>`` as ``(W (E, E), b (E,))`` copies, to start a
        calibration head from (``y = x @ W.T + b``)."""
        lin = self.model.head(modality)
        return lin.weight.detach().clone(), lin.bias.detach().clone()

    def has_head(self, modality: str) -> bool:
        return modality in self.model.head_modalities

    def _encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        if modality == "point":
            pb = self.model.backbone
            assert isinstance(pb, PointBind)
            z = pb(x, self.fps_start)
        else:
            z = self.image_bb.encode("image" if modality == "event" else modality, x, check=False)
        if self.apply_heads and self.has_head(modality):
            z = self.model.head(modality)(z)
        return F.normalize(z, dim=-1)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.image_bb.encode_text(prompts), dim=-1)


def events_to_frame(
    events: torch.Tensor, height: int, width: int, *, size: int | None = None
) -> torch.Tensor:
    """Render an event stream ``(N, 4)`` = (x, y, t, polarity) to a frame ``(3, H, W)`` in [0, 1].

    Ours (UniBind reads pre-rendered frames): per-pixel counts of positive events in the red
    channel and negative events in the blue channel, each divided by its maximum; green 0.
    ``size`` resizes (bilinear) to a square model input. Not differentiable (data preparation).
    """
    if events.dim() != 2 or events.shape[1] != 4:
        raise ValueError(f"events must be (N, 4) = (x, y, t, p), got {tuple(events.shape)}")
    x = events[:, 0].long().clamp(0, width - 1)
    y = events[:, 1].long().clamp(0, height - 1)
    pos = events[:, 3] > 0
    frame = torch.zeros(3, height * width)
    flat = y * width + x
    frame[0].index_add_(0, flat[pos], torch.ones(int(pos.sum())))
    frame[2].index_add_(0, flat[~pos], torch.ones(int((~pos).sum())))
    frame = frame / frame.amax(dim=1, keepdim=True).clamp_min(1.0)
    frame = frame.view(3, height, width)
    if size is not None:
        frame = F.interpolate(frame[None], size=(size, size), mode="bilinear")[0].clamp(0, 1)
    return frame


# -- multi-center embeddings ----------------------------------------------------------------------
class MultiCenters(NamedTuple):
    centers: torch.Tensor  # (M, D) float32, unit-norm rows
    labels: torch.Tensor  # (M,) int64 class index of each centre
    class_names: list[str]  # (K,)


def multi_center_logits(
    z: torch.Tensor,
    centers_mc: torch.Tensor,
    center_labels: torch.Tensor,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Per-class scores ``(B, K)`` from many centres per class.

    ``score[b, k] = max_{j: label_j = k} cos(z_b, c_j)``: the top-1 class is the class of the
    nearest centre (UniBind's prediction), and top-5 ranks classes by their nearest centre. A
    class without centres scores ``-inf``. Differentiable w.r.t. ``z`` (attacks use it).

    Args:
        z: ``(B, D)`` embeddings (any scale).
        centers_mc: ``(M, D)`` centres.
        center_labels: ``(M,)`` int class index per centre.
        num_classes: K (default ``max(label) + 1``).
    """
    if centers_mc.dim() != 2 or z.dim() != 2 or z.shape[1] != centers_mc.shape[1]:
        raise ValueError(
            f"z (B, D) and centers_mc (M, D) must share D; got {tuple(z.shape)}, "
            f"{tuple(centers_mc.shape)}"
        )
    if center_labels.shape != (centers_mc.shape[0],):
        raise ValueError(
            f"center_labels must be ({centers_mc.shape[0]},), got {tuple(center_labels.shape)}"
        )
    k = int(center_labels.max()) + 1 if num_classes is None else int(num_classes)
    cos = F.normalize(z.float(), dim=-1) @ F.normalize(centers_mc.float(), dim=-1).t()  # (B, M)
    idx = center_labels.to(cos.device, torch.int64).expand(cos.shape[0], -1)
    out = torch.full((cos.shape[0], k), float("-inf"), device=cos.device, dtype=cos.dtype)
    return out.scatter_reduce(1, idx, cos, reduce="amax", include_self=True)


def _as_matrix(v: Any, label: str) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    t = t.detach().to("cpu", torch.float32)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"centres of class {label!r} must be (n, D) or (D,), got {tuple(t.shape)}")
    return t


def convert_centers(src: str | Path, dst: str | Path, *, trust_pickle: bool) -> Path:
    """Convert UniBind's centre pickle ``{label: (n, D) tensor/array}`` to safetensors.

    Unpickling can execute arbitrary code, so it happens only with ``trust_pickle=True``
    (CLI: ``advcal convert-centers SRC DST --trust-pickle``). ``dst`` holds ``centers``
    ``(M, D)`` float32 (unit-norm rows), ``labels`` ``(M,)`` int64 and the class names (in
    insertion order) in the metadata; :func:`load_centers` reads it without any pickle.
    """
    src, dst = Path(src), Path(dst)
    if not trust_pickle:
        raise PermissionError(
            f"{src} is a pickle: loading it can run arbitrary code. Convert it only if you trust "
            "its source, by passing --trust-pickle (trust_pickle=True); the safetensors file "
            "written then is what advcal loads from then on."
        )
    with open(src, "rb") as f:
        obj = pickle.load(f)  # explicitly trusted by the caller (trust_pickle=True)
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{src}: expected a non-empty {{label: centres}} dict, got {type(obj)}")
    names, blocks, labels = [], [], []
    dim = None
    for i, (label, v) in enumerate(obj.items()):
        m = _as_matrix(v, str(label))
        if dim is not None and m.shape[1] != dim:
            raise ValueError(f"{src}: class {label!r} has width {m.shape[1]}, others {dim}")
        dim = m.shape[1]
        names.append(str(label))
        blocks.append(m)
        labels.append(torch.full((m.shape[0],), i, dtype=torch.int64))
    from safetensors.torch import save_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "centers": F.normalize(torch.cat(blocks), dim=-1).contiguous(),
            "labels": torch.cat(labels).contiguous(),
        },
        str(dst),
        metadata={"format": CENTERS_FORMAT, "class_names": json.dumps(names), "source": src.name},
    )
    return dst


def load_centers(path: str | Path) -> MultiCenters:
    """Centres written by :func:`convert_centers` (safetensors only; never a pickle)."""
    path = Path(path)
    if path.suffix in (".pkl", ".pickle", ".pk"):
        raise ValueError(
            f"{path} is a pickle; convert it once with `advcal convert-centers SRC DST "
            "--trust-pickle` and load the .safetensors it writes"
        )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CENTERS_FORMAT:
            raise ValueError(f"{path} is not an advcal centres file (format {meta.get('format')})")
        centers, labels = f.get_tensor("centers"), f.get_tensor("labels")
    return MultiCenters(centers, labels, list(json.loads(meta["class_names"])))


# -- checkpoints --------------------------------------------------------------------------------
_POINT_HEAD = ("modality_head_point.", "modality_postprocessor_point.")


def split_unibind_state_dict(
    sd: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(ImageBind keys, point-path keys as in ``POINTBIND``, {modality: mlp keys}).

    Accepts UniBind (``backbone.*`` + ``mlp_for_<m>.*``), Point-Bind (``bind.*``,
    ``point_encoder.*``) and plain ImageBind (``modality_*``) layouts.
    """
    bind: dict[str, torch.Tensor] = {}
    point: dict[str, torch.Tensor] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith("mlp_for_"):
            m, _, rest = k.removeprefix("mlp_for_").partition(".")
            heads.setdefault(m, {})[rest] = v
            continue
        k = k.removeprefix("backbone.")
        if k.startswith("bind."):
            inner = k.removeprefix("bind.")
            if inner.startswith(_POINT_HEAD):
                point[k] = v
            else:
                bind[inner] = v
        elif k.startswith("modality_"):
            (point if k.startswith(_POINT_HEAD) else bind)[k] = v
        else:  # point_encoder.*, pc_projection, logit_scale
            point[k] = v
    return bind, point, heads


def build_unibind(
    sd: Mapping[str, torch.Tensor],
    *,
    imagebind_config: ib.ImageBindConfig | Mapping[str, Any] | None = None,
    point_config: PointBERTConfig | Mapping[str, Any] | None = None,
) -> UniBind:
    """A :class:`UniBind` from a merged state dict; every part checked strictly.

    The ImageBind part goes through :func:`advcal.backbones.imagebind.build_model`; the point
    path (PointBERT sizes from ``point_config``, released sizes by default) and the
    ``mlp_for_<m>`` heads are checked against their own keys and shapes.
    """
    from advcal.backbones.languagebind import load_state_dict_checked

    bind_sd, point_sd, heads_sd = split_unibind_state_dict(sd)
    if not bind_sd:
        raise ValueError("UniBind checkpoint(s) hold no ImageBind weights (backbone.bind.*)")
    use_point = any(k.startswith("point_encoder.") for k in point_sd)
    if any(k.startswith("point_encoder.h_encoder.") for k in point_sd):
        log.warning(
            "UniBind checkpoint's point encoder is Point-Bind's I2P-MAE variant, which advcal "
            "does not implement natively yet: the point modality is left out (pass a Point-Bind "
            "PointBERT checkpoint as well to get it)"
        )
        use_point = False
    pcfg = None
    if use_point:
        pcfg = point_config if point_config is not None else PointBERTConfig()
        if not isinstance(pcfg, PointBERTConfig):
            pcfg = PointBERTConfig.from_dict(pcfg)
    bind = ib.build_model(imagebind_config, checkpoint=bind_sd)
    pc_feat = point_sd["pc_projection"].shape[0] if "pc_projection" in point_sd else None
    model = UniBind(bind, pcfg, sorted(heads_sd), pc_feat_dims=pc_feat if use_point else None)
    rest = {f"mlp_for_{m}.{k}": v for m, d in heads_sd.items() for k, v in d.items()}
    if use_point:
        rest.update({f"backbone.{k}": v for k, v in point_sd.items()})
    load_state_dict_checked(
        model,
        rest,
        what="UniBind point path / heads",
        only=lambda k: (
            not k.startswith("backbone.bind.")
            or ".modality_head_point." in k
            or ".modality_postprocessor_point." in k
        ),
    )
    model.requires_grad_(False)
    return model.eval()


def load(
    name: str = "unibind",
    checkpoint: str | Path | Sequence[str | Path] | None = None,
    device: str | torch.device | None = None,
    *,
    imagebind_config: ib.ImageBindConfig | Mapping[str, Any] | None = None,
    point_config: PointBERTConfig | Mapping[str, Any] | None = None,
    **backbone_kwargs: Any,
) -> UniBindBackbone:
    """Registry entry: ``advcal.backbones.load("unibind", checkpoint=...)``.

    ``checkpoint``: one file or several (read safely, merged in order; later files add keys):
    a UniBind fine-tuned checkpoint (``backbone.*`` + ``mlp_for_<m>.*``), a Point-Bind
    checkpoint (``bind.*`` + ``point_encoder.*``) and/or ``imagebind_huge.pth``. Sizes:
    ImageBind-Huge and the released PointBERT unless ``imagebind_config``/``point_config``.
    Keywords left go to :class:`UniBindBackbone`. Nothing is downloaded.
    """
    if checkpoint is None:
        raise ValueError(
            f"backbone {name!r} needs checkpoint=: local UniBind / Point-Bind / ImageBind "
            "weights (one path or a list); nothing is downloaded"
        )
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    merged: dict[str, torch.Tensor] = {}
    for p in paths:
        for k, v in ib.read_checkpoint(p).items():
            merged.setdefault(k, v)
    model = build_unibind(merged, imagebind_config=imagebind_config, point_config=point_config)
    bb = UniBindBackbone(model, **backbone_kwargs)
    if device is not None:
        bb.to(device)
    return bb


__all__ = [
    "UNIBIND_MODALITIES",
    "MultiCenters",
    "UniBind",
    "UniBindBackbone",
    "build_unibind",
    "convert_centers",
    "events_to_frame",
    "load",
    "load_centers",
    "multi_center_logits",
    "split_unibind_state_dict",
]
