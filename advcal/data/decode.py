"""Decoders: one reader per file format, from bytes on disk to a plain decoded object.

A decoder never resizes, resamples or normalises: that is a transform's job
(:mod:`advcal.data.transforms`), so one decoded object can feed every backbone's recipe.

==========  ==============================  ===========================================
modality    decoder -> object               library (extra ``advcal[data]``)
==========  ==============================  ===========================================
image       :func:`decode_image` -> PIL     Pillow
thermal     :func:`decode_image` -> PIL     Pillow
depth       :func:`decode_depth` -> Depth   Pillow (uint16 PNG), numpy (.npy)
audio       :func:`decode_audio` -> Audio   soundfile (+ soxr in the transforms)
video       :func:`open_video` -> VideoFile PyAV (``av``)
point       :func:`decode_points` -> array  numpy (.txt/.xyz/.pts/.npy/.ply), torch (.pt)
event       :func:`decode_events` -> Events numpy (.bin N-Caltech101, .npz N-ImageNet)
==========  ==============================  ===========================================

Every optional library is imported lazily by :func:`require`, which raises one
:class:`MissingDecoder` naming the package and the extra to install, so ``import advcal.data``
works with none of them installed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EXTRA = "pip install 'advcal[data]'"

# import name -> the pip package that provides it
PACKAGES = {"PIL": "pillow", "soundfile": "soundfile", "soxr": "soxr", "av": "av", "h5py": "h5py"}

# file extension -> modality (folder: scans, paired: manifests); lower-case, with the dot
EXTENSIONS: dict[str, str] = {
    **dict.fromkeys((".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"), "image"),
    **dict.fromkeys((".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"), "audio"),
    **dict.fromkeys((".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v"), "video"),
    **dict.fromkeys((".txt", ".xyz", ".pts", ".ply", ".npy", ".pt"), "point"),
    **dict.fromkeys((".bin", ".npz"), "event"),
}
# what each modality needs to decode (checked when a source opens, before any work)
NEEDS: dict[str, tuple[str, ...]] = {
    "image": ("PIL",),
    "thermal": ("PIL",),
    "depth": ("PIL",),
    "audio": ("soundfile", "soxr"),
    "video": ("av",),
    "point": (),
    "event": (),
}


class MissingDecoder(ImportError):
    """A decoder library is not installed; the message names the package and the extra."""


class DecodeError(ValueError):
    """A file could not be decoded; the message names the file."""


def require(module: str, why: str = "") -> Any:
    """Import ``module`` or raise :class:`MissingDecoder` naming the pip package and extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pkg = PACKAGES.get(module, module)
        for_what = f" to {why}" if why else ""
        raise MissingDecoder(
            f"advcal needs the '{pkg}' package{for_what}; install the data extra: {EXTRA}"
        ) from err


def require_for(modalities: tuple[str, ...] | list[str], scheme: str) -> None:
    """Check, before any file is read, that every decoder ``modalities`` need is importable."""
    for m in modalities:
        for mod in NEEDS.get(m, ()):
            require(mod, f"decode {m} files for the '{scheme}' data source")


def _fail(path: str | Path, err: BaseException) -> DecodeError:
    return DecodeError(f"cannot decode {path}: {type(err).__name__}: {err}")


# -- images --------------------------------------------------------------------------------------
def decode_image(path: str | Path, mode: str | None = None) -> Any:
    """A loaded ``PIL.Image`` in the file's own mode (``mode``: convert to ``"RGB"``/``"L"``;
    the transforms convert, in the order each official recipe does)."""
    Image = require("PIL.Image", "decode images")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode) if mode is not None and im.mode != mode else im.copy()
    except Exception as err:
        raise _fail(path, err) from err


@dataclass(frozen=True)
class Depth:
    """A depth map in metres, ``(H, W)`` float32 (0 = no reading)."""

    metres: np.ndarray


def decode_depth(path: str | Path, scale: float = 1e-3) -> Depth:
    """A depth map: a 16-bit PNG in millimetres (TUI-NICR NYUv2 ``depth``/``depth_raw`` and
    LanguageBind's NYU-D folders; ``scale`` = metres per stored unit, 1e-3) or a float
    ``.npy`` in metres. An 8-bit image carries no metric scale and is refused by name."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path).astype(np.float32)
            if arr.ndim != 2:
                raise ValueError(f"a depth .npy must be (H, W), got {arr.shape}")
            return Depth(arr)
        Image = require("PIL.Image", "decode depth PNGs")
        with Image.open(path) as im:
            arr = np.asarray(im)
        if arr.dtype == np.uint8:
            raise ValueError(
                "8-bit image: no metric depth; store depth as a 16-bit PNG in millimetres "
                "or a float .npy in metres"
            )
        if arr.ndim != 2:
            raise ValueError(f"a depth image must have one channel, got shape {arr.shape}")
        return Depth(arr.astype(np.float32) * np.float32(scale))
    except Exception as err:
        raise _fail(path, err) from err


# -- audio ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Audio:
    """A waveform ``(channels, samples)`` float32 in [-1, 1] at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return self.samples.shape[1] / self.sample_rate


def decode_audio(path: str | Path) -> Audio:
    """A whole audio file as float32 ``(channels, samples)`` at its own rate (soundfile)."""
    sf = require("soundfile", "decode audio")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise _fail(path, err) from err
    if data.shape[0] == 0:
        raise DecodeError(f"cannot decode {path}: the file holds no samples")
    return Audio(np.ascontiguousarray(data.T), int(sr))


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``(channels, n)`` from ``rate`` to ``target`` Hz with soxr (its default high quality;
    torchaudio's sinc resampler, which the official loaders call, differs below 1e-3)."""
    if rate == target:
        return samples
    soxr = require("soxr", "resample audio")
    out = soxr.resample(samples.T, rate, target)
    return np.ascontiguousarray(np.asarray(out, dtype=np.float32).reshape(-1, samples.shape[0]).T)


# -- video ---------------------------------------------------------------------------------------
class VideoFile:
    """A video on disk, decoded on demand (PyAV): the frame count and times come from one
    demux pass (no decoding); :meth:`frames` decodes sequentially and keeps only the
    requested frames, so memory is the frames asked for, not the whole video."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        av = require("av", "decode video")
        try:
            with av.open(str(self.path)) as c:
                s = c.streams.video[0]
                tb = float(s.time_base)
                pts = sorted(p.pts for p in c.demux(s) if p.pts is not None and p.size)
                rate = s.average_rate or s.guessed_rate
                self.fps = float(rate) if rate else 0.0
                start = s.start_time if s.start_time is not None else (pts[0] if pts else 0)
        except Exception as err:
            raise _fail(path, err) from err
        if not pts:
            raise DecodeError(f"cannot decode {path}: no video frames")
        self.times = np.asarray([(p - start) * tb for p in pts], dtype=np.float64)
        if not self.fps:
            self.fps = (len(pts) - 1) / max(self.times[-1], 1e-9) if len(pts) > 1 else 1.0

    @property
    def num_frames(self) -> int:
        return len(self.times)

    @property
    def duration(self) -> float:
        """Seconds: frames / fps (decord's and pytorchvideo's convention)."""
        return self.num_frames / self.fps

    def frames(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """Frames ``indices`` (in presentation order, repeats allowed) as ``(k, H, W, 3)``
        uint8 RGB."""
        av = require("av", "decode video")
        want = [int(i) for i in indices]
        if not want:
            raise ValueError("no frame indices")
        if min(want) < 0 or max(want) >= self.num_frames:
            raise IndexError(f"frame index out of [0, {self.num_frames}) for {self.path}")
        keep = set(want)
        got: dict[int, np.ndarray] = {}
        # a fresh reformatter per call: PyAV caches a scaler (with its own worker threads)
        # that a forked DataLoader worker would inherit without the threads and hang on
        from av.video.reformatter import VideoReformatter

        rgb = VideoReformatter()
        try:
            with av.open(str(self.path)) as c:
                s = c.streams.video[0]
                for i, frame in enumerate(c.decode(s)):
                    if i in keep:
                        got[i] = rgb.reformat(frame, format="rgb24").to_ndarray()
                    if i >= max(want):
                        break
        except Exception as err:
            raise _fail(self.path, err) from err
        missing = keep - set(got)
        if missing:
            raise DecodeError(f"cannot decode {self.path}: frames {sorted(missing)[:5]} missing")
        return np.stack([got[i] for i in want])


def open_video(path: str | Path) -> VideoFile:
    return VideoFile(path)


# -- points --------------------------------------------------------------------------------------
def _read_ply(path: Path) -> np.ndarray:
    """x, y, z of the ``vertex`` element of an ascii or binary PLY (the other properties and
    elements after it are ignored)."""
    types = {"char": "i1", "uchar": "u1", "short": "i2", "ushort": "u2", "int": "i4",
             "uint": "u4", "float": "f4", "double": "f8", "float32": "f4", "float64": "f8",
             "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4",
             "uint32": "u4"}  # fmt: skip
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise ValueError("not a PLY file")
        fmt, n, props, in_vertex = "", 0, [], False
        while True:
            line = f.readline()
            if not line:
                raise ValueError("PLY header has no end_header")
            tok = line.decode("ascii", "replace").split()
            if not tok:
                continue
            if tok[0] == "format":
                fmt = tok[1]
            elif tok[0] == "element":
                in_vertex = tok[1] == "vertex"
                if in_vertex:
                    n = int(tok[2])
            elif tok[0] == "property" and in_vertex:
                if tok[1] == "list":
                    raise ValueError("list properties in the vertex element are not supported")
                props.append((tok[2], types[tok[1]]))
            elif tok[0] == "end_header":
                break
        names = [p for p, _ in props]
        if not {"x", "y", "z"} <= set(names):
            raise ValueError(f"PLY vertices have no x, y, z (properties {names})")
        if fmt == "ascii":
            rows = np.loadtxt(f, max_rows=n, ndmin=2)
            cols = [names.index(k) for k in ("x", "y", "z")]
            return rows[:, cols].astype(np.float32)
        endian = {"binary_little_endian": "<", "binary_big_endian": ">"}[fmt]
        dt = np.dtype([(p, endian + t) for p, t in props])
        v = np.frombuffer(f.read(dt.itemsize * n), dtype=dt, count=n)
        return np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float32)


def decode_points(path: str | Path) -> np.ndarray:
    """A point cloud ``(N, C)`` float32, ``C >= 3`` (xyz first; ModelNet40's normals follow).

    ``.txt`` comma- or space-separated rows (``modelnet40_normal_resampled``), ``.xyz``/``.pts``
    whitespace rows, ``.npy``, ``.ply`` (vertex x/y/z), ``.pt`` (a tensor, UniBind's
    pre-processed clouds; read with ``weights_only=True``)."""
    path = Path(path)
    ext = path.suffix.lower()
    try:
        if ext == ".txt":
            with open(path) as f:
                first = f.readline()
            arr = np.loadtxt(path, delimiter="," if "," in first else None, ndmin=2)
        elif ext in (".xyz", ".pts"):
            arr = np.loadtxt(path, ndmin=2)
        elif ext == ".npy":
            arr = np.load(path)
        elif ext == ".ply":
            arr = _read_ply(path)
        elif ext == ".pt":
            import torch

            arr = torch.load(path, map_location="cpu", weights_only=True).numpy()
        else:
            raise ValueError(f"unknown point-cloud extension {ext!r}")
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] < 3 or arr.shape[0] == 0:
            raise ValueError(f"a point cloud must be (N >= 1, C >= 3), got {arr.shape}")
        if not np.isfinite(arr[:, :3]).all():
            raise ValueError("NaN or Inf coordinates")
        return arr
    except Exception as err:
        raise _fail(path, err) from err


# -- events --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Events:
    """An event stream: ``x``, ``y`` (pixels), ``t`` (seconds), ``p`` (polarity, 1 = ON,
    0 = OFF), each ``(N,)``; ``height``/``width``: the sensor size when the format fixes it
    (N-ImageNet: 480 x 640), else None (renderers then use the stream's extent)."""

    x: np.ndarray
    y: np.ndarray
    t: np.ndarray
    p: np.ndarray
    height: int | None = None
    width: int | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


NIMAGENET_SENSOR = (480, 640)  # n_imagenet real_cnn_model/data/imagenet.py SENSOR_H, SENSOR_W


def decode_events(path: str | Path) -> Events:
    """``.bin`` N-Caltech101 (5 bytes per event: x = b0, y = b1, p = b2 >> 7,
    t = (b2 & 127) << 16 | b3 << 8 | b4 microseconds; DATA.md §1.5) or ``.npz`` N-ImageNet
    (``event_data`` with fields x, y, t, p, or the uncompressed x_pos, y_pos, timestamp,
    polarity; t in microseconds)."""
    path = Path(path)
    ext = path.suffix.lower()
    try:
        if ext == ".bin":
            raw = np.fromfile(path, dtype=np.uint8)
            if raw.size % 5:
                raise ValueError(f"{raw.size} bytes is not a whole number of 5-byte events")
            r = raw.reshape(-1, 5).astype(np.int64)
            x, y = r[:, 0], r[:, 1]
            p = (r[:, 2] & 128) >> 7
            t = ((r[:, 2] & 127) << 16) | (r[:, 3] << 8) | r[:, 4]
            hw: tuple[int | None, int | None] = (None, None)
        elif ext == ".npz":
            with np.load(path) as z:
                if "event_data" in z:
                    ev = z["event_data"]
                    x, y, t, p = ev["x"], ev["y"], ev["t"], ev["p"]
                elif "x_pos" in z:
                    x, y, t, p = z["x_pos"], z["y_pos"], z["timestamp"], z["polarity"]
                else:
                    raise ValueError(f"no 'event_data' or 'x_pos' arrays (keys {list(z)})")
            hw = NIMAGENET_SENSOR
        else:
            raise ValueError(f"unknown event-file extension {ext!r}")
        x, y = np.asarray(x, np.int64), np.asarray(y, np.int64)
        p = (np.asarray(p) > 0).astype(np.int64)
        t = np.asarray(t, np.float64) / 1e6
        if x.size and (x.min() < 0 or y.min() < 0):
            raise ValueError("negative event coordinates")
        return Events(x, y, t, p, *hw)
    except Exception as err:
        raise _fail(path, err) from err


def decoder_for(modality: str) -> Any:
    """The default decoder of ``modality`` (a module-level function, so sources pickle)."""
    table = {
        "image": decode_image,
        "thermal": decode_image,
        "depth": decode_depth,
        "audio": decode_audio,
        "video": open_video,
        "point": decode_points,
        "event": decode_events,
    }
    try:
        return table[modality]
    except KeyError:
        raise ValueError(f"no decoder for modality {modality!r}; have {sorted(table)}") from None


__all__ = [
    "EXTENSIONS",
    "EXTRA",
    "Audio",
    "DecodeError",
    "Depth",
    "Events",
    "MissingDecoder",
    "VideoFile",
    "decode_audio",
    "decode_depth",
    "decode_events",
    "decode_image",
    "decode_points",
    "decoder_for",
    "open_video",
    "require",
    "require_for",
    "resample",
]
