"""Each transform's output against values computed from the official recipes' constants
(DATA.md §1): torchvision's Resize/CenterCrop by hand with PIL, pytorchvideo's clip-sampler
start times and ShortSideScale/uniform crops, ImageBind's audio clips for a 5 s ESC-50 clip,
LanguageBind's repeat-tiling, Point-Bind's FPS + pc_normalize, EventBind's renderer; and the
backbones' ``transforms()`` giving inputs their specs accept."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advcal.data import miniature as M
from advcal.data.decode import Audio, Depth, Events, decode_audio, decode_image, open_video
from advcal.data.transforms import (
    DepthTransform,
    EventTransform,
    ImageTransform,
    PointTransform,
    VideoTransform,
    WaveformTransform,
    clip_starts,
    event_counts,
    imagebind_transforms,
    languagebind_transforms,
    pc_normalize,
    render_eventbind,
    unibind_transforms,
)

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("soundfile")
pytest.importorskip("soxr")
pytest.importorskip("av")


# ------------------------------------------------------------------------------ images


def test_image_resize_crop_matches_torchvision_rule_by_hand(tmp_path):
    """A 40 x 56 JPEG through ImageBind's Resize(224, bicubic) + CenterCrop(224): shorter
    side 224, longer int(224 * 56 / 40) = 313; crop left round((313 - 224) / 2) = 44."""
    path = M.write_image(tmp_path / "a.jpg", 3, 40, 56)
    img = decode_image(path)
    x = ImageTransform(224)(img)
    ref = img.convert("RGB").resize((313, 224), Image.BICUBIC).crop((44, 0, 268, 224))
    want = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 255
    assert x.shape == (3, 224, 224) and torch.equal(x, want)
    # a tall image: the other side, crop top = round((int(224 * 56 / 40) - 224) / 2)
    tall = Image.fromarray(M.image_array(4, 56, 40))
    y = ImageTransform(224)(tall)
    ref = tall.resize((224, 313), Image.BICUBIC).crop((0, 44, 224, 268))
    assert torch.equal(y, torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1) / 255)


def test_grey_and_tensor_backend_and_crop_ratio():
    img = Image.fromarray(M.image_array(5, 30, 50))
    g = ImageTransform(24, mode="L")(img)
    ref = img.convert("L").resize((40, 24), Image.BICUBIC).crop((8, 0, 32, 24))
    assert g.shape == (1, 24, 24) and torch.equal(
        g[0], torch.from_numpy(np.asarray(ref).copy()) / 255
    )
    # RobustBench Res256Crop224 proportions on a small scale: Resize(32) -> crop 28
    r = ImageTransform(32, 28, interpolation="bilinear")(img)
    ref = img.resize((53, 32), Image.BILINEAR).crop((12, 2, 40, 30))  # round(12.5) = 12
    assert torch.equal(r, torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1) / 255)
    # LanguageBind's HF path: ToTensor, then tensor bicubic resize (no antialias), clamp
    t = ImageTransform(24, backend="tensor")(img)
    raw = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    want = F.interpolate(raw[None], size=(24, 40), mode="bicubic", align_corners=False)[0]
    assert torch.allclose(t, want[:, :, 8:32].clamp(0, 1), atol=1e-6)


# ------------------------------------------------------------------------------ depth


def test_depth_metres_and_disparity():
    d = np.full((8, 12), 2.0, np.float32)
    d[0, 0] = 0.0  # no reading
    d[7, 11] = 30.0  # beyond LanguageBind's 10 m clip
    m = DepthTransform(8, output="metres")(Depth(d))
    assert m.shape == (1, 8, 8)
    # same size: no resize; crop columns round((12 - 8) / 2) = 2..10; DepthNorm clip [0.01, 10]
    assert m[0, 0, 0] == pytest.approx(2.0) and float(m.max()) <= 10.0
    full = DepthTransform(8, 12, output="metres")
    with pytest.raises(ValueError, match="crop"):
        full(Depth(d))
    disp = DepthTransform(8, output="disparity")(Depth(d))
    fb = 518.857901 * 0.075
    expect = np.where(d > 0, fb / np.maximum(d, 1e-6), 0.0)
    expect = (expect / expect.max())[:, 2:10]
    assert torch.allclose(disp[0], torch.from_numpy(expect).float(), atol=1e-6)


# ------------------------------------------------------------------------------ audio


def test_clip_sampler_starts_for_a_5s_esc50_clip():
    """pytorchvideo ConstantClipsPerVideoSampler: k * max(D - clip, 0) / clips; for ESC-50's
    5 s and ImageBind's 3 clips of 2 s: [0, 1, 2] s (the last second is never seen)."""
    assert clip_starts(Fraction(5), Fraction(2), 3) == [0, 1, 2]
    assert clip_starts(Fraction(1), Fraction(2), 3) == [0, 0, 0]
    assert clip_starts(Fraction(12), Fraction(2), 5) == [0, 2, 4, 6, 8]


def test_imagebind_audio_window_gives_the_official_clip_starts(tmp_path):
    """A 5 s, 44.1 kHz ESC-50 clip -> 16 kHz (80000 samples) -> cut at the end of the last
    official clip (2 + 2 s = 64000 samples); ImageBind's backbone then cuts its 3 clips at
    exactly the official starts 0, 16000, 32000."""
    from advcal.backbones.imagebind import ImageBindBackbone, build_model, imagebind_tiny

    wav = decode_audio(M.write_wav(tmp_path / "1-100032-A-0.wav", 1, 5.0, 44100))
    assert wav.sample_rate == 44100 and wav.samples.shape == (1, 220500)
    x = imagebind_transforms()["audio"](wav)
    assert x.shape == (64000,) and x.abs().max() <= 1
    bb = ImageBindBackbone(build_model(imagebind_tiny()))
    official = [int(s * 16000) for s in clip_starts(Fraction(5), Fraction(2), 3)]
    assert bb.audio_clip_starts(x.shape[0]) == official == [0, 16000, 32000]
    # unwindowed, the backbone's own evenly spaced starts would be 0, 24000, 48000
    assert bb.audio_clip_starts(80000) == [0, 24000, 48000]
    # a length whose (n - clip) is not a multiple of 3: within clips - 1 samples
    t = WaveformTransform(16000, clip_window=(2.0, 3))
    n = 80002
    got = bb.audio_clip_starts(t.window_samples(n))
    want = [math.floor(k * Fraction(n - 32000, 3)) for k in range(3)]
    assert all(abs(a - b) <= 2 for a, b in zip(got, want, strict=True))
    # a clip shorter than 2 s is one clip, whole
    assert t.window_samples(20000) == 20000


def test_resampling_and_channel_zero():
    rate, n = 44100, 44100
    t = np.arange(n) / rate
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.ones(n)]).astype(np.float32)
    x = WaveformTransform(16000)(Audio(stereo, rate))
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert x.shape == (16000,)
    assert np.abs(x.numpy()[200:-200] - ref[200:-200]).max() < 2e-3  # soxr vs the true sine
    with pytest.raises(ValueError, match="channel 2"):
        WaveformTransform(16000, channel=2)(Audio(stereo, rate))


def test_languagebind_repeat_tiling():
    """``waveform2melspec``: shorter than target_length * 160 -> int(max_len / n) whole copies,
    then zeros. ESC-50's 5 s at 16 kHz against the released 1036 frames: 2 copies + 5760 zeros."""
    max_len = 1036 * 16000 // 100
    assert max_len == 165760
    w = np.random.default_rng(0).uniform(-0.5, 0.5, (1, 80000)).astype(np.float32)
    x = languagebind_transforms(audio_samples=max_len)["audio"](Audio(w, 16000))
    want = np.concatenate([w[0], w[0], np.zeros(5760, np.float32)])
    assert x.shape == (max_len,) and np.array_equal(x.numpy(), want)
    short = WaveformTransform(16000, 7, fit="tile")(Audio(np.ones((1, 3), np.float32), 16000))
    assert short.tolist() == [1, 1, 1, 1, 1, 1, 0]
    long = WaveformTransform(16000, 4)(Audio(np.arange(6, dtype=np.float32)[None] / 10, 16000))
    assert long.tolist() == pytest.approx([0, 0.1, 0.2, 0.3])


# ------------------------------------------------------------------------------ video


@pytest.fixture(scope="module")
def video5s(tmp_path_factory):
    """30 frames at 6 fps (5 s), 48 x 64."""
    return open_video(M.write_video(tmp_path_factory.mktemp("v") / "v.mp4", 0, 30, 6, 48, 64))


def test_uniform_sampler_and_short_side_scale(video5s):
    """LanguageBind: linspace(0, n - 1, 8).astype(int) frames; ShortSideScale(224) of a
    48 x 64 frame: 224 x floor(64 / 48 * 224) = 224 x 298; centre crop left round(74 / 2)."""
    t = VideoTransform(224, sampler="uniform", num_frames=8)
    assert video5s.num_frames == 30 and video5s.duration == pytest.approx(5.0)
    idx = t.frame_indices(video5s)[0]
    assert idx == np.linspace(0, 29, 8).astype(int).tolist() == [0, 4, 8, 12, 16, 20, 24, 29]
    x = t(video5s)
    raw = torch.from_numpy(video5s.frames(idx)).permute(0, 3, 1, 2).float() / 255
    scaled = F.interpolate(raw, size=(224, 298), mode="bilinear", align_corners=False)
    assert x.shape == (8, 3, 224, 224) and torch.allclose(x, scaled[..., 37:261], atol=1e-6)


def test_imagebind_clip_sampler_frames_and_three_crops(video5s):
    """5 clips of 2 s at k * (5 - 2) / 5 s: [0, .6, 1.2, 1.8, 2.4]; each clip's frames are
    those with t in [s, s + 2), subsampled to the first and last; 3 crops of the 224 x 298
    frame at x = 0, ceil(74 / 2) = 37, 74 -> (5 clips x 3 crops x 2 frames, 3, 224, 224)."""
    t = imagebind_transforms()["video"]
    groups = t.frame_indices(video5s)
    assert groups == [[0, 11], [4, 15], [8, 19], [11, 22], [15, 26]]
    x = t(video5s)
    assert x.shape == (30, 3, 224, 224)
    raw = torch.from_numpy(video5s.frames([4, 15])).permute(0, 3, 1, 2).float() / 255
    scaled = F.interpolate(raw, size=(224, 298), mode="bilinear", align_corners=False)
    clip1 = x[6:12]  # clip 1: crops 0, 1, 2, two frames each
    for j, x0 in enumerate((0, 37, 74)):
        assert torch.allclose(clip1[2 * j : 2 * j + 2], scaled[..., x0 : x0 + 224], atol=1e-6)


# ------------------------------------------------------------------------------ points


def test_pc_normalize_and_fps():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(500, 6, generator=g) * 3 + 2
    y = PointTransform(64)(pts.numpy())
    assert y.shape == (64, 3)
    assert y.mean(0).abs().max() < 1e-5 and float(y.norm(dim=1).max()) == pytest.approx(1.0)
    # FPS by hand: start at 0, then the farthest from the picked set each step
    xyz = pts[:, :3]
    picked, dist = [0], torch.full((500,), float("inf"))
    for _ in range(63):
        dist = torch.minimum(dist, ((xyz - xyz[picked[-1]]) ** 2).sum(-1))
        picked.append(int(dist.argmax()))
    sub = xyz[picked]
    c = sub - sub.mean(0)
    assert torch.allclose(y, c / c.norm(dim=1).max(), atol=1e-6)
    assert torch.allclose(pc_normalize(xyz).norm(dim=1).max(), torch.tensor(1.0))
    first = PointTransform(10, "first", normalize=False)(pts.numpy())
    assert torch.equal(first, xyz[:10])
    few = PointTransform(7, normalize=False)(pts[:3].numpy())
    assert torch.equal(few, xyz[[0, 1, 2, 0, 1, 2, 0]])


# ------------------------------------------------------------------------------ events


def test_eventbind_render_and_counts():
    ev = Events(
        np.array([0, 1, 2, 2]), np.array([0, 0, 0, 0]), np.zeros(4), np.array([1, 0, 1, 0]), 2, 4
    )
    c = event_counts(ev)
    assert c[0].tolist() == [[1, 0, 1, 0], [0, 0, 0, 0]] and c[1].tolist() == [
        [0, 1, 1, 0],
        [0] * 4,
    ]
    rgb = render_eventbind(c)
    # 1 - (pos * [0, 255, 255] + neg * [255, 255, 0]) / 255, clipped
    assert rgb[:, 0, 0].tolist() == [1, 0, 0]  # ON: red
    assert rgb[:, 0, 1].tolist() == [0, 0, 1]  # OFF: blue
    assert rgb[:, 0, 2].tolist() == [0, 0, 0]  # both: black
    assert rgb[:, 0, 3].tolist() == [1, 1, 1]  # none: white
    frame = EventTransform(2, layout="eventbind")(ev)
    assert frame.shape == (3, 2, 2) and frame.min() >= 0 and frame.max() <= 1
    counts = EventTransform(2, layout="counts")(ev)
    assert counts.shape == (2, 2, 2) and float(counts.max()) == 1.0


# ------------------------------------------------------------------------------ backbones


def test_backbone_transforms_fit_their_specs(tmp_path):
    """minibind and a tiny ImageBind: every transform's output passes the backbone's own
    input check and encodes; load_with_transforms returns the same set."""
    from advcal.backbones import load_with_transforms
    from advcal.backbones.minibind import MiniBind

    files = {
        "image": decode_image(M.write_image(tmp_path / "i.jpg", 0, 30, 45)),
        "thermal": decode_image(M.write_image(tmp_path / "t.jpg", 1, 30, 45, "L")),
        "audio": decode_audio(M.write_wav(tmp_path / "a.wav", 2, 3.0, 22050, channels=2)),
        "video": open_video(M.write_video(tmp_path / "v.mp4", 3, 14, 5)),
        "point": M.cloud(4, 300),
        "depth": Depth(np.random.default_rng(5).uniform(0.5, 4, (30, 40)).astype(np.float32)),
        "event": Events(*(np.asarray(v) for v in M.events(6).values()), None, None),
    }
    mb = MiniBind()
    tr = mb.transforms()
    assert set(tr) == set(mb.modalities)
    for m, f in tr.items():
        x = f(files[m])
        mb.spec(m).check_input(x[None], "x", m)
        assert mb.encode(m, x[None]).shape == (1, mb.embed_dim)
    from advcal.backbones.imagebind import imagebind_tiny

    ib, tib = load_with_transforms("imagebind_huge", random_init=True, config=imagebind_tiny())
    assert set(tib) == {"image", "video", "audio", "depth", "thermal"}
    for m, f in tib.items():
        x = f(files[m])
        ib.spec(m).check_input(x[None], "x", m)
    assert tib["video"](files["video"]).shape == (30, 3, 32, 32)
    assert ib.encode("video", tib["video"](files["video"])[None]).shape == (1, 24)
    # 3 s at 22.05 kHz -> 48000 at 16 kHz -> cut to 2 + 2 * (16000 // 3) samples
    assert tib["audio"](files["audio"]).shape == (32000 + 2 * (16000 // 3),)


def test_unibind_and_languagebind_sets():
    u = unibind_transforms()
    assert set(u) == {"image", "video", "audio", "thermal", "event", "point"}
    assert u["point"] == PointTransform(8192, "fps", True)
    lb = languagebind_transforms(audio_samples=1036 * 160)
    assert lb["video"].num_frames == 8 and lb["audio"].fit == "tile"
    assert lb["depth"].output == "metres" and lb["depth"].max_depth == 10.0
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(10, 20)
