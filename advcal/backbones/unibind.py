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
  (:mod:`advcal.backbones.pointbert`).

What the released UniBind checkpoint gives (:data:`I2PMAE_NOTE`): UniBind's point encoder is
Point-Bind's I2P-MAE variant, which advcal does not implement. With the released UniBind
weights alone you get image, video, audio, thermal, event and text (the frozen ImageBind-Huge
inside UniBind, plus any released ``mlp_for_<m>`` head); the I2P-MAE point path
(``point_encoder.h_encoder.*``, ``pc_projection``, ``logit_scale``, the point head and
``mlp_for_point``) is dropped with a warning, so there is no ``point`` modality. To get
``point``, add Point-Bind's PointBERT checkpoint to ``checkpoint=[...]``: the point modality is
then Point-Bind's PointBERT encoder and point head (the same ImageBind space, but not UniBind's
I2P-MAE numbers).
- ``encode`` follows ``encode_vision`` (unit-norm, no MLP) by default; ``apply_heads=True``
  follows ``encode_vision_with_mlp``. :meth:`UniBindBackbone.head_weights` returns the released
  ``mlp_for_<m>`` weights so a calibration head can start from them.
- :func:`multi_center_logits`: per-class score = max cosine over that class's centres, so the
  top-1 class is the class of the nearest centre (UniBind's rule) and top-5 ranks classes.
- Centre pickles are never unpickled unless asked: :func:`convert_centers` (``trust_pickle``)
  writes safetensors that :func:`load_centers` reads.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
from advcal.centers import MultiCenters, class_logits, load_centers, save_centers
from advcal.specs import InputSpec

log = logging.getLogger(__name__)

UNIBIND_MODALITIES = ("image", "video", "audio", "thermal", "event", "point")
I2PMAE_NOTE = (
    "UniBind's released point encoder is Point-Bind's I2P-MAE variant, which advcal does not "
    "implement: its point path (point_encoder.h_encoder.*, pc_projection, logit_scale, "
    "bind.modality_head_point/postprocessor_point, mlp_for_point) is dropped, so this backbone "
    "has image, video, audio, thermal, event and text but no 'point'. To add 'point', pass "
    "Point-Bind's PointBERT checkpoint as well (checkpoint=[unibind, pointbind_pointbert]); "
    "'point' is then Point-Bind's PointBERT embedding, not UniBind's I2P-MAE one."
)


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
      (deterministic; upstream draws it at random). Present only with a PointBERT point
      path: the released UniBind I2P-MAE one is dropped (:data:`I2PMAE_NOTE`).

    ``encode`` returns unit-norm embeddings (``encode_vision``); with ``apply_heads=True`` the
    released ``mlp_for_<m>`` is applied first (``encode_vision_with_mlp``).

    Text: UniBind's vendored tokenizer cuts an over-long text at 77 tokens without forcing eot
    (``text_truncate="hard"``, the default here; ImageBind's own default is ``"eot"``).

    ``centers``: a ``.safetensors`` file written by ``advcal convert-centers`` (UniBind's
    LLM-augmented multi-centre embeddings); :meth:`multi_centers` reads it.
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
        centers: str | Path | None = None,
        **imagebind_kwargs: Any,
    ) -> None:
        imagebind_kwargs.setdefault("text_truncate", "hard")  # UniBind's vendored tokenizer
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
        self.centers_path = None if centers is None else Path(centers)
        if apply_heads:
            missing = [m for m in specs if m not in model.head_modalities]
            if missing:
                log.warning("UniBind apply_heads: no released head for %s (identity)", missing)
        self.freeze()

    def head_weights(self, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The released ``mlp_for_<modality>`` as ``(W (E, E), b (E,))`` float copies, to start
        a calibration head from (``y = x @ W.T + b``; UniBind applies it to the *unnormalised*
        ImageBind output of ``encode_vision``'s modality, then L2-normalises).

        Upstream, each fine-tuned checkpoint ``<m>_model_best.pt`` holds one head, for the
        modality it was tuned on (image, video, audio, thermal, event or point); the
        pretrained backbone weights hold none. Raises ``KeyError`` naming the loaded heads
        (:attr:`head_modalities`) when ``modality`` has none.
        """
        lin = self.model.head(modality)
        return lin.weight.detach().float().clone(), lin.bias.detach().float().clone()

    @property
    def head_modalities(self) -> tuple[str, ...]:
        """Modalities with a released ``mlp_for_<m>`` head loaded."""
        return tuple(self.model.head_modalities)

    def has_head(self, modality: str) -> bool:
        return modality in self.model.head_modalities

    def head_init(self, modality: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The released ``mlp_for_<modality>`` rewritten for :meth:`encode`'s unit-norm output:
        UniBind applies it to ImageBind's postprocessed embedding ``s * e`` (``s`` = the
        postprocessing scale: 1 vision, 20 audio, 10 thermal; an average over clips has a norm
        slightly below ``s``), so ``W' = s W``. None without a released head, or when
        ``apply_heads=True`` (the backbone applies it already)."""
        if self.apply_heads or not self.has_head(modality):
            return None
        w, b = self.head_weights(modality)
        official = ib.VISION if modality in ("image", "video", "event") else modality
        scale = ib.POSTPROCESS_SCALE.get(official) or 1.0
        return w * scale, b

    def multi_centers(self, path: str | Path | None = None) -> MultiCenters:
        """UniBind's multi-centre embeddings from a converted ``.safetensors`` file.

        ``path`` defaults to the ``centers=`` given at construction / ``load``. Returns
        :class:`MultiCenters`: ``centers (M, D)`` float32 unit-norm rows, ``labels (M,)``
        int64 class index of each centre, ``class_names`` (K). Score with
        :func:`multi_center_logits` (prediction = class of the nearest centre).
        """
        path = self.centers_path if path is None else Path(path)
        if path is None:
            raise ValueError(
                "no centres file: pass multi_centers(path) or load('unibind', ..., centers=PATH) "
                "with a .safetensors written by `advcal convert-centers SRC DST --trust-pickle`"
            )
        mc = load_centers(path)
        if mc.centers.shape[1] != self.embed_dim:
            raise ValueError(
                f"centres in {path} are {mc.centers.shape[1]}-wide but this backbone embeds in "
                f"{self.embed_dim}; convert the centre file of this model"
            )
        return mc

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

    def transforms(self) -> dict[str, Any]:
        """UniBind's loaders (DATA.md §1.3, :func:`advcal.data.transforms.unibind_transforms`):
        ImageBind's for image/video/audio/thermal, EventBind-rendered frames through the
        vision recipe for event, Point-Bind's FPS + ``pc_normalize`` for point (8192 points
        unless the spec fixes a count)."""
        from advcal.data.transforms import EventTransform, pointbind_point_transform

        t = {m: f for m, f in self.image_bb.transforms().items() if m in self.modalities}
        t["event"] = EventTransform(self.spec("event").shape[-1], layout="eventbind")
        if "point" in self.modalities:
            n = self.spec("point").shape[0]
            t["point"] = pointbind_point_transform(8192 if n == -1 else n)
        return t


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
    return class_logits(cos, center_labels.to(cos.device, torch.int64), k)


def _as_matrix(v: Any, label: str) -> torch.Tensor:
    """One class's centres as ``(n, D)`` float32 on CPU: a tensor or array ``(n, D)``/``(D,)``,
    a list of numbers, a list of rows, or a list of ``(D,)``/``(1, D)`` tensors/arrays."""
    if isinstance(v, (list, tuple)) and v and not isinstance(v[0], (int, float)):
        rows = [_as_matrix(r, label) for r in v]
        return torch.cat(rows)
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    t = t.detach().to("cpu", torch.float32)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"centres of class {label!r} must be (n, D) or (D,), got {tuple(t.shape)}")
    return t


def _storage_from_bytes_on_cpu(b: bytes) -> Any:
    """What a plain pickle of a torch tensor calls to rebuild its storage, mapped to CPU (the
    stock one restores the saved device, so a CUDA tensor would not load on a CPU machine)."""
    import io

    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)


class _CPUUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that rebuilds torch storages on the CPU (trusted files only)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.storage" and name == "_load_from_bytes":
            return _storage_from_bytes_on_cpu
        return super().find_class(module, name)


def _unpickle_trusted(src: Path) -> Any:
    """Unpickle ``src`` (the caller vouched for it) with every tensor on the CPU.

    Accepts ``torch.save`` files (zip or legacy format: ``torch.load(map_location="cpu",
    weights_only=False)``) and plain ``pickle.dump`` files of dicts holding tensors, numpy
    arrays or lists (:class:`_CPUUnpickler`, which maps pickled tensor storages to CPU).
    """
    import zipfile

    if zipfile.is_zipfile(src):
        return torch.load(src, map_location="cpu", weights_only=False)
    with open(src, "rb") as f:
        obj = _CPUUnpickler(f).load()
    # a legacy (non-zip) torch.save file starts with torch's magic number, pickled on its own
    from torch.serialization import MAGIC_NUMBER

    if isinstance(obj, int) and obj == MAGIC_NUMBER:
        return torch.load(src, map_location="cpu", weights_only=False)
    return obj


def convert_centers(src: str | Path, dst: str | Path, *, trust_pickle: bool) -> Path:
    """Convert UniBind's centre pickle to safetensors that advcal loads without unpickling.

    UniBind's format (``utils.load_centre_embeddings`` upstream): a dict ``{label: (n, D)}``,
    50 LLM-description embeddings per class, read with ``pickle.load`` and concatenated in the
    dict's order. Accepted here: that dict written by ``pickle.dump`` or ``torch.save``, values
    torch tensors (any device: CUDA storages are mapped to CPU), numpy arrays, or lists of
    numbers / rows / ``(D,)`` tensors; ``n`` may differ per class.

    Unpickling can execute arbitrary code, so it happens only with ``trust_pickle=True``
    (CLI: ``advcal convert-centers SRC DST --trust-pickle``); otherwise ``PermissionError``
    before the file is opened. ``dst`` holds ``centers`` ``(M, D)`` float32 (unit-norm rows),
    ``labels`` ``(M,)`` int64 and the class names (``str(label)``, in dict order) in the
    metadata; :func:`load_centers` reads it.
    """
    src, dst = Path(src), Path(dst)
    if not trust_pickle:
        raise PermissionError(
            f"{src} is a pickle: loading it can run arbitrary code. Convert it only if you trust "
            "its source, by passing --trust-pickle (trust_pickle=True); the safetensors file "
            "written then is what advcal loads from then on."
        )
    if not src.is_file():
        raise FileNotFoundError(f"centre pickle not found: {src}")
    try:
        obj = _unpickle_trusted(src)  # explicitly trusted by the caller (trust_pickle=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, AttributeError, ImportError) as e:
        raise ValueError(
            f"cannot unpickle {src}: {type(e).__name__}: {e} (truncated, or not a pickle of "
            "{label: centres})"
        ) from e
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
    if len(set(names)) != len(names):
        raise ValueError(f"{src}: labels collide once written as strings: {names}")
    return save_centers(dst, torch.cat(blocks), torch.cat(labels), names, source=src.name)


# -- checkpoints --------------------------------------------------------------------------------
_POINT_HEAD = ("modality_head_point.", "modality_postprocessor_point.")


def canonical_key(key: str) -> str:
    """One name per tensor whatever the file's layout: Point-Bind's ``POINTBIND`` names
    (``bind.*``, ``point_encoder.*``, ``pc_projection``, ``logit_scale``) plus UniBind's
    ``mlp_for_<m>.*``. Strips ``module.`` and UniBind's ``backbone.``; a plain ImageBind key
    (``modality_*``) becomes ``bind.modality_*``."""
    k = key.removeprefix("module.")
    if k.startswith("mlp_for_"):
        return k
    k = k.removeprefix("backbone.")
    return f"bind.{k}" if k.startswith("modality_") else k


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _describe(a: torch.Tensor) -> str:
    return f"{tuple(a.shape)} {str(a.dtype).removeprefix('torch.')}"


def canonical_state_dict(
    sd: Mapping[str, torch.Tensor], source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """``sd`` under :func:`canonical_key` names. Two keys of ``sd`` naming the same tensor
    (e.g. ``bind.modality_x`` and ``modality_x``) must hold equal tensors, else ``ValueError``
    naming both."""
    out: dict[str, torch.Tensor] = {}
    raw: dict[str, str] = {}
    for k, v in sd.items():
        c = canonical_key(k)
        if c in out and not _same_tensor(out[c], v):
            raise ib.CheckpointError(
                f"{source}: keys {raw[c]!r} and {k!r} both name {c!r} but hold different "
                f"tensors ({_describe(out[c])} vs {_describe(v)}); keep one of them"
            )
        out.setdefault(c, v)
        raw.setdefault(c, k)
    return out


def _is_point_path(k: str) -> bool:
    """Canonical keys of the point path: encoder, projection, point head, point MLP."""
    return (
        k.startswith(("point_encoder.", "mlp_for_point."))
        or k in ("pc_projection", "logit_scale")
        or k.removeprefix("bind.").startswith(_POINT_HEAD)
    )


def drop_i2pmae(
    sd: Mapping[str, torch.Tensor], source: str = "state dict"
) -> tuple[dict[str, torch.Tensor], bool]:
    """Remove UniBind's I2P-MAE point path from a canonical state dict (see
    :data:`I2PMAE_NOTE`); returns (the rest, whether anything was dropped)."""
    if not any(k.startswith("point_encoder.h_encoder.") for k in sd):
        return dict(sd), False
    kept = {k: v for k, v in sd.items() if not _is_point_path(k)}
    log.warning("%s: %s (%d tensors dropped)", source, I2PMAE_NOTE, len(sd) - len(kept))
    return kept, True


def merge_state_dicts(
    sources: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
) -> dict[str, torch.Tensor]:
    """Merge ``[(name, state_dict), ...]`` after normalising each one's keys
    (:func:`canonical_state_dict`) and dropping an I2P-MAE point path (:func:`drop_i2pmae`).

    The order of the sources does not matter: a key that two sources both provide must hold
    the same tensor in both (e.g. ImageBind inside UniBind's checkpoint and
    ``imagebind_huge.pth``), else :class:`~advcal.backbones.imagebind.CheckpointError` names
    the key and both files.
    """
    merged: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, sd in sources:
        sd, _ = drop_i2pmae(canonical_state_dict(sd, name), name)
        for k, v in sd.items():
            if k not in merged:
                merged[k], origin[k] = v, name
            elif not _same_tensor(merged[k], v):
                raise ib.CheckpointError(
                    f"checkpoints disagree on {k!r}: {origin[k]} has {_describe(merged[k])}, "
                    f"{name} has {_describe(v)} with different values. Pass only the files of "
                    "one release (e.g. drop the one this tensor should not come from)"
                )
    return merged


def split_unibind_state_dict(
    sd: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(ImageBind keys, point-path keys as in ``POINTBIND``, {modality: mlp keys}).

    Accepts UniBind (``backbone.*`` + ``mlp_for_<m>.*``), Point-Bind (``bind.*``,
    ``point_encoder.*``) and plain ImageBind (``modality_*``) layouts, mixed: keys are first
    normalised (:func:`canonical_state_dict`), then partitioned.
    """
    bind: dict[str, torch.Tensor] = {}
    point: dict[str, torch.Tensor] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in canonical_state_dict(sd).items():
        if k.startswith("mlp_for_"):
            m, _, rest = k.removeprefix("mlp_for_").partition(".")
            heads.setdefault(m, {})[rest] = v
        elif k.startswith("bind.") and not _is_point_path(k):
            bind[k.removeprefix("bind.")] = v
        else:  # point_encoder.*, pc_projection, logit_scale, bind.modality_*_point.*
            point[k] = v
    return bind, point, heads


def build_unibind(
    sd: Mapping[str, torch.Tensor],
    *,
    imagebind_config: ib.ImageBindConfig | Mapping[str, Any] | None = None,
    point_config: PointBERTConfig | Mapping[str, Any] | None = None,
) -> UniBind:
    """A :class:`UniBind` from a (merged) state dict; every part checked strictly.

    The ImageBind part goes through :func:`advcal.backbones.imagebind.build_model`; the point
    path (PointBERT sizes from ``point_config``, released sizes by default) and the
    ``mlp_for_<m>`` heads are checked against their own keys and shapes. An I2P-MAE point path
    is dropped with a warning (:data:`I2PMAE_NOTE`).
    """
    from advcal.backbones.languagebind import load_state_dict_checked

    sd, _ = drop_i2pmae(canonical_state_dict(sd))
    bind_sd, point_sd, heads_sd = split_unibind_state_dict(sd)
    if not bind_sd:
        raise ValueError("UniBind checkpoint(s) hold no ImageBind weights (backbone.bind.*)")
    stray = sorted(k for k in point_sd if not _is_point_path(k))
    if stray:
        raise ib.CheckpointError(
            f"UniBind checkpoint(s): {len(stray)} unexpected keys: {ib._preview(stray)}; is "
            "each file a UniBind, Point-Bind or ImageBind checkpoint?"
        )
    use_point = any(k.startswith("point_encoder.") for k in point_sd)
    if point_sd and not use_point:
        log.warning(
            "UniBind checkpoint(s) hold point-path tensors (%s) but no point encoder "
            "(point_encoder.*): ignored, no 'point' modality",
            ib._preview(sorted(point_sd), 4),
        )
        point_sd = {}
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

    ``checkpoint``: one file or several, read safely and merged by :func:`merge_state_dicts`
    (keys normalised first; a key two files disagree on is an error naming both): UniBind's
    backbone weights (``PointBind_I2PMAE``: ``bind.*`` + I2P-MAE point path), a UniBind
    fine-tuned checkpoint (``backbone.*`` + ``mlp_for_<m>.*``), a Point-Bind PointBERT
    checkpoint (``bind.*`` + ``point_encoder.*``) and/or ``imagebind_huge.pth``. Sizes:
    ImageBind-Huge and the released PointBERT unless ``imagebind_config``/``point_config``.
    Keywords left go to :class:`UniBindBackbone` (e.g. ``centers=`` a converted centres file,
    ``apply_heads=True``). Nothing is downloaded. See :data:`I2PMAE_NOTE` for what the
    released UniBind point encoder means here.
    """
    if checkpoint is None:
        raise ValueError(
            f"backbone {name!r} needs checkpoint=: local UniBind / Point-Bind / ImageBind "
            "weights (one path or a list); nothing is downloaded"
        )
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    merged = merge_state_dicts([(str(p), ib.read_checkpoint(p)) for p in paths])
    model = build_unibind(merged, imagebind_config=imagebind_config, point_config=point_config)
    bb = UniBindBackbone(model, **backbone_kwargs)
    if device is not None:
        bb.to(device)
    return bb


__all__ = [
    "I2PMAE_NOTE",
    "UNIBIND_MODALITIES",
    "MultiCenters",
    "UniBind",
    "UniBindBackbone",
    "build_unibind",
    "canonical_key",
    "canonical_state_dict",
    "convert_centers",
    "drop_i2pmae",
    "events_to_frame",
    "load",
    "load_centers",
    "merge_state_dicts",
    "multi_center_logits",
    "split_unibind_state_dict",
]
