"""ImageBind: parity with the official outputs (fixtures), state-dict manifest, tokenizer,
Kaldi fbank against an independent numpy computation, checkpoint loading, attack smoke test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import fixtures_dir, load_parity_set, parity_params
from tolerances import FP32, PARITY_ATOL, assert_close_to_ref

from advcal import backbones
from advcal.backbones.audio import FbankConfig, KaldiFbank, NormalizedFbank
from advcal.backbones.clip_tokenizer import get_tokenizer, tokenize
from advcal.backbones.imagebind import (
    CheckpointError,
    ImageBind,
    ImageBindBackbone,
    ImageBindConfig,
    _load_state_dict_checked,
    build_model,
    imagebind_huge,
    imagebind_tiny,
    read_checkpoint,
)
from advcal.ops.pgd_step import pgd_step_

FIX = fixtures_dir()
needs_fixtures = pytest.mark.skipif(FIX is None, reason="fixture folder not found")


# fixture input name -> official modality it is fed under
FIXTURE_INPUTS = {
    "vision": "vision",
    "vision_video": "vision",
    "text": "text",
    "audio": "audio",
    "depth": "depth",
    "thermal": "thermal",
    "imu": "imu",
}


@pytest.fixture(scope="module", **parity_params("imagebind"))
def tiny_set(request):
    """(sidecar json, all fixture tensors, model loaded with the official params), per set."""
    meta, tensors = load_parity_set(request.param, "imagebind")
    params = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    model = build_model(meta["constructor_kwargs"], params)
    return meta, tensors, model


# -- parity ---------------------------------------------------------------------------------
@needs_fixtures
@pytest.mark.parametrize("name", list(FIXTURE_INPUTS))
def test_parity_with_official(tiny_set, name):
    meta, t, model = tiny_set
    x = t[f"in.{name}"]
    assert list(x.shape) == meta["inputs"][name]["shape"]
    with torch.no_grad():
        got = model.encode(FIXTURE_INPUTS[name], x, intermediates=True)
        official_call = model({FIXTURE_INPUTS[name]: x})[FIXTURE_INPUTS[name]]
    for key in ("out", "head", "trunk_tokens"):
        want = t[f"{key}.{name}"]
        assert got[key].shape == want.shape, key
        diff = (got[key] - want).abs().max().item()
        assert diff <= PARITY_ATOL, f"{key}.{name}: max |diff| = {diff:.3g}"
    torch.testing.assert_close(official_call, got["out"], rtol=0, atol=0)


@needs_fixtures
def test_config_accepts_official_kwargs(tiny_set):
    meta, _, model = tiny_set
    cfg = ImageBindConfig(**meta["constructor_kwargs"])
    assert cfg == model.config and cfg.kernel_size == tuple(
        meta["constructor_kwargs"]["kernel_size"]
    )
    with pytest.raises(TypeError, match="unknown ImageBindConfig arguments"):
        ImageBindConfig.from_kwargs({**meta["constructor_kwargs"], "vision_dim": 3})


@needs_fixtures
def test_huge_manifest_keys_and_shapes():
    manifest = json.loads((FIX / "imagebind_huge_keys.json").read_text())
    with torch.device("meta"):
        model = ImageBind(imagebind_huge())
    sd = model.state_dict()
    assert list(sd) == list(manifest["keys"])  # same names, same order
    for k, v in manifest["keys"].items():
        assert list(sd[k].shape) == v["shape"], k
        assert str(sd[k].dtype).removeprefix("torch.") == v["dtype"], k
    assert len(sd) == manifest["num_tensors"]
    assert sum(t.numel() for t in sd.values()) == manifest["num_elements"]


def test_model_is_frozen_and_eval():
    model = ImageBind(imagebind_tiny())
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training


# -- tokenizer ------------------------------------------------------------------------------
@needs_fixtures
def test_tokenizer_matches_fixture(tiny_set):
    meta = tiny_set[0]["text"]
    ids = tokenize(meta["strings"])
    assert ids.dtype == torch.long and ids.shape == (len(meta["strings"]), 77)
    assert ids.tolist() == meta["token_ids"]


def test_tokenizer_truncation_and_roundtrip():
    tok = get_tokenizer()
    assert (tok.sot_id, tok.eot_id, tok.vocab_size) == (49406, 49407, 49408)
    long = tokenize(["dog " * 100])[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long != 0).all()
    assert (long[1:-1] == long[1]).all()  # 75 "dog" tokens kept, then eot
    hard = tok(["dog " * 100], truncate="hard")[0]
    assert hard[-1] == long[1]  # Point-Bind's convention drops eot
    assert tok.decode(tok.encode("A photo of a café, 3 dogs!")) == "a photo of a café , 3 dogs !"


# -- fbank ----------------------------------------------------------------------------------
def _fbank_numpy(wave: np.ndarray, cfg: FbankConfig) -> np.ndarray:
    """Independent float64 Kaldi fbank, one frame at a time, straight from the recipe."""
    sr, n_mel = cfg.sample_rate, cfg.num_mel_bins
    win = int(sr * cfg.frame_length_ms / 1000)
    hop = int(sr * cfg.frame_shift_ms / 1000)
    nfft = 1
    while nfft < win:
        nfft *= 2
    i = np.arange(win)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * i / (win - 1))
    window = {"hanning": hann, "povey": hann**0.85}[cfg.window]

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    lo, hi = mel(cfg.low_freq), mel(sr / 2 + cfg.high_freq if cfg.high_freq <= 0 else cfg.high_freq)
    step = (hi - lo) / (n_mel + 1)
    banks = np.zeros((n_mel, nfft // 2 + 1))
    for m in range(n_mel):
        left, center, right = lo + m * step, lo + (m + 1) * step, lo + (m + 2) * step
        for k in range(nfft // 2):  # the Nyquist bin stays 0, as in Kaldi
            z = mel(k * sr / nfft)
            if left < z < right:
                banks[m, k] = (
                    (z - left) / (center - left) if z <= center else (right - z) / (right - center)
                )
    out = []
    for f in range(1 + (len(wave) - win) // hop):
        frame = wave[f * hop : f * hop + win].astype(np.float64)
        frame = frame - frame.mean()
        frame = np.append(frame[0] - 0.97 * frame[0], frame[1:] - 0.97 * frame[:-1])
        spec = np.fft.rfft(frame * window, n=nfft)
        energy = banks @ (spec.real**2 + spec.imag**2)
        out.append(np.log(np.maximum(energy, np.finfo(np.float32).eps)))
    return np.stack(out)


@pytest.mark.parametrize("window", ["hanning", "povey"])
def test_fbank_matches_numpy_reference(window):
    g = torch.Generator().manual_seed(3)
    wave = (torch.rand(2, 4003, generator=g) - 0.5) * torch.tensor([[0.9], [0.05]])
    cfg = FbankConfig(num_mel_bins=40, window=window)
    got = KaldiFbank(cfg)(wave)
    assert got.shape == (2, cfg.num_frames(4003), 40)
    for row in range(2):
        want = _fbank_numpy(wave[row].double().numpy(), cfg)
        torch.testing.assert_close(got[row].double(), torch.from_numpy(want), **FP32)


def test_normalized_fbank_layout_and_gradients():
    nf = NormalizedFbank(num_mel_bins=128, target_length=204, mean=-4.268, std=9.138)
    wave = (torch.rand(2, 32000) - 0.5).requires_grad_(True)
    feats = nf(wave)
    assert feats.shape == (2, 128, 204)  # 198 frames of 2 s, zero-padded to 204
    pad_value = (0.0 - -4.268) / 9.138
    torch.testing.assert_close(feats[:, :, 198:], torch.full((2, 128, 6), pad_value))
    raw = KaldiFbank(FbankConfig())(wave.detach() - wave.detach().mean(-1, keepdim=True))
    torch.testing.assert_close(feats[:, :, :198], ((raw + 4.268) / 9.138).transpose(1, 2))
    feats.sum().backward()
    assert torch.isfinite(wave.grad).all() and wave.grad.abs().sum() > 0
    silent = torch.zeros(1, 32000, requires_grad=True)  # every energy at the log floor
    nf(silent).sum().backward()
    assert torch.isfinite(silent.grad).all()


# -- the Backbone API -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    return backbones.load("imagebind_huge", random_init=True, config=imagebind_tiny())


def test_backbone_specs_and_preprocessing(tiny_backbone):
    bb = tiny_backbone
    c = bb.config
    S = c.image_size
    assert {"image", "video", "audio", "audio_fbank", "depth", "thermal"} <= set(bb.modalities)
    assert bb.spec("audio_fbank").lo is None and bb.spec("audio").lo == -1.0
    img = torch.rand(2, 3, S, S)
    mean, std = (
        torch.tensor([0.48145466, 0.4578275, 0.40821073]),
        torch.tensor([0.26862954, 0.26130258, 0.27577711]),
    )
    with torch.no_grad():
        z = bb.encode("image", img)
        ref = bb.model.encode("vision", (img - mean[:, None, None]) / std[:, None, None])
        torch.testing.assert_close(z, ref)
        assert torch.allclose(z.norm(dim=-1), torch.ones(2), atol=1e-5)
        # video: 4 frames time-first = 2 clips of 2 frames; each clip of one repeated image
        # equals that image (the stem repeats a single frame to video_frames)
        vid = torch.stack([img, img, img.flip(-1), img.flip(-1)], 1)  # (2, 4, 3, S, S)
        zv = bb.encode("video", vid)
        zi = (z + bb.encode("image", img.flip(-1))) / 2
        torch.testing.assert_close(zv, zi, rtol=1e-5, atol=1e-5)
        # audio waveform path == fbank path on the same clips
        wave = torch.rand(2, 40000) * 2 - 1
        za = bb.encode("audio", wave)
        starts = bb.audio_clip_starts(40000)
        assert starts == [0, 4000, 8000]
        clips = torch.stack([wave[:, s : s + 32000] for s in starts], 1)
        zf = bb.encode("audio_fbank", bb.fbank(clips).unsqueeze(2))
        torch.testing.assert_close(za, zf)
        assert 0 < za.norm(dim=-1).max() <= 20 + 1e-4
        for m, scale in (("depth", 5.0), ("thermal", 10.0)):
            zm = bb.encode(m, torch.rand(2, 1, S, S))
            torch.testing.assert_close(zm.norm(dim=-1), torch.full((2,), scale))
        zt = bb.encode_text(["a dog", "a cat"])
        torch.testing.assert_close(zt.norm(dim=-1), torch.full((2,), 1 / 0.07))
        cents = bb.centers(["dog", "cat", "bird"])
        assert cents.shape == (3, c.out_embed_dim)
    with pytest.raises(ValueError, match="multiple of video_frames"):
        bb.encode("video", torch.rand(1, 3, 3, S, S))


def test_pgd_step_through_tiny_model(tiny_backbone):
    bb = tiny_backbone
    S = bb.config.image_size
    x0 = torch.rand(3, 3, S, S)
    centers = torch.nn.functional.normalize(torch.randn(4, bb.embed_dim), dim=-1)
    y = torch.tensor([0, 1, 2])
    spec = bb.spec("image")
    x = x0.clone()
    for _ in range(2):
        x.requires_grad_(True)
        z = torch.nn.functional.normalize(bb.encode("image", x, check=False), dim=-1)
        loss = torch.nn.functional.cross_entropy(z @ centers.t() / 0.07, y)
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        x = x.detach()
        pgd_step_(x, g, x0, alpha=spec.eps / 4, eps=spec.eps, lo=spec.lo, hi=spec.hi)
    assert (x - x0).abs().max() <= spec.eps + 1e-7 and x.min() >= 0 and x.max() <= 1
    assert not any(p.grad is not None for p in bb.parameters())
    wave = (torch.rand(1, 8000) * 2 - 1).requires_grad_(True)  # waveform attack path
    (gw,) = torch.autograd.grad(bb.encode("audio", wave).sum(), wave)
    assert torch.isfinite(gw).all() and gw.abs().sum() > 0


def test_bf16_autocast_and_sdpa_vs_math(tiny_backbone):
    bb = tiny_backbone
    S = bb.config.image_size
    x = torch.rand(2, 3, S, S)
    with torch.no_grad():
        ref = bb.encode("image", x)
        bb.model.set_attention_impl("math")
        try:
            math_out = bb.encode("image", x)
        finally:
            bb.model.set_attention_impl("sdpa")
        torch.testing.assert_close(math_out, ref, **FP32)
        # STYLE rule 7: our bf16 path (SDPA under autocast) against fp32 may err at most
        # LOWP_FACTOR x what plain eager PyTorch errs at bf16: the same weights through the
        # unfused softmax(QK^T)V composition under the same autocast (the textbook path).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = bb.encode("image", x)
            bb.model.set_attention_impl("math")
            try:
                plain_low = bb.encode("image", x)
            finally:
                bb.model.set_attention_impl("sdpa")
    assert low.dtype == plain_low.dtype and torch.isfinite(low).all()
    assert (plain_low.float() - ref).abs().max() > 0  # bf16 really ran (else a vacuous check)
    assert_close_to_ref(low, ref, plain_low)


def test_centers_are_the_template_ensemble(tiny_backbone):
    """centers(K classes, T templates) == normalise(mean_t normalise(text(template_t(k)))),
    by hand one prompt at a time; chunked encoding (chunk 4, not dividing K*T = 6) included."""
    bb = tiny_backbone
    classes, templates = ["dog", "sea horse"], ["a photo of a {}.", "{}", "a {} in the rain"]
    got = bb.centers(classes, templates, chunk_size=4)
    with torch.no_grad():
        want = torch.stack(
            [
                torch.nn.functional.normalize(
                    torch.stack(
                        [
                            torch.nn.functional.normalize(bb.encode_text([tp.format(c)])[0], dim=0)
                            for tp in templates
                        ]
                    ).mean(0),
                    dim=0,
                )
                for c in classes
            ]
        )
    torch.testing.assert_close(got, want, **FP32)
    assert got.shape == (len(classes), bb.embed_dim)
    assert (got - bb.centers(classes, templates[:1])).abs().max() > 1e-3  # templates matter
    # chunking changes only matmul blocking (fp32 rounding), not the math
    torch.testing.assert_close(
        bb.centers(classes, templates, chunk_size=1), bb.centers(classes, templates), **FP32
    )
    with pytest.raises(ValueError, match="chunk_size"):
        bb.centers(classes, templates, chunk_size=0)


def test_compiles_fullgraph(tiny_backbone):
    bb = tiny_backbone
    S = bb.config.image_size
    x = torch.rand(2, 3, S, S, requires_grad=True)
    f = torch.compile(
        lambda t: bb.encode("image", t, check=False), fullgraph=True, backend="aot_eager"
    )
    out = f(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, bb.encode("image", x), **FP32)
    assert torch.isfinite(g).all()


# -- checkpoints ----------------------------------------------------------------------------
def test_checkpoint_roundtrip_and_errors(tmp_path):
    torch.manual_seed(1)
    cfg = imagebind_tiny()
    src = ImageBind(cfg)
    sd = src.state_dict()
    pth, st = tmp_path / "tiny.pth", tmp_path / "tiny.safetensors"
    torch.save(sd, pth)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        want = ImageBindBackbone(src).encode("image", x)
        for path, conf in ((pth, cfg), (st, cfg.to_kwargs())):
            bb = backbones.load("imagebind_huge", checkpoint=path, config=conf)
            torch.testing.assert_close(bb.encode("image", x), want, rtol=0, atol=0)
            assert not any(p.requires_grad for p in bb.parameters())
    single = tmp_path / "single"
    single.mkdir()
    st.rename(single / st.name)  # a directory holding one checkpoint file works too
    bb = backbones.load("imagebind_huge", checkpoint=single, config=cfg)
    torch.testing.assert_close(bb.encode("image", x), want, rtol=0, atol=0)
    # a wrapped dict is unwrapped
    torch.save({"model": sd}, tmp_path / "wrapped.pt")
    assert set(read_checkpoint(tmp_path / "wrapped.pt")) == set(sd)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        backbones.load("imagebind_huge", checkpoint=truncated, config=cfg)
    foreign = tmp_path / "foreign.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), foreign)
    with pytest.raises(CheckpointError, match=r"missing keys.*unexpected keys: bias, weight"):
        backbones.load("imagebind_huge", checkpoint=foreign, config=cfg)
    with pytest.raises(CheckpointError, match="shape mismatches"):  # tiny file, huge config
        _load_state_dict_checked(ImageBind(imagebind_tiny(out_embed_dim=8)), sd)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        backbones.load("imagebind_huge", checkpoint=tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="needs checkpoint"):
        backbones.load("imagebind_huge")


def test_huge_config_is_the_default_and_sizes():
    cfg = imagebind_huge()
    assert (cfg.vision_embed_dim, cfg.vision_num_blocks, cfg.out_embed_dim) == (1280, 32, 1024)
    assert cfg.vision_tokens == 257 and math.prod(cfg.audio_grid) == 228
    assert cfg.map_tokens(cfg.depth_kernel_size) == 197 and cfg.imu_tokens == 251
