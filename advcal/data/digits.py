"""The embedded ``digits`` dataset: scikit-learn's handwritten digits rendered as seven modalities.

Source: ``sklearn.datasets.load_digits`` (1797 grey 8x8 glyphs, values 0..16, 10 classes),
bundled with scikit-learn, so the dataset builds offline. Every source glyph ``i`` is rendered
once, deterministically, into seven paired modalities that all carry id ``i`` and its label.
Per-sample nuisance (position, scale, rotation, colours, motion, tone jitter, phase, noise) is
drawn from one generator seeded by ``seed`` in a fixed order, so a render is a pure function of
``seed``; it is cached in memory per process (:func:`functools.lru_cache`).

Layouts (batch dimension excluded), all float32:

=========  ================  ===========  =================================================
modality   shape             range        what it is
=========  ================  ===========  =================================================
image      (3, 32, 32)       [0, 1]       coloured glyph on a coloured, faintly striped bg
video      (4, 3, 32, 32)    [0, 1]       T=4 frames (time first) of the glyph translating
audio      (2048,)           [-1, 1]      8 kHz DTMF tone pair of the digit, quiet (amp
                                          0.05..0.1), enveloped by the glyph's row profile
depth      (1, 32, 32)       [0, 1]       glyph relief on a tilted plane (near = bright)
thermal    (1, 32, 32)       [0, 1]       blurred glyph heat on an ambient gradient
point      (128, 3)          ~[-1, 1]     points on the glyph's strokes, extruded in z
event      (2, 32, 32)       [0, 1]       ON/OFF polarity counts of the moving glyph,
                                          normalised by the per-sample maximum
=========  ================  ===========  =================================================

The whole render (1797 samples x 7 modalities, ~160 MB) takes a couple of seconds on a CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from advcal.data import MultiModalDataset

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a drawing of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a picture of the numeral {}.",
)
MODALITIES = ("image", "video", "audio", "depth", "thermal", "point", "event")

SIZE = 32  # side of every image-like modality
VIDEO_FRAMES = 4  # T of `video`
EVENT_STEPS = 8  # sub-frames the event sensor integrates over (same trajectory as `video`)
AUDIO_RATE = 8000  # Hz
AUDIO_LEN = 2048  # samples (0.256 s)
NUM_POINTS = 128
# DTMF keypad: digit -> (row tone, column tone) in Hz; 0 sits on the bottom row, middle column.
DTMF = {
    0: (941, 1336),
    1: (697, 1209),
    2: (697, 1336),
    3: (697, 1477),
    4: (770, 1209),
    5: (770, 1336),
    6: (770, 1477),
    7: (852, 1209),
    8: (852, 1336),
    9: (852, 1477),
}


def _u(g: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    """``(n, *shape)`` uniform draws in [lo, hi)."""
    return lo + (hi - lo) * torch.rand((n, *shape), generator=g)


def _place(
    glyph: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """Warp ``glyph (B, 1, 8, 8)`` into ``(B, 1, SIZE, SIZE)`` frames, all samples at once.

    ``scale (B,)`` is the glyph's width as a fraction of the frame, ``angle (B,)`` radians,
    ``shift (B, 2)`` its centre in normalised coordinates [-1, 1] (x right, y down).
    """
    b = glyph.shape[0]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps output coords to input coords: the inverse of "rotate, scale, shift".
    theta = torch.stack(
        [
            torch.stack([cos, sin, -(cos * shift[:, 0] + sin * shift[:, 1])], -1),
            torch.stack([-sin, cos, -(-sin * shift[:, 0] + cos * shift[:, 1])], -1),
        ],
        1,
    )
    grid = F.affine_grid(theta, [b, 1, SIZE, SIZE], align_corners=False)
    return F.grid_sample(glyph, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur(x: torch.Tensor, k: int) -> torch.Tensor:
    """Box blur with a ``k x k`` window, same size."""
    return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)


def _colourise(g: torch.Generator, glyph: torch.Tensor, n: int) -> torch.Tensor:
    """Glyph masks ``(n, F, 1, H, W)`` -> RGB ``(n, F, 3, H, W)``, one palette per sample."""
    fg = _u(g, n, 0.55, 1.0, 1, 3, 1, 1)
    bg = _u(g, n, 0.0, 0.35, 1, 3, 1, 1)
    # faint stripes with a random orientation and phase: texture the encoder must ignore
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    ang, phase = _u(g, n, 0, math.pi, 1, 1), _u(g, n, 0, 2 * math.pi, 1, 1)
    stripes = torch.sin(6 * (xx * torch.cos(ang) + yy * torch.sin(ang)) + phase)  # (n, H, W)
    bg = bg + 0.06 * stripes[:, None, None]
    rgb = bg + (fg - bg) * glyph
    return rgb + 0.03 * torch.randn(rgb.shape, generator=g)


@functools.lru_cache(maxsize=2)
def _render(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Render all 1797 source samples; returns (inputs, labels). Cached: treat as read-only."""
    from sklearn.datasets import load_digits

    src = load_digits()
    glyph = torch.as_tensor(src.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    labels = torch.as_tensor(src.target, dtype=torch.int64)
    n = glyph.shape[0]
    g = torch.Generator().manual_seed(10_007 + int(seed))
    out: dict[str, torch.Tensor] = {}

    # image: scale 0.55..0.8 of the frame, rotation +-12 deg, centre anywhere that keeps it inside
    scale = _u(g, n, 0.55, 0.8)
    shift = _u(g, n, -1, 1, 2) * (1 - scale[:, None]) * 0.8
    mask = _place(glyph, scale, _u(g, n, -0.2, 0.2), shift)  # (N, 1, 32, 32)
    out["image"] = _colourise(g, mask[:, None], n)[:, 0].clamp(0, 1)

    # video + event: the glyph translates on a straight line with a random direction
    scale = _u(g, n, 0.55, 0.7)
    angle = _u(g, n, -0.2, 0.2)
    heading = _u(g, n, 0, 2 * math.pi)
    speed = _u(g, n, 0.25, 0.45)  # total path length, normalised coords
    vel = torch.stack([torch.cos(heading), torch.sin(heading)], -1) * speed[:, None]
    start = _u(g, n, -1, 1, 2) * ((1 - scale[:, None]) * 0.8 - speed[:, None] / 2).clamp(min=0)
    start = start - vel / 2
    times = torch.linspace(0, 1, EVENT_STEPS)  # video frames are every other event sub-frame
    frames = torch.stack(
        [_place(glyph, scale, angle, start + t * vel) for t in times.tolist()], 1
    )  # (N, EVENT_STEPS, 1, 32, 32)
    vid_idx = torch.linspace(0, EVENT_STEPS - 1, VIDEO_FRAMES).round().long()
    out["video"] = _colourise(g, frames[:, vid_idx], n).clamp(0, 1)  # (N, T, 3, 32, 32)
    diff = frames[:, 1:, 0] - frames[:, :-1, 0]  # (N, S-1, 32, 32) brightness change
    ev = torch.stack([diff.clamp(min=0).sum(1), (-diff).clamp(min=0).sum(1)], 1)
    ev = ev + 0.15 * (torch.rand(ev.shape, generator=g) < 0.02)  # sensor noise events
    out["event"] = ev / ev.amax((1, 2, 3), keepdim=True).clamp(min=1e-6)

    # audio: quiet DTMF pair with +-1.5% tone jitter, random phases, glyph-row envelope
    tones = torch.tensor([DTMF[d] for d in range(10)], dtype=torch.float32)[labels]  # (N, 2)
    tones = tones * _u(g, n, 0.985, 1.015, 2)
    phase = _u(g, n, 0, 2 * math.pi, 2, 1)
    t = torch.arange(AUDIO_LEN, dtype=torch.float32) / AUDIO_RATE
    wave = torch.sin(2 * math.pi * tones[:, :, None] * t + phase).sum(1) / 2  # (N, L)
    rows = glyph[:, 0].mean(2)  # (N, 8): ink per glyph row
    env = F.interpolate(rows[:, None], size=AUDIO_LEN, mode="linear", align_corners=True)[:, 0]
    env = 0.5 + 0.5 * env / env.mean(1, keepdim=True).clamp(min=1e-6)
    amp = _u(g, n, 0.05, 0.1)
    wave = amp[:, None] * (env * wave / env.amax(1, keepdim=True))
    wave = wave + 0.1 * amp[:, None] * torch.randn(wave.shape, generator=g)
    out["audio"] = wave.clamp(-1, 1)

    # depth: slightly blurred glyph relief raised from a tilted plane
    scale = _u(g, n, 0.55, 0.8)
    relief = _blur(_place(glyph, scale, _u(g, n, -0.2, 0.2), _u(g, n, -1, 1, 2) * 0.15), 3)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    tilt = _u(g, n, -0.1, 0.1, 2, 1, 1)
    plane = _u(g, n, 0.2, 0.4, 1, 1) + tilt[:, 0] * xx + tilt[:, 1] * yy  # (N, 32, 32)
    depth = plane[:, None] + _u(g, n, 0.35, 0.5, 1, 1, 1) * relief
    out["depth"] = (depth + 0.02 * torch.randn(depth.shape, generator=g)).clamp(0, 1)

    # thermal: heat diffuses (wide blur), ambient temperature with a vertical gradient
    scale = _u(g, n, 0.55, 0.8)
    heat = _blur(_blur(_place(glyph, scale, _u(g, n, -0.2, 0.2), _u(g, n, -1, 1, 2) * 0.15), 5), 3)
    heat = heat / heat.amax((1, 2, 3), keepdim=True).clamp(min=1e-6)
    ambient = _u(g, n, 0.05, 0.3, 1, 1) + _u(g, n, -0.08, 0.08, 1, 1) * yy  # (N, 32, 32)
    therm = ambient[:, None] + _u(g, n, 0.45, 0.65, 1, 1, 1) * heat
    out["thermal"] = (therm + 0.02 * torch.randn(therm.shape, generator=g)).clamp(0, 1)

    # point: points drawn where the (upsampled) glyph has ink, extruded to a slab in z
    ink = _place(glyph, torch.full((n,), 0.9), torch.zeros(n), torch.zeros(n, 2))[:, 0]
    w = ink.flatten(1).clamp(min=0) ** 2 + 1e-6  # (N, 1024)
    pix = torch.multinomial(w, NUM_POINTS, replacement=True, generator=g)  # (N, P)
    row, col = (pix // SIZE).float(), (pix % SIZE).float()
    x = (col + torch.rand(row.shape, generator=g)) / SIZE * 2 - 1
    y = 1 - (row + torch.rand(row.shape, generator=g)) / SIZE * 2
    z = _u(g, n, -0.15, 0.15, NUM_POINTS)
    pts = torch.stack([x, y, z], -1)  # (N, P, 3)
    rot = _u(g, n, -0.25, 0.25)  # about z
    c, s = torch.cos(rot)[:, None], torch.sin(rot)[:, None]
    pts = torch.stack([c * pts[..., 0] - s * pts[..., 1], s * pts[..., 0] + c * pts[..., 1],
                       pts[..., 2]], -1)  # fmt: skip
    pts = pts * _u(g, n, 0.85, 1.0, 1, 1) + _u(g, n, -0.1, 0.1, 1, 3)
    out["point"] = pts + 0.01 * torch.randn(pts.shape, generator=g)

    return {m: out[m].contiguous() for m in MODALITIES}, labels


@functools.lru_cache(maxsize=8)
def _split_index(split: str, seed: int, test_fraction: float) -> torch.Tensor:
    """Source-sample indices of ``split``: stratified by class, shuffled with ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = list(range(len(y)))
    if split == "all":
        return torch.tensor(idx)
    train, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    return torch.tensor(train if split == "train" else test)


def digits(
    split: str = "train",
    *,
    modalities: Sequence[str] | None = None,
    seed: int = 0,
    test_fraction: float = 0.25,
    limit: int | None = None,
) -> MultiModalDataset:
    """The embedded seven-modality digits dataset (see the module docstring for layouts).

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``; train/test are disjoint in source sample,
            stratified by class.
        modalities: subset of :data:`MODALITIES` (default: all seven).
        seed: seeds both the render nuisance and the split.
        test_fraction: share of each class in the test split.
        limit: keep only the first ``limit`` samples of the (shuffled) split.

    Returns:
        A :class:`MultiModalDataset` whose ``ids`` are the source sample indices (0..1796).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit}")
    mods = tuple(modalities) if modalities is not None else MODALITIES
    bad = [m for m in mods if m not in MODALITIES]
    if bad or not mods:
        raise ValueError(f"unknown modalities {bad} for 'digits'; it has {list(MODALITIES)}")
    inputs, labels = _render(int(seed))
    index = _split_index(split, int(seed), float(test_fraction))
    if limit is not None:
        index = index[:limit]
    return MultiModalDataset(
        {m: inputs[m][index] for m in mods},  # indexing copies: the cache stays untouched
        labels[index],
        CLASS_NAMES,
        index.clone(),
        name=f"digits-{split}",
        templates=TEMPLATES,
        split=split,
        source="digits",
    )


__all__ = ["CLASS_NAMES", "MODALITIES", "TEMPLATES", "digits"]
