"""``minibind``: the embedded default backbone — one small frozen encoder per ``digits`` modality.

Construction (all ours, small enough to pretrain on a laptop CPU in a few minutes):

* **Text tower** (frozen, no training, no dependency): a prompt is lower-cased, split into
  words; each word contributes its hashed character 3- and 4-grams (with ``<`` / ``>`` word
  boundaries, CRC32 into ``text_features`` buckets) weighted by ``1/sqrt(#grams)``, so every
  word weighs the same. Words in a small built-in list of template words ("a", "the", "photo",
  "digit"...) weigh ``template_word_weight`` (0.25): they carry no class information and would
  otherwise make all class prompts near-identical. The bag goes through a fixed Gaussian
  projection (seeded by ``text_seed``) to ``embed_dim`` and is L2-normalised. Deterministic
  across processes and platforms, and defined for any prompt.
* **Encoders** (trained once, then frozen): small CNNs with BatchNorm for the image-like
  modalities (video folds its T frames into channels), a strided 1-D CNN for the audio
  waveform, a PointNet (shared per-point MLP + max-pool) for points. Each ends in a linear map
  to ``embed_dim``. Input normalisation lives inside the encoder, so attacks act on the raw
  input in its valid range.
* **Binding**: each encoder is trained so that ``cos(e, C) / tau`` (``tau = 0.07``) classifies
  its input, where ``C`` are the fixed text centers of the digits class prompts — the CLIP/
  ImageBind recipe with the text side frozen.
* **Augmentation**: Gaussian input noise with a per-sample sigma drawn uniformly in
  ``[0, noise[m]]`` (a prototype without it had 0% robust accuracy at 4/255, so that no head
  could help), plus small shifts (images) / rotation-scale-offset (points) against overfitting.
  Result: encoders that are accurate but brittle — the regime where calibration heads help.

``load()`` reads a checkpoint, or the cache ``$ADVCAL_CACHE/minibind-<config hash>.safetensors``
(default ``~/.cache/advcal``), or pretrains deterministically and writes that cache atomically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advcal.backbones.base import Backbone, fold_batchnorm
from advcal.specs import InputSpec

log = logging.getLogger("advcal.minibind")

FORMAT = "advcal-minibind-v1"
MODALITIES = ("image", "video", "audio", "depth", "thermal", "point", "event")
# bump when the digits render or the architecture changes: it is part of the cache key
VERSION = 4

# Default attack budgets: pixels/event frames 4/255 of [0, 1]; the waveform 4/255 absolute in
# [-1, 1] (the tones are quiet, amplitude 0.05..0.1, so this is a real budget); points 0.015
# coordinate units, a quarter of one 2/32 pixel cell of the [-1, 1] frame (0.02 left only ~6%
# PGD-20 robust accuracy, 0.01 ~37%).
POINT_EPS = 0.015


def specs(
    frames: int = 4, audio_len: int = 2048, num_points: int = 128, point_eps: float = POINT_EPS
) -> dict[str, InputSpec]:
    """The InputSpecs of the ``digits`` modalities (see :mod:`advcal.data.digits`)."""
    px = 4 / 255
    return {
        "image": InputSpec((3, 32, 32), 0.0, 1.0, px, "linf", "pixels", "RGB 32x32 in [0, 1]"),
        "video": InputSpec(
            (frames, 3, 32, 32), 0.0, 1.0, px, "linf", "pixels", f"{frames} RGB frames, time first"
        ),
        "audio": InputSpec(
            (audio_len,), -1.0, 1.0, px, "linf", "waveform", "8 kHz mono waveform in [-1, 1]"
        ),
        "depth": InputSpec((1, 32, 32), 0.0, 1.0, px, "linf", "pixels", "depth map in [0, 1]"),
        "thermal": InputSpec((1, 32, 32), 0.0, 1.0, px, "linf", "pixels", "heat map in [0, 1]"),
        "point": InputSpec(
            (num_points, 3), None, None, point_eps, "linf", "points", "xyz in about [-1, 1]"
        ),
        "event": InputSpec(
            (2, 32, 32), 0.0, 1.0, px, "linf", "pixels", "ON/OFF event counts in [0, 1]"
        ),
    }


@dataclass(frozen=True)
class MiniBindConfig:
    """Architecture + pretraining recipe; its hash names the cached checkpoint.

    ``noise`` is the per-modality maximum sigma of the Gaussian input-noise augmentation, in
    input units (pixels in [0, 1]; waveform in [-1, 1]; point coordinates). The defaults were
    tuned with ``scripts/probe_minibind.py`` so that every encoder is >= 90% clean on the test
    split and PGD-20 at the spec eps leaves roughly 5-50% (brittle, not hopeless): image needs
    little noise (shift augmentation already smooths it), video/depth/thermal take 0.1.
    """

    embed_dim: int = 256
    width: int = 16  # channels of the first conv; doubles per stage
    modalities: tuple[str, ...] = MODALITIES
    tau: float = 0.07
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    noise: tuple[tuple[str, float], ...] = (
        ("image", 0.03),
        ("video", 0.1),
        ("audio", 0.03),
        ("depth", 0.1),
        ("thermal", 0.1),
        ("point", 0.03),
        ("event", 0.06),
    )
    # geometric augmentation: image-like inputs shift by up to `shift` pixels, point clouds get
    # a small random rotation/scale/offset; without it video/event/point overfit (train 99%,
    # test ~83%) on 1347 samples
    shift: int = 2
    seed: int = 0
    data_seed: int = 0
    text_seed: int = 1234
    text_features: int = 4096
    template_word_weight: float = 0.25
    frames: int = 4
    audio_len: int = 2048
    num_points: int = 128
    point_eps: float = POINT_EPS
    version: int = VERSION

    def __post_init__(self) -> None:
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ValueError(f"MiniBindConfig.modalities: unknown {bad}; choose from {MODALITIES}")
        for name in ("embed_dim", "width", "epochs", "batch_size", "text_features"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MiniBindConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.tau > 0 or not self.lr > 0:
            raise ValueError(f"MiniBindConfig needs tau > 0 and lr > 0, got {self.tau}, {self.lr}")
        if any(s < 0 for _, s in self.noise):
            raise ValueError(f"MiniBindConfig.noise sigmas must be >= 0, got {self.noise}")

    def sigma(self, modality: str) -> float:
        return dict(self.noise).get(modality, 0.0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MiniBindConfig:
        d = json.loads(text)
        d["modalities"] = tuple(d["modalities"])
        d["noise"] = tuple((m, float(s)) for m, s in d["noise"])
        return cls(**d)

    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# text tower
# --------------------------------------------------------------------------------------------
# words that carry no class information in prompts (weighted down, not dropped)
_TEMPLATE_WORDS = (
    "a an the of to in on for with and or is this that photo picture image drawing drawn "
    "handwritten written digit number numeral sound recording video depth thermal point "
    "cloud map clip example"
)
TEMPLATE_WORDS = frozenset(_TEMPLATE_WORDS.split())


class HashTextEncoder(nn.Module):
    """Frozen text tower: hashed character n-gram bag -> fixed random projection -> L2 norm."""

    def __init__(
        self, dim: int, features: int = 4096, seed: int = 1234, template_word_weight: float = 0.25
    ) -> None:
        super().__init__()
        self.features = int(features)
        self.template_word_weight = float(template_word_weight)
        g = torch.Generator().manual_seed(int(seed))
        # (F, D) Gaussian projection; rebuilt from the seed, so it is not stored in checkpoints
        proj = torch.randn(self.features, dim, generator=g) / dim**0.5
        self.register_buffer("proj", proj, persistent=False)

    def bag(self, prompt: str) -> torch.Tensor:
        """``(F,)`` weighted n-gram counts of one prompt."""
        v = torch.zeros(self.features)
        words = "".join(c if c.isalnum() else " " for c in prompt.lower()).split()
        for word in words:
            w = f"<{word}>"
            grams = [w[i : i + n] for n in (3, 4) for i in range(len(w) - n + 1)] or [w]
            weight = (self.template_word_weight if word in TEMPLATE_WORDS else 1.0) / len(
                grams
            ) ** 0.5
            for gram in grams:
                v[zlib.crc32(gram.encode()) % self.features] += weight
        return v

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("encode_text takes a sequence of prompts, not one string")
        bags = torch.stack([self.bag(p) for p in prompts]).to(self.proj)  # (N, F)
        return F.normalize(bags @ self.proj, dim=-1)  # (N, D)


# --------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, k: int, stride: int, dims: int = 2) -> nn.Sequential:
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return nn.Sequential(
        conv(cin, cout, k, stride=stride, padding=k // 2, bias=False), bn(cout), nn.ReLU()
    )


class ImageEncoder(nn.Module):
    """``(B, C, 32, 32)`` in [0, 1] -> ``(B, D)``: 4 conv-BN-ReLU stages 32->16->16->8->4,
    avg-pool. The first conv is strided: the glyphs are 8x8 sources upsampled, so nothing is
    lost at 16x16, and a full-resolution stage cost 2.5x the attack step time on 2 CPU cores.

    ``frames > 0`` takes video ``(B, T, C, 32, 32)`` and folds time into channels (T*C).
    """

    def __init__(self, channels: int, dim: int, width: int, frames: int = 0) -> None:
        super().__init__()
        self.frames = frames
        cin = channels * max(frames, 1)
        w = width
        self.net = nn.Sequential(
            _conv_bn(cin, w, 3, 2),  # 16x16
            _conv_bn(w, 2 * w, 3, 1),
            _conv_bn(2 * w, 4 * w, 3, 2),  # 8x8
            _conv_bn(4 * w, 8 * w, 3, 2),  # 4x4
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8 * w, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frames:
            x = x.flatten(1, 2)  # (B, T, C, H, W) -> (B, T*C, H, W)
        return self.net((x - 0.5) / 0.25)


class AudioEncoder(nn.Module):
    """``(B, L)`` waveform in [-1, 1] -> ``(B, D)``: strided 1-D conv filterbank + 3 stages."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            # L/8: a learned band-pass filterbank (33 taps = 4 ms); rectified, the band energies
            # need no finer rate (stride 4 cost 1.8x the attack step on 2 CPU cores)
            _conv_bn(1, 2 * w, 33, 8, dims=1),
            _conv_bn(2 * w, 4 * w, 9, 4, dims=1),  # L/32
            _conv_bn(4 * w, 8 * w, 5, 2, dims=1),  # L/64
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(8 * w, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, None] * 10.0)  # tones have amplitude ~0.1: bring them to ~1


class PointEncoder(nn.Module):
    """``(B, N, 3)`` -> ``(B, D)``: PointNet — shared per-point MLP, max-pool over points.

    Widths 2w-4w-8w: the per-point activations dominate an attack step (at 4w-4w-16w and 256
    points the point tower cost more than the six other towers together on 2 CPU cores)."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        w = width
        self.mlp = nn.Sequential(
            _conv_bn(3, 2 * w, 1, 1, dims=1),
            _conv_bn(2 * w, 4 * w, 1, 1, dims=1),
            _conv_bn(4 * w, 8 * w, 1, 1, dims=1),
        )
        self.head = nn.Sequential(
            nn.Linear(8 * w, 8 * w), nn.BatchNorm1d(8 * w), nn.ReLU(), nn.Linear(8 * w, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(1, keepdim=True)  # centre the cloud: translation is nuisance
        h = self.mlp(x.transpose(1, 2))  # (B, C, N): Conv1d k=1 is the shared MLP
        return self.head(h.amax(2))


def build_encoder(modality: str, config: MiniBindConfig) -> nn.Module:
    d, w = config.embed_dim, config.width
    if modality == "image":
        return ImageEncoder(3, d, w)
    if modality == "video":
        return ImageEncoder(3, d, w, frames=config.frames)
    if modality in ("depth", "thermal"):
        return ImageEncoder(1, d, w)
    if modality == "event":
        return ImageEncoder(2, d, w)
    if modality == "audio":
        return AudioEncoder(d, w)
    if modality == "point":
        return PointEncoder(d, w)
    raise ValueError(f"minibind has no encoder for modality {modality!r}")


# --------------------------------------------------------------------------------------------
# the backbone
# --------------------------------------------------------------------------------------------
class MiniBind(Backbone):
    """The embedded default backbone (see the module docstring)."""

    name = "minibind"

    def __init__(self, config: MiniBindConfig | None = None) -> None:
        config = config or MiniBindConfig()
        all_specs = specs(config.frames, config.audio_len, config.num_points, config.point_eps)
        super().__init__({m: all_specs[m] for m in config.modalities}, config.embed_dim)
        self.config = config
        self.encoders = nn.ModuleDict({m: build_encoder(m, config) for m in config.modalities})
        self.text = HashTextEncoder(
            config.embed_dim, config.text_features, config.text_seed, config.template_word_weight
        )
        self.freeze()

    def _encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return self._inference_encoder(modality, x)(x)

    def _inference_encoder(self, modality: str, x: torch.Tensor) -> nn.Module:
        """The frozen encoder with every BatchNorm folded into the conv/linear before it (an
        exact rewrite in eval mode, up to float rounding: ~1e-6): 1.1-1.36x faster forward +
        input-gradient backward on 2 CPU cores, and every attack step is one of those. Built
        once per device and dtype; the registered encoders (state_dict, checkpoints,
        pretraining) are untouched. Any change to them (``to``, ``load_state_dict``) drops
        the folded copies."""
        cache = self.__dict__.setdefault("_folded", {})
        key = (modality, x.device)  # a dtype change goes through _apply, which drops them
        if key not in cache:
            enc = fold_batchnorm(copy.deepcopy(self.encoders[modality]))
            cache[key] = enc.to(x.device).eval().requires_grad_(False)
        return cache[key]

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .double(): rebuild the copies
        self.__dict__.pop("_folded", None)
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_folded", None)
        return super().load_state_dict(*args, **kwargs)

    def transforms(self) -> dict[str, Any]:
        """Files -> the ``digits`` layouts of :func:`specs` (32 x 32 images, ``frames`` video
        frames, 8 kHz audio of ``audio_len`` samples, FPS points, ON/OFF event counts), so
        minibind runs on a folder of images, sounds, clips or clouds
        (:func:`advcal.data.transforms.minibind_transforms`)."""
        from advcal.data.transforms import minibind_transforms

        def dim(m: str, i: int, default: int) -> int:
            return self.spec(m).shape[i] if m in self.modalities else default

        return minibind_transforms(
            dim("image", -1, 32),
            frames=dim("video", 0, 4),
            audio_len=dim("audio", 0, 2048),
            num_points=dim("point", 0, 128),
            modalities=self.modalities,
        )

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text(prompts)

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write weights + config to one safetensors file, atomically (tmp + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "config": self.config.to_json()}
        from advcal import runfolder  # unique temp name, fsync, removed on any failure

        runfolder.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return path

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> MiniBind:
        """Read a file written by :meth:`save`; a clear ``ValueError`` for anything else."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"minibind checkpoint {path} does not exist")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises several types for a corrupt header
            raise ValueError(
                f"{path} is not a readable safetensors file ({err}); delete it to re-pretrain"
            ) from err
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(
                f"{path} is a safetensors file but not a minibind checkpoint "
                f"(format {meta.get('format')!r}, expected {FORMAT!r})"
            )
        model = cls(MiniBindConfig.from_json(meta["config"]))
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path}: weights do not match its config: {err}") from err
        return model.freeze()


# --------------------------------------------------------------------------------------------
# pretraining
# --------------------------------------------------------------------------------------------
@dataclass
class _History:
    loss: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


def pretrain(
    config: MiniBindConfig | None = None,
    dataset=None,  # MultiModalDataset; default: digits train split
    progress: bool = True,
) -> MiniBind:
    """Train every encoder of a fresh :class:`MiniBind` against the fixed text centers.

    Deterministic for a given config (fixed seeds, deterministic algorithms, one thread order).
    Loss per modality: ``CE(cos(enc(x + noise), C) / tau, y)``, noise sigma per sample
    ``~ U(0, config.sigma(m))``, input clamped back to its valid range. All modalities share
    the batch order (they are paired) and one AdamW optimiser with a cosine learning rate.
    """
    from advcal import progress as _progress

    config = config or MiniBindConfig()
    if dataset is None:
        from advcal.data.digits import digits

        dataset = digits("train", modalities=config.modalities, seed=config.data_seed)
    missing = [m for m in config.modalities if m not in dataset.inputs]
    if missing:
        raise ValueError(f"pretrain: dataset '{dataset.name}' lacks modalities {missing}")

    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(config.seed)
    try:
        model = MiniBind(config)
        centers = model.centers(dataset.class_names, dataset.templates or None)  # (K, D)
        encoders = model.encoders
        encoders.requires_grad_(True)
        nn.Module.train(encoders, True)  # Backbone.train() pins eval; BN must learn stats here
        opt = torch.optim.AdamW(
            encoders.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        g = torch.Generator().manual_seed(config.seed)
        n = len(dataset)
        steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
        )
        hist = _History({m: [] for m in config.modalities})
        t0 = time.perf_counter()
        bar = _progress.bar(
            total=config.epochs * steps_per_epoch,
            desc=f"pretraining minibind ({len(config.modalities)} modalities)",
            enabled=progress,
        )
        for _ in range(config.epochs):
            for idx in dataset.batches(config.batch_size, shuffle=True, generator=g):
                if len(idx) < 2:  # BatchNorm needs 2 samples
                    continue
                y = dataset.labels[idx]
                total = 0.0
                opt.zero_grad(set_to_none=True)
                for m in config.modalities:
                    x = _augment(dataset.inputs[m][idx], model.spec(m), config, m, g)
                    z = F.normalize(encoders[m](x), dim=-1)
                    loss = F.cross_entropy(z @ centers.T / config.tau, y)
                    loss.backward()
                    hist.loss[m].append(loss.item())
                    total += hist.loss[m][-1]
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{total / len(config.modalities):.3f}")
        bar.close()
        hist.seconds = time.perf_counter() - t0
    finally:
        torch.use_deterministic_algorithms(det)
    model.freeze()
    model.history = hist  # type: ignore[attr-defined]  # for probes; not in checkpoints
    return model


def _augment(
    x: torch.Tensor, spec: InputSpec, config: MiniBindConfig, m: str, g: torch.Generator
) -> torch.Tensor:
    """Geometric jitter, then ``x + s * N(0, 1)`` with ``s ~ U(0, sigma_m)`` per sample, clamped.

    Image-like ``(B, ..., 32, 32)``: integer shift of up to ``config.shift`` px per sample
    (border padding). Points ``(B, N, 3)``: rotation about z (+-0.15 rad), scale 0.9..1.1,
    offset +-0.05 per sample. Audio: noise only (the tones are stationary already).
    """
    b = x.shape[0]
    if config.shift and x.dim() >= 4:
        shape = x.shape
        flat = x.reshape(b, -1, *shape[-2:])  # (B, C', H, W); video folds T into C'
        h, w = shape[-2:]
        d = torch.randint(-config.shift, config.shift + 1, (b, 2), generator=g).float()
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2], theta[:, 1, 2] = 2 * d[:, 0] / w, 2 * d[:, 1] / h
        grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
        flat = F.grid_sample(flat, grid, mode="nearest", padding_mode="border", align_corners=False)
        x = flat.reshape(shape)
    elif config.shift and m == "point":
        rot = (torch.rand(b, generator=g) * 2 - 1) * 0.15
        c, s = torch.cos(rot)[:, None], torch.sin(rot)[:, None]
        x = torch.stack(
            [c * x[..., 0] - s * x[..., 1], s * x[..., 0] + c * x[..., 1], x[..., 2]], -1
        )
        x = x * (0.9 + 0.2 * torch.rand(b, 1, 1, generator=g))
        x = x + (torch.rand(b, 1, 3, generator=g) * 2 - 1) * 0.05
    sigma = config.sigma(m)
    if sigma <= 0:
        return x
    s = sigma * torch.rand((b,) + (1,) * (x.dim() - 1), generator=g)
    x = x + s * torch.randn(x.shape, generator=g)
    if spec.lo is not None or spec.hi is not None:
        x = x.clamp(spec.lo, spec.hi)
    return x


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("ADVCAL_CACHE") or Path.home() / ".cache" / "advcal")


def cache_path(config: MiniBindConfig) -> Path:
    return cache_dir() / f"minibind-{config.hash()}.safetensors"


def load(
    name: str = "minibind",
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    *,
    config: MiniBindConfig | Mapping | None = None,
    progress: bool = True,
    **overrides,
) -> MiniBind:
    """Registry entry point: a frozen :class:`MiniBind`.

    ``checkpoint`` given: read it. Otherwise use ``$ADVCAL_CACHE/minibind-<hash>.safetensors``
    for ``config`` (default :class:`MiniBindConfig`, fields overridable by keyword), pretraining
    and writing it first when absent (~2-3 min on 2 CPU cores, once per machine).
    """
    if name != "minibind":
        raise ValueError(f"advcal.backbones.minibind.load serves 'minibind', not {name!r}")
    if checkpoint is not None:
        if config is not None or overrides:
            raise ValueError("pass either checkpoint= or a config/overrides, not both")
        model = MiniBind.from_checkpoint(checkpoint)
    else:
        if isinstance(config, Mapping):
            config = MiniBindConfig(**config)
        config = config or MiniBindConfig()
        if overrides:
            from dataclasses import replace

            config = replace(config, **overrides)
        path = cache_path(config)
        if path.is_file():
            model = MiniBind.from_checkpoint(path)
        else:
            log.warning(
                "minibind: no cached weights at %s; pretraining once (deterministic, "
                "~2-3 min on CPU)",
                path,
            )
            t0 = time.perf_counter()
            model = pretrain(config, progress=progress)
            model.save(path)
            log.warning(
                "minibind: pretrained in %.0f s, cached at %s", time.perf_counter() - t0, path
            )
    if device is not None:
        model.to(device)
    return model.freeze()


__all__ = ["MiniBind", "MiniBindConfig", "cache_path", "load", "pretrain", "specs"]
