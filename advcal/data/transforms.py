"""Transforms: a decoded object -> the valid-range tensor an adversary perturbs.

Every transform here ends at the *adversary point* of ``../shared/DATA.md``: the last tensor
with a natural valid box (RGB in [0, 1] after resize and centre crop, the 16 kHz waveform
before the filter bank, the sampled frames, the normalised point set, the rendered event
frame). Mean/std normalisation, the Kaldi filter bank and clip averaging run inside the
backbone, differentiable (``Backbone.encode``).

Transforms are frozen dataclasses (picklable, so DataLoader workers can run them) with
``__call__(decoded) -> torch.Tensor``. Per-backbone sets come from ``Backbone.transforms()``
(``advcal.backbones.load_with_transforms``); the builders at the bottom of this module
(:func:`imagebind_transforms`, :func:`languagebind_transforms`, :func:`unibind_transforms`,
:func:`minibind_transforms`) say which recipe each modality follows and where it departs.

Geometry conventions (torchvision, which the official pipelines call):

- ``Resize(s)`` on a PIL image: the shorter side becomes ``s``, the longer
  ``int(s * long / short)``; PIL's own resampling filter (antialiased).
- ``CenterCrop(c)``: top ``int(round((h - c) / 2))``, left ``int(round((w - c) / 2))``.
- ``ShortSideScale(s)`` (pytorchvideo, video): the longer side ``floor(long / short * s)``,
  ``F.interpolate(..., mode="bilinear", align_corners=False)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from advcal.data.decode import Audio, Depth, Events, VideoFile, require, resample

# ---------------------------------------------------------------------------------- geometry


def resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)``: ``(new_w, new_h)`` with the shorter side = ``size``."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def crop_box(w: int, h: int, crop: int) -> tuple[int, int]:
    """torchvision ``CenterCrop(crop)``: ``(left, top)``."""
    if crop > w or crop > h:
        raise ValueError(f"crop {crop} is larger than the resized image {w}x{h}")
    return round((w - crop) / 2.0), round((h - crop) / 2.0)


def _pil_filter(interpolation: str) -> Any:
    Image = require("PIL.Image", "resize images")
    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[
        interpolation
    ]


def _to_tensor(img: Any) -> torch.Tensor:
    """``ToTensor`` of an 8-bit PIL image: ``(C, H, W)`` float32 in [0, 1]."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, got {a.dtype} (mode {img.mode})")
    t = torch.from_numpy(a.copy()).float().div_(255.0)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _resize_tensor(x: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """Shorter side -> ``size`` on a ``(C, H, W)`` or ``(T, C, H, W)`` tensor; torchvision's
    tensor ``Resize`` size rule, no antialias (torchvision 0.14, which LanguageBind pins)."""
    h, w = x.shape[-2:]
    nw, nh = resized_size(w, h, size)
    lead = x.shape[:-3]
    y = x.reshape(-1, *x.shape[-3:]).float()
    kw = {} if interpolation == "nearest" else {"align_corners": False}
    y = F.interpolate(y, size=(nh, nw), mode=interpolation, **kw)
    return y.reshape(*lead, *y.shape[1:])


def _center_crop_tensor(x: torch.Tensor, crop: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    left, top = crop_box(w, h, crop)
    return x[..., top : top + crop, left : left + crop]


def short_side_scale(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """pytorchvideo ``ShortSideScale``: ``(..., H, W)`` -> shorter side ``size``, the longer
    ``floor(long / short * size)``."""
    h, w = x.shape[-2:]
    if w < h:
        nh, nw = math.floor(h / w * size), size
    else:
        nh, nw = size, math.floor(w / h * size)
    y = x.reshape(-1, *x.shape[-3:]).float()
    y = F.interpolate(y, size=(nh, nw), mode=mode, align_corners=False)
    return y.reshape(*x.shape[:-2], nh, nw)


def uniform_crop(x: torch.Tensor, size: int, index: int) -> torch.Tensor:
    """ImageBind's ``SpatialCrop`` crop ``index`` (0, 1, 2) of ``(..., H, W)``: centre at
    ``ceil((H - size) / 2)``; 0/2 = top/bottom of a tall frame, left/right of a wide one."""
    h, w = x.shape[-2:]
    y0, x0 = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    if h > w:
        y0 = {0: 0, 1: y0, 2: h - size}[index]
    else:
        x0 = {0: 0, 1: x0, 2: w - size}[index]
    return x[..., y0 : y0 + size, x0 : x0 + size]


# ------------------------------------------------------------------------------------ images


@dataclass(frozen=True)
class ImageTransform:
    """A PIL image -> ``(C, crop, crop)`` in [0, 1]: convert to ``mode``, ``Resize(size)``,
    ``CenterCrop(crop)``, ``ToTensor``.

    ``backend="pil"`` resizes the 8-bit PIL image (ImageBind, open_clip, CLIP);
    ``backend="tensor"`` runs ``ToTensor`` first and resizes the float tensor without
    antialias, clamped back to [0, 1] (LanguageBind's HF thermal/image processors).
    ``mode``: ``"RGB"`` -> 3 channels, ``"L"`` -> 1.
    """

    size: int = 224
    crop: int | None = None
    mode: str = "RGB"
    interpolation: str = "bicubic"
    backend: Literal["pil", "tensor"] = "pil"

    def __post_init__(self) -> None:
        if self.size < 1 or (self.crop is not None and not 1 <= self.crop <= self.size):
            raise ValueError(f"ImageTransform needs 1 <= crop <= size, got {self}")
        if self.mode not in ("RGB", "L"):
            raise ValueError(f"ImageTransform.mode must be 'RGB' or 'L', got {self.mode!r}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.backend not in ("pil", "tensor"):
            raise ValueError(
                f"ImageTransform.backend must be 'pil' or 'tensor', got {self.backend!r}"
            )

    def __call__(self, img: Any) -> torch.Tensor:
        crop = self.crop or self.size
        if img.mode != self.mode:
            img = img.convert(self.mode)
        if self.backend == "tensor":
            x = _resize_tensor(_to_tensor(img), self.size, self.interpolation)
            return _center_crop_tensor(x, crop).clamp(0.0, 1.0).contiguous()
        w, h = img.size
        nw, nh = resized_size(w, h, self.size)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), _pil_filter(self.interpolation))
        left, top = crop_box(nw, nh, crop)
        return _to_tensor(img.crop((left, top, left + crop, top + crop)))


# ------------------------------------------------------------------------------------- depth


@dataclass(frozen=True)
class DepthTransform:
    """A :class:`~advcal.data.decode.Depth` (metres) -> ``(1, crop, crop)``.

    ``output="metres"`` (LanguageBind): clip to ``[min_depth, max_depth]`` (its ``DepthNorm``
    clips at 0.01 and 10 m before resizing), tensor bicubic ``Resize`` + ``CenterCrop``,
    clamped to the backbone's valid range ``[0, max_depth]`` (bicubic can overshoot; upstream
    does not clamp there: a difference of at most the overshoot). The backbone divides by
    ``max_depth`` and CLIP-normalises inside.

    ``output="disparity"`` (ImageBind and minibind; ours, upstream released no depth loader):
    disparity ``focal * baseline / depth`` (NYU kv1 camera: 518.857901 px, 0.075 m, from
    ImageBind issue #107), 0 where there is no reading, divided by its per-image maximum
    into [0, 1], then resized and cropped like ``"metres"`` and clamped to [0, 1].
    """

    size: int = 224
    crop: int | None = None
    output: Literal["metres", "disparity"] = "metres"
    max_depth: float = 10.0
    min_depth: float = 0.01
    focal: float = 518.857901
    baseline: float = 0.075
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.output not in ("metres", "disparity"):
            raise ValueError(f"DepthTransform.output must be metres|disparity, got {self.output!r}")
        if not 0 <= self.min_depth < self.max_depth:
            raise ValueError("DepthTransform needs 0 <= min_depth < max_depth")

    def __call__(self, depth: Depth) -> torch.Tensor:
        d = torch.from_numpy(np.asarray(depth.metres, dtype=np.float32)).unsqueeze(0)
        if self.output == "metres":
            x, hi = d.clamp(self.min_depth, self.max_depth), self.max_depth
        else:
            disp = torch.where(d > 0, self.focal * self.baseline / d.clamp_min(1e-6), 0.0)
            x, hi = disp / disp.max().clamp_min(1e-12), 1.0
        x = _resize_tensor(x, self.size, self.interpolation)
        return _center_crop_tensor(x, self.crop or self.size).clamp(0.0, hi).contiguous()


# ------------------------------------------------------------------------------------- audio


def clip_starts(duration: Fraction, clip: Fraction, clips: int) -> list[Fraction]:
    """pytorchvideo ``ConstantClipsPerVideoSampler`` start times (seconds): clip ``k`` starts
    at ``k * max(duration - clip, 0) / clips`` (not a linspace to the end: ESC-50's 5 s give
    [0, 1, 2] for 3 clips of 2 s, the last second is never seen)."""
    step = max(duration - clip, Fraction(0)) / clips
    return [k * step for k in range(clips)]


@dataclass(frozen=True)
class WaveformTransform:
    """An :class:`~advcal.data.decode.Audio` -> ``(num_samples,)`` mono waveform in [-1, 1].

    Resample to ``sample_rate`` (soxr), keep channel ``channel`` (ImageBind's
    ``kaldi.fbank`` and LanguageBind's ``audio_data[0]`` both use channel 0; their mean
    subtraction before the filter bank cannot change Kaldi's per-frame DC-removed output),
    clamp to [-1, 1] (resampling may overshoot by a hair), then fit the length:

    - ``num_samples=None``: keep it;
    - shorter: ``fit="pad"`` zero-pads on the right; ``fit="tile"`` is LanguageBind's
      ``waveform2melspec``: ``int(num_samples / n)`` whole copies, then zeros;
    - longer: the first ``num_samples`` (LanguageBind instead takes three filter-bank chunks
      from a clip over ``num_samples``; build the backbone with ``audio_samples`` large
      enough to keep such clips whole).

    ``clip_window=(seconds, clips)`` (ImageBind, before any length fit): cut the waveform
    at the end of the last clip that the official ``ConstantClipsPerVideoSampler`` takes.
    The backbone's evenly spaced clip starts over the cut waveform are then the official
    starts (exactly when ``(n - clip)`` is a multiple of ``clips`` samples, e.g. ESC-50's
    80000 at 16 kHz; otherwise within ``clips - 1`` samples), and the samples no clip sees
    are not part of the attack space.
    """

    sample_rate: int = 16000
    num_samples: int | None = None
    fit: Literal["pad", "tile"] = "pad"
    channel: int = 0
    clip_window: tuple[float, int] | None = None

    def __post_init__(self) -> None:
        if self.sample_rate < 1 or (self.num_samples is not None and self.num_samples < 1):
            raise ValueError(f"WaveformTransform needs positive rates and lengths, got {self}")
        if self.fit not in ("pad", "tile"):
            raise ValueError(f"WaveformTransform.fit must be 'pad' or 'tile', got {self.fit!r}")

    def window_samples(self, n: int) -> int:
        """Samples kept by ``clip_window`` from a waveform of ``n`` samples."""
        if self.clip_window is None:
            return n
        seconds, clips = self.clip_window
        clip = round(seconds * self.sample_rate)
        if n <= clip or clips == 1:
            return min(n, clip) if clips == 1 else n
        return clip + (clips - 1) * ((n - clip) // clips)

    def __call__(self, audio: Audio) -> torch.Tensor:
        if not 0 <= self.channel < audio.samples.shape[0]:
            raise ValueError(
                f"channel {self.channel} requested, the audio has {audio.samples.shape[0]}"
            )
        wav = resample(audio.samples[self.channel : self.channel + 1], audio.sample_rate,
                       self.sample_rate)[0]  # fmt: skip
        x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)).clamp_(-1.0, 1.0)
        x = x[: self.window_samples(x.shape[0])]
        n, want = x.shape[0], self.num_samples
        if want is None or n == want:
            return x.contiguous()
        if n > want:
            return x[:want].contiguous()
        if self.fit == "tile":
            x = x.repeat(want // n)
        return F.pad(x, (0, want - x.shape[0])).contiguous()


# ------------------------------------------------------------------------------------- video


@dataclass(frozen=True)
class VideoTransform:
    """A :class:`~advcal.data.decode.VideoFile` -> ``(T, 3, crop, crop)`` frames in [0, 1],
    time first.

    ``sampler="uniform"``: ``num_frames`` frames at ``linspace(0, n - 1, num_frames)`` cast
    to int (LanguageBind's decord path), ``ShortSideScale(size)`` (bilinear), ``CenterCrop``.
    LanguageBind's HF processor also flips at random at inference: not done here (a
    deterministic input is what an attack and a cache need).

    ``sampler="clips"`` (ImageBind): ``clips`` clips of ``clip_seconds`` at the
    ``ConstantClipsPerVideoSampler`` starts (:func:`clip_starts`; duration = frames / fps),
    ``frames_per_clip`` frames each by ``UniformTemporalSubsample`` (``linspace`` over the
    clip's frames, i.e. its first and last for 2), ``ShortSideScale(size)``, then
    ``crops`` spatial crops per clip (3: ImageBind's ``SpatialCrop``, 1: centre). Output
    order: clip, crop, frame, so consecutive groups of ``frames_per_clip`` frames are the
    official 5 x 3 = 15 views that ImageBind's backbone encodes and averages. The three
    crops overlap and are perturbed independently (an adversary at least as strong as one
    acting on the shared pixels).
    """

    size: int = 224
    crop: int | None = None
    sampler: Literal["uniform", "clips"] = "uniform"
    num_frames: int = 8
    clips: int = 5
    clip_seconds: float = 2.0
    frames_per_clip: int = 2
    crops: int = 1

    def __post_init__(self) -> None:
        if self.sampler not in ("uniform", "clips"):
            raise ValueError(f"VideoTransform.sampler must be uniform|clips, got {self.sampler!r}")
        if self.crops not in (1, 3):
            raise ValueError(f"VideoTransform.crops must be 1 or 3, got {self.crops}")
        if min(self.num_frames, self.clips, self.frames_per_clip) < 1:
            raise ValueError("VideoTransform frame and clip counts must be >= 1")

    @property
    def total_frames(self) -> int:
        if self.sampler == "uniform":
            return self.num_frames
        return self.clips * self.crops * self.frames_per_clip

    def frame_indices(self, video: VideoFile) -> list[list[int]]:
        """Decoded-frame indices: one list per clip (one clip for ``uniform``)."""
        n = video.num_frames
        if self.sampler == "uniform":
            return [np.linspace(0, n - 1, self.num_frames).astype(int).tolist()]
        fps = Fraction(video.fps).limit_denominator(100000)
        duration = Fraction(n) / fps
        clip = Fraction(self.clip_seconds).limit_denominator(1000)
        out = []
        for s in clip_starts(duration, clip, self.clips):
            inside = [i for i, t in enumerate(video.times) if s <= t < s + clip]
            if not inside:  # a clip past the last frame: its nearest frame
                inside = [int(np.argmin(np.abs(video.times - float(s))))]
            pick = torch.linspace(0, len(inside) - 1, self.frames_per_clip).long().tolist()
            out.append([inside[k] for k in pick])
        return out

    def __call__(self, video: VideoFile) -> torch.Tensor:
        groups = self.frame_indices(video)
        flat = [i for g in groups for i in g]
        frames = video.frames(flat)  # (k, H, W, 3) uint8
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)
        x = short_side_scale(x, self.size)
        crop = self.crop or self.size
        if self.sampler == "uniform" or self.crops == 1:
            return _center_crop_tensor(x, crop).clamp_(0.0, 1.0).contiguous()
        k = self.frames_per_clip
        views = []
        for c in range(len(groups)):
            clip = x[c * k : (c + 1) * k]
            views += [uniform_crop(clip, crop, j) for j in range(3)]
        return torch.cat(views).clamp_(0.0, 1.0).contiguous()


# ------------------------------------------------------------------------------------ points


def pc_normalize(xyz: torch.Tensor) -> torch.Tensor:
    """Point-Bind's ``pc_normalize``: subtract the centroid, divide by the largest radius."""
    c = xyz - xyz.mean(0, keepdim=True)
    r = c.norm(dim=1).max()
    return c / r if r > 0 else c


@dataclass(frozen=True)
class PointTransform:
    """A decoded cloud ``(N, C)`` (xyz first) -> ``(num_points, 3)``.

    Point-Bind (DATA.md §1.4): farthest point sampling to ``num_points`` when ``N`` is
    larger, then :func:`pc_normalize` on xyz, normals dropped. Upstream FPS starts at a
    random index (seeded in its zero-shot script); here at ``fps_start`` (deterministic).
    ``sampling="first"`` takes the first ``num_points`` (DGCNN on the h5 variant). A cloud
    with fewer points than ``num_points`` repeats its points cyclically (ours).
    ``normalize=False`` keeps coordinates as stored (UniBind's pre-normalised ``.pt``).
    """

    num_points: int = 8192
    sampling: Literal["fps", "first"] = "fps"
    normalize: bool = True
    fps_start: int = 0

    def __post_init__(self) -> None:
        if self.num_points < 1:
            raise ValueError(f"PointTransform.num_points must be >= 1, got {self.num_points}")
        if self.sampling not in ("fps", "first"):
            raise ValueError(f"PointTransform.sampling must be fps|first, got {self.sampling!r}")

    def __call__(self, points: np.ndarray | torch.Tensor) -> torch.Tensor:
        xyz = torch.as_tensor(np.asarray(points, dtype=np.float32)[:, :3])
        n = xyz.shape[0]
        if n > self.num_points:
            if self.sampling == "fps":
                from advcal.backbones.pointbert import farthest_point_sample

                idx = farthest_point_sample(xyz[None], self.num_points, min(self.fps_start, n - 1))
                xyz = xyz[idx[0]]
            else:
                xyz = xyz[: self.num_points]
        elif n < self.num_points:
            xyz = xyz[torch.arange(self.num_points) % n]
        if self.normalize:
            xyz = pc_normalize(xyz)
        return xyz.contiguous()


# ------------------------------------------------------------------------------------ events


def event_counts(events: Events, num_events: int | None = None) -> torch.Tensor:
    """Per-pixel ON and OFF counts ``(2, H, W)`` on the sensor grid (the stream's extent when
    the format does not fix it); ``num_events``: only the first that many."""
    x, y, p = events.x, events.y, events.p
    if num_events is not None:
        x, y, p = x[:num_events], y[:num_events], p[:num_events]
    h = events.height or (int(y.max()) + 1 if len(y) else 1)
    w = events.width or (int(x.max()) + 1 if len(x) else 1)
    if len(x) and (x.max() >= w or y.max() >= h):
        raise ValueError(f"events outside the {w}x{h} sensor")
    flat = torch.as_tensor(y * w + x, dtype=torch.long)
    on = torch.as_tensor(p > 0)
    out = torch.zeros(2, h * w)
    out[0].index_add_(0, flat[on], torch.ones(int(on.sum())))
    out[1].index_add_(0, flat[~on], torch.ones(int((~on).sum())))
    return out.view(2, h, w)


def render_eventbind(counts: torch.Tensor) -> torch.Tensor:
    """EventBind's ``generate_event_image``: ``1 - (pos * [0, 255, 255] + neg * [255, 255,
    0]) / 255`` clipped to [0, 1], a ``(3, H, W)`` RGB frame (white background, ON events
    red, OFF blue, both black)."""
    pos, neg = counts[0], counts[1]
    r = 1 - neg
    g = 1 - pos - neg
    b = 1 - pos
    return torch.stack([r, g, b]).clamp(0.0, 1.0)


@dataclass(frozen=True)
class EventTransform:
    """An :class:`~advcal.data.decode.Events` stream -> a frame in [0, 1].

    ``layout="eventbind"`` (UniBind/EventBind, DATA.md §1.5): the stream (or its first
    ``num_events``) rendered by :func:`render_eventbind` at sensor resolution, stored as an
    8-bit RGB image (values are 0 or 1, so exactly) and passed through the vision recipe
    :class:`ImageTransform` (``Resize(size)`` bicubic + ``CenterCrop``), as UniBind reads
    pre-rendered event PNGs with ImageBind's vision loader -> ``(3, crop, crop)``.

    ``layout="counts"`` (minibind's digits layout): ON/OFF counts resized (area) to the
    shorter side ``size``, centre-cropped, divided by the per-sample maximum ->
    ``(2, crop, crop)``.
    """

    size: int = 224
    crop: int | None = None
    layout: Literal["eventbind", "counts"] = "eventbind"
    num_events: int | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("eventbind", "counts"):
            raise ValueError(f"EventTransform.layout must be eventbind|counts, got {self.layout!r}")

    def __call__(self, events: Events) -> torch.Tensor:
        counts = event_counts(events, self.num_events)
        crop = self.crop or self.size
        if self.layout == "counts":
            h, w = counts.shape[-2:]
            nw, nh = resized_size(w, h, self.size)
            x = F.adaptive_avg_pool2d(counts[None], (nh, nw))[0] if (nh, nw) != (h, w) else counts
            x = _center_crop_tensor(x, crop)
            return (x / x.amax().clamp_min(1e-12)).contiguous()
        Image = require("PIL.Image", "render event frames")
        rgb = (render_eventbind(counts) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return ImageTransform(self.size, crop, "RGB", "bicubic")(Image.fromarray(rgb, "RGB"))


# --------------------------------------------------------------------------- per-backbone sets


def imagebind_transforms(
    size: int = 224,
    *,
    audio_clips: int = 3,
    audio_clip_seconds: float = 2.0,
    video_frames_per_clip: int = 2,
    video_clips: int = 5,
    video_crops: int = 3,
) -> dict[str, Any]:
    """ImageBind (DATA.md §1.1), up to the attack space of ``ImageBindBackbone``:

    - image: RGB, PIL ``Resize(224)`` bicubic, ``CenterCrop(224)``, ``ToTensor``.
    - video: 5 clips x 2 s, 2 frames per clip, ``ShortSideScale(224)``, 3 spatial crops ->
      ``(30, 3, 224, 224)``: the 15 official views, averaged by the backbone.
    - audio: 16 kHz, channel 0, cut to the official clip-sampler span
      (:class:`WaveformTransform` ``clip_window``).
    - depth: disparity in [0, 1] (ours: no official depth loader), 1 x 224 x 224.
    - thermal: grey ``"L"``, PIL bicubic resize + crop (ImageBind PR #73), 1 x 224 x 224.
    """
    return {
        "image": ImageTransform(size, size, "RGB"),
        "video": VideoTransform(
            size,
            sampler="clips",
            clips=video_clips,
            frames_per_clip=video_frames_per_clip,
            crops=video_crops,
        ),
        "audio": WaveformTransform(16000, clip_window=(audio_clip_seconds, audio_clips)),
        "depth": DepthTransform(size, output="disparity"),
        "thermal": ImageTransform(size, size, "L"),
    }


def languagebind_transforms(
    size: int = 224, *, num_frames: int = 8, audio_samples: int | None = None,
    max_depth: float = 10.0,
) -> dict[str, Any]:  # fmt: skip
    """LanguageBind (DATA.md §1.2), up to the attack space of ``LanguageBindBackbone``:

    - image: open_clip's eval pipeline (PIL ``Resize`` bicubic, ``CenterCrop``, RGB,
      ``ToTensor``), the ImageNet zero-shot path of ``i_cls``.
    - video: ``num_frames`` frames at ``linspace(0, n - 1)`` (decord path),
      ``ShortSideScale`` bilinear, ``CenterCrop``; no random flip.
    - audio: 16 kHz, channel 0, repeat-tiled and zero-padded to ``audio_samples`` (the
      backbone's input length: ``target_length * 160``), ``waveform2melspec``'s rule.
    - depth: metres clipped to [0.01, ``max_depth``], tensor bicubic resize + crop.
    - thermal: grey ``"L"`` (LanguageBind's RGB conversion of a grey thermal image repeats
      one channel; the backbone repeats it to 3), tensor bicubic resize + crop (HF processor).
    """
    return {
        "image": ImageTransform(size, size, "RGB"),
        "video": VideoTransform(size, sampler="uniform", num_frames=num_frames),
        "audio": WaveformTransform(16000, audio_samples, fit="tile"),
        "depth": DepthTransform(size, output="metres", max_depth=max_depth),
        "thermal": ImageTransform(size, size, "L", backend="tensor"),
    }


def pointbind_point_transform(num_points: int = 8192) -> PointTransform:
    """Point-Bind's ModelNet40 item (DATA.md §1.4): FPS to 8192, ``pc_normalize``, xyz."""
    return PointTransform(num_points, "fps", True)


def unibind_transforms(size: int = 224, *, num_points: int = 8192, **imagebind: Any) -> dict:
    """UniBind (DATA.md §1.3): image, video, audio as ImageBind; thermal grey ``"L"``
    resized and cropped (its ``Normalize(0.5, 0.5)`` belongs inside the backbone,
    ``thermal_norm``); event: EventBind-rendered RGB frames through the vision recipe;
    point: Point-Bind's FPS + ``pc_normalize``."""
    t = imagebind_transforms(size, **imagebind)
    t.pop("depth")
    t["event"] = EventTransform(size, layout="eventbind")
    t["point"] = pointbind_point_transform(num_points)
    return t


def minibind_transforms(
    size: int = 32,
    *,
    frames: int = 4,
    audio_len: int = 2048,
    num_points: int = 128,
    modalities: Sequence[str] | None = None,
) -> dict[str, Any]:
    """minibind on files (the ``digits`` layouts, ``advcal.backbones.minibind.specs``):
    images/thermal/depth resized to ``size`` (32) and centre-cropped, video ``frames``
    uniform frames, audio 8 kHz mono fitted to ``audio_len`` samples (zero-padded or cut),
    points FPS + ``pc_normalize`` to ``num_points``, events as ON/OFF counts."""
    t = {
        "image": ImageTransform(size, size, "RGB"),
        "video": VideoTransform(size, sampler="uniform", num_frames=frames),
        "audio": WaveformTransform(8000, audio_len, fit="pad"),
        "depth": DepthTransform(size, output="disparity", interpolation="bilinear"),
        "thermal": ImageTransform(size, size, "L"),
        "point": PointTransform(num_points, "fps", True),
        "event": EventTransform(size, layout="counts"),
    }
    return {m: f for m, f in t.items() if modalities is None or m in modalities}


def generic_transforms() -> dict[str, Any]:
    """What a source applies when no transform is given: the decoded object as a tensor in
    its valid range with no resizing (image/thermal ``ToTensor`` in the file's own size,
    RGB/grey; audio the file's first channel at its own rate; video every frame; points
    xyz as stored; depth in metres; events as ON/OFF counts). Files of different sizes
    then cannot be batched: pass a backbone's transforms."""
    return {
        "image": _Generic("image"),
        "thermal": _Generic("thermal"),
        "depth": _Generic("depth"),
        "audio": _Generic("audio"),
        "video": _Generic("video"),
        "point": _Generic("point"),
        "event": _Generic("event"),
    }


@dataclass(frozen=True)
class _Generic:
    modality: str

    def __call__(self, obj: Any) -> torch.Tensor:
        m = self.modality
        if m in ("image", "thermal"):
            return _to_tensor(obj.convert("RGB" if m == "image" else "L"))
        if m == "depth":
            return torch.from_numpy(np.asarray(obj.metres, np.float32)).unsqueeze(0)
        if m == "audio":
            return torch.from_numpy(obj.samples[0].copy()).clamp_(-1.0, 1.0)
        if m == "video":
            f = obj.frames(list(range(obj.num_frames)))
            return torch.from_numpy(f).permute(0, 3, 1, 2).float().div_(255.0)
        if m == "point":
            return torch.as_tensor(np.asarray(obj, np.float32)[:, :3]).contiguous()
        return event_counts(obj)


__all__ = [
    "DepthTransform",
    "EventTransform",
    "ImageTransform",
    "PointTransform",
    "VideoTransform",
    "WaveformTransform",
    "clip_starts",
    "crop_box",
    "event_counts",
    "generic_transforms",
    "imagebind_transforms",
    "languagebind_transforms",
    "minibind_transforms",
    "pc_normalize",
    "pointbind_point_transform",
    "render_eventbind",
    "resized_size",
    "short_side_scale",
    "unibind_transforms",
    "uniform_crop",
]
