"""Differentiable Kaldi-compatible log-mel filterbank ("fbank") in plain PyTorch.

ImageBind and LanguageBind turn 16 kHz audio into Kaldi fbank features upstream with
``torchaudio.compliance.kaldi.fbank`` *outside* the model, so an attack on the model input
would perturb spectrograms, not sounds. This module recomputes the same features inside the
backbone, batched and differentiable w.r.t. the waveform, without torchaudio.

The steps are Kaldi's (``compute-fbank-feats``), written from its documentation:

1. frames of ``frame_length_ms`` every ``frame_shift_ms`` ("snip edges": only whole frames),
2. per-frame DC removal, pre-emphasis ``x[n] - k x[n-1]`` (``x[-1] := x[0]``),
3. a window (``hanning`` as ImageBind/LanguageBind pass; Kaldi's default is ``povey``),
4. zero-pad to the next power of two, power spectrum ``|rfft|^2``,
5. triangular mel filters on Kaldi's mel scale ``1127 ln(1 + f/700)`` between ``low_freq`` and
   ``high_freq`` (``<= 0`` means relative to Nyquist),
6. ``log(max(energy, float32 eps))``.

Dither is off (deterministic, and an attack needs a fixed map); no energy coefficient
(``use_energy=False``, so ``htk_compat`` changes nothing).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_WINDOWS = ("hanning", "povey", "hamming", "rectangular")


def kaldi_mel_scale(freq: torch.Tensor | float) -> torch.Tensor | float:
    """Kaldi's mel scale: ``1127 * ln(1 + f / 700)``."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


def kaldi_window(kind: str, size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The symmetric analysis windows Kaldi offers, shape ``(size,)``."""
    n = torch.arange(size, dtype=dtype)
    a = 2 * math.pi / (size - 1)
    if kind == "hanning":
        return 0.5 - 0.5 * torch.cos(a * n)
    if kind == "povey":  # a Hann window raised to 0.85
        return (0.5 - 0.5 * torch.cos(a * n)).pow(0.85)
    if kind == "hamming":
        return 0.54 - 0.46 * torch.cos(a * n)
    if kind == "rectangular":
        return torch.ones(size, dtype=dtype)
    raise ValueError(f"window must be one of {_WINDOWS}, got {kind!r}")


def kaldi_mel_banks(
    num_bins: int, padded_window_size: int, sample_rate: float, low_freq: float, high_freq: float
) -> torch.Tensor:
    """Triangular mel filters, ``(num_fft_bins + 1, num_bins)`` (last FFT bin always 0).

    Filter ``b`` rises linearly in mel from ``mel_low + b*d`` to ``mel_low + (b+1)*d`` and
    falls to ``mel_low + (b+2)*d``, ``d = (mel_high - mel_low) / (num_bins + 1)``; FFT bin
    ``i`` sits at frequency ``i * sample_rate / padded_window_size``.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(
            f"need 0 <= low_freq < high_freq <= Nyquist ({nyquist}); got {low_freq}, {high_freq}"
        )
    num_fft_bins = padded_window_size // 2
    mel_low, mel_high = kaldi_mel_scale(low_freq), kaldi_mel_scale(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    freqs = torch.arange(num_fft_bins, dtype=torch.float64) * (sample_rate / padded_window_size)
    mel = kaldi_mel_scale(freqs).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # (num_bins, num_fft_bins)
    return F.pad(banks, (0, 1)).t().contiguous()  # Nyquist bin gets weight 0


@dataclass(frozen=True)
class FbankConfig:
    """Parameters of :class:`KaldiFbank` (Kaldi option names, ms and Hz)."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window: str = "hanning"
    preemphasis: float = 0.97
    remove_dc_offset: bool = True
    low_freq: float = 20.0
    high_freq: float = 0.0
    round_to_power_of_two: bool = True

    def __post_init__(self) -> None:
        if self.window not in _WINDOWS:
            raise ValueError(f"FbankConfig.window must be one of {_WINDOWS}, got {self.window!r}")
        if self.sample_rate <= 0 or self.num_mel_bins <= 0:
            raise ValueError("FbankConfig.sample_rate and num_mel_bins must be > 0")
        if self.frame_shift_ms <= 0 or self.frame_length_ms < self.frame_shift_ms:
            raise ValueError("FbankConfig needs 0 < frame_shift_ms <= frame_length_ms")

    @property
    def window_size(self) -> int:  # samples per frame (Kaldi truncates)
        return int(self.sample_rate * self.frame_length_ms * 0.001)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms * 0.001)

    @property
    def padded_window_size(self) -> int:
        n = self.window_size
        return 1 << (n - 1).bit_length() if self.round_to_power_of_two else n

    def num_frames(self, num_samples: int) -> int:
        if num_samples < self.window_size:
            return 0
        return 1 + (num_samples - self.window_size) // self.window_shift


class KaldiFbank(nn.Module):
    """Waveforms ``(..., T)`` -> log-mel features ``(..., frames, num_mel_bins)``.

    Differentiable w.r.t. the waveform: the power spectrum is ``re^2 + im^2`` (no ``abs``, whose
    gradient is NaN at 0) and the log floor is a clamp. Runs in float32 even under autocast:
    the log of bf16 mel energies would lose ~3 significant digits for no speed gain.
    """

    def __init__(self, config: FbankConfig | None = None) -> None:
        super().__init__()
        self.config = config or FbankConfig()
        c = self.config
        # (window_size,) and (padded//2 + 1, num_mel_bins); derived, so not in state_dict.
        self.register_buffer(
            "window", kaldi_window(c.window, c.window_size).float(), persistent=False
        )
        banks = kaldi_mel_banks(
            c.num_mel_bins, c.padded_window_size, c.sample_rate, c.low_freq, c.high_freq
        )
        self.register_buffer("mel_banks", banks.float(), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        c = self.config
        if waveform.shape[-1] < c.window_size:
            raise ValueError(
                f"waveform has {waveform.shape[-1]} samples, fewer than one frame "
                f"({c.window_size} at {c.sample_rate} Hz)"
            )
        dev = waveform.device.type
        ctx = torch.autocast(dev, enabled=False) if dev in ("cuda", "cpu") else None
        with ctx or contextlib.nullcontext():
            x = waveform.float()
            frames = x.unfold(-1, c.window_size, c.window_shift)  # (..., m, window_size)
            if c.remove_dc_offset:
                frames = frames - frames.mean(dim=-1, keepdim=True)
            if c.preemphasis != 0.0:
                prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
                frames = frames - c.preemphasis * prev
            frames = frames * self.window
            spec = torch.fft.rfft(frames, n=c.padded_window_size, dim=-1)  # (..., m, P/2+1)
            power = torch.view_as_real(spec).pow(2).sum(-1)
            mel = power @ self.mel_banks  # (..., m, num_mel_bins)
            return torch.clamp(mel, min=torch.finfo(torch.float32).eps).log()


class NormalizedFbank(nn.Module):
    """The Bind-model audio front end: clip waveforms -> normalised fbank "images".

    ``(..., T)`` waveform in [-1, 1] -> ``(..., num_mel_bins, target_length)``:
    subtract the clip mean (upstream ``waveform -= waveform.mean()``), Kaldi fbank, transpose
    to (mel, frames), zero-pad or crop the frames to ``target_length`` (padding happens in
    log-mel units, before normalisation, as upstream), then ``(x - mean) / std``.

    ImageBind: ``num_mel_bins=128, target_length=204, mean=-4.268, std=9.138``.
    LanguageBind: ``mean=-4.2677393, std=2 * 4.5689974`` with its own sizes.
    """

    def __init__(
        self,
        num_mel_bins: int = 128,
        target_length: int = 204,
        mean: float = -4.268,
        std: float = 9.138,
        *,
        sample_rate: int = 16000,
        window: str = "hanning",
    ) -> None:
        super().__init__()
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        if target_length <= 0:
            raise ValueError(f"target_length must be > 0, got {target_length}")
        self.fbank = KaldiFbank(
            FbankConfig(sample_rate=sample_rate, num_mel_bins=num_mel_bins, window=window)
        )
        self.target_length = int(target_length)
        self.mean, self.std = float(mean), float(std)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = waveform.float()
        x = x - x.mean(dim=-1, keepdim=True)
        feats = self.fbank(x).transpose(-1, -2)  # (..., mel, frames)
        p = self.target_length - feats.shape[-1]
        feats = F.pad(feats, (0, p)) if p > 0 else feats[..., : self.target_length]
        return (feats - self.mean) / self.std


__all__ = [
    "FbankConfig",
    "KaldiFbank",
    "NormalizedFbank",
    "kaldi_mel_banks",
    "kaldi_mel_scale",
    "kaldi_window",
]
