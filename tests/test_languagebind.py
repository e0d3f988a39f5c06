"""LanguageBind: parity with the official towers (languagebind_tiny_A), key manifests of the
released geometry, checkpoint loading through the real loader (plain and LoRA), PGD through
every tower."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_stems, fixtures_dir, load_parity_set, parity_params
from tolerances import FP32, PARITY_ATOL

from advcal.backbones import languagebind as lb

FIXTURES = fixtures_dir()
STEMS = fixture_stems("languagebind")  # languagebind_tiny_<set>: A here, B hidden

needs_fixture = pytest.mark.skipif(
    not STEMS,
    reason="no LanguageBind parity fixture languagebind_tiny_* ($ADVCAL_FIXTURES or "
    "../shared/fixtures)",
)


@pytest.fixture(scope="module", **parity_params("languagebind"))
def fx(request) -> tuple[dict, dict[str, torch.Tensor]]:
    return load_parity_set(request.param, "languagebind")


def tower_state_dict(tensors: dict[str, torch.Tensor], tower: str) -> dict[str, torch.Tensor]:
    """Full official state_dict of one tower = param.<tower>.* + param.text.* (FIXTURES.md)."""
    sd = {}
    for prefix in (f"param.{tower}.", "param.text."):
        sd.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    return sd


def build_tower(meta: dict, tensors: dict, tower: str) -> lb.LanguageBindModel:
    model = lb.LanguageBindModel(lb.LanguageBindConfig(**meta["configs"][tower])).eval()
    lb.load_state_dict_checked(model, tower_state_dict(tensors, tower), what=tower)
    return model


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@needs_fixture
@pytest.mark.parametrize("tower", lb.TOWERS)
def test_parity_tiny_A(fx, tower: str) -> None:
    meta, t = fx
    model = build_tower(meta, t, tower)
    with torch.no_grad():
        out = model(
            input_ids=t["in.input_ids"],
            pixel_values=t[f"in.{tower}"],
            attention_mask=t["in.attention_mask"],
        )
        last, pooled = model.vision_model(t[f"in.{tower}"])
        img_f = model.get_image_features(t[f"in.{tower}"])
        txt_f = model.get_text_features(t["in.input_ids"], t["in.attention_mask"])
    checks = {
        "image_embeds": (out.image_embeds, t[f"out.{tower}.image_embeds"]),
        "text_embeds": (out.text_embeds, t[f"out.{tower}.text_embeds"]),
        "image_features": (img_f, t[f"pre.{tower}.image_features"]),
        "text_features": (txt_f, t[f"pre.{tower}.text_features"]),
        "vision_pooled": (pooled, t[f"pre.{tower}.vision_pooled"]),
        "vision_last_hidden_state": (last, t[f"pre.{tower}.vision_last_hidden_state"]),
    }
    # logits carry exp(logit_scale) = 14.3..21.3 (set A), yet measured max |diff| is 3.2e-6:
    # the same absolute bound as the embeddings holds, so no scale-relative slack is given
    want = t[f"out.{tower}.logits_per_text"]
    checks["logits_per_text"] = (out.logits_per_text, want)
    checks["logits_per_image"] = (out.logits_per_image, want.t())
    for name, (got, want) in checks.items():
        assert maxdiff(got, want) <= PARITY_ATOL, f"{tower}.{name}: {maxdiff(got, want):.3g}"


@needs_fixture
@pytest.mark.parametrize(
    "manifest", ["image", "video_FT", "audio_FT", "depth", "thermal"], ids=lambda s: s
)
def test_full_size_matches_key_manifest(manifest: str) -> None:
    """Released geometry built on the meta device has exactly the manifest's keys and shapes."""
    path = FIXTURES / f"languagebind_{manifest}_keys.json"
    if not path.is_file():
        pytest.skip(f"manifest {path} absent")
    man = json.loads(path.read_text())
    cfg = lb.LanguageBindConfig(
        text_config=man["text_config"],
        vision_config=man["vision_config"],
        projection_dim=man["projection_dim"],
    )
    with torch.device("meta"):
        model = lb.LanguageBindModel(cfg)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {k: v["shape"] for k, v in man["keys"].items()}
    assert sorted(got) == sorted(want)
    assert got == want
    assert sum(v.numel() for v in model.state_dict().values()) == man["num_elements"]


def write_checkpoint(
    tmp: Path, meta: dict, tensors: dict, tower: str, fmt: str, *, lora: bool = False
) -> Path:
    """A HF-layout directory as the release: config.json + weights (optionally peft-wrapped)."""
    d = tmp / f"LanguageBind_{tower.capitalize()}"
    d.mkdir(parents=True)
    cfg = dict(meta["configs"][tower])
    # a real config.json carries many HF keys we ignore
    cfg.update(architectures=[f"LanguageBind{tower.capitalize()}"], torch_dtype="float32")
    cfg["vision_config"] = dict(cfg["vision_config"], dropout=0.0, model_type="clip")
    sd = tower_state_dict(tensors, tower)
    if lora:
        r, alpha = 2, 4.0
        cfg["vision_config"].update(lora_r=r, lora_alpha=alpha)
        g = torch.Generator().manual_seed(7)
        wrapped = {}
        for k, v in sd.items():
            if not k.startswith("vision_model.encoder."):
                wrapped[k] = v
                continue
            k2 = k.replace("vision_model.encoder.", "vision_model.encoder.base_model.model.")
            mod = k2.rsplit(".", 1)[0]
            if k.endswith("_proj.weight") and "self_attn" in k:
                a = torch.randn(r, v.shape[1], generator=g) * 0.1
                b = torch.randn(v.shape[0], r, generator=g) * 0.1
                wrapped[f"{mod}.base_layer.weight"] = v - (b @ a) * (alpha / r)
                wrapped[f"{mod}.lora_A.default.weight"] = a
                wrapped[f"{mod}.lora_B.default.weight"] = b
            else:
                wrapped[k2] = v
        sd = wrapped
    (d / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    else:
        torch.save(sd, d / "pytorch_model.bin")
    return d


@needs_fixture
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_checkpoint_dir_loads_through_registry(fx, tmp_path: Path, fmt: str) -> None:
    from advcal.backbones import load

    meta, t = fx
    ckpt = write_checkpoint(tmp_path, meta, t, "video", fmt)
    bb = load("languagebind_video_ft", checkpoint=ckpt, tokenizer=lambda p: t["in.input_ids"])
    assert bb.modalities == ("video",)
    model = bb.towers["video"]
    with torch.no_grad():
        z = torch.nn.functional.normalize(model.get_image_features(t["in.video"]), dim=-1)
        zt = bb.encode_text(meta["text"]["strings"])
    assert maxdiff(z, t["out.video.image_embeds"]) <= PARITY_ATOL
    assert maxdiff(zt, t["out.video.text_embeds"]) <= PARITY_ATOL
    assert all(not p.requires_grad for p in bb.parameters())


@needs_fixture
def test_lora_checkpoint_is_merged_with_a_warning(fx, tmp_path: Path, caplog) -> None:
    meta, t = fx
    ckpt = write_checkpoint(tmp_path, meta, t, "depth", "safetensors", lora=True)
    with caplog.at_level(logging.WARNING, logger="advcal.backbones.languagebind"):
        model = lb.load_languagebind_model(ckpt)
    assert any("LoRA" in r.message for r in caplog.records)
    with torch.no_grad():
        z = torch.nn.functional.normalize(model.get_image_features(t["in.depth"]), dim=-1)
    assert maxdiff(z, t["out.depth.image_embeds"]) <= PARITY_ATOL


@needs_fixture
def test_bad_checkpoint_names_keys_and_shapes(fx, tmp_path: Path) -> None:
    meta, t = fx
    ckpt = write_checkpoint(tmp_path, meta, t, "image", "safetensors")
    bad = dict(meta["configs"]["image"])
    side = 2 * bad["vision_config"]["image_size"]  # a larger position table than the file's
    bad["vision_config"] = dict(bad["vision_config"], image_size=side)
    with pytest.raises(ValueError, match=r"position_embedding\.weight: checkpoint"):
        lb.load_languagebind_model(ckpt / "model.safetensors", bad)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        lb.load_languagebind_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs checkpoint="):
        lb.load("languagebind_image")


@needs_fixture
def test_truncated_and_foreign_checkpoints_are_named(fx, tmp_path: Path) -> None:
    """A truncated weights file, a missing key and an unexpected key: one error each, naming
    the file or the keys (not torch's first-failure message)."""
    from safetensors.torch import save_file

    from advcal.backbones.imagebind import CheckpointError

    meta, t = fx
    ckpt = write_checkpoint(tmp_path, meta, t, "thermal", "bin")
    weights = ckpt / "pytorch_model.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        lb.load_languagebind_model(ckpt)
    sd = tower_state_dict(t, "thermal")
    gone = "vision_model.encoder.layers.0.mlp.fc1.bias"
    missing = {k: v.contiguous() for k, v in sd.items() if k != gone}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    cfg = meta["configs"]["thermal"]
    with pytest.raises(ValueError, match=rf"missing keys: {gone}"):
        lb.load_languagebind_model(tmp_path / "missing.safetensors", cfg)
    extra = {**{k: v.contiguous() for k, v in sd.items()}, "vision_model.extra.w": torch.ones(2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys: vision_model\.extra\.w"):
        lb.load_languagebind_model(tmp_path / "extra.safetensors", cfg)


@needs_fixture
def test_old_peft_lora_layout_is_merged(fx, tmp_path: Path) -> None:
    """Older peft keeps the base weight at ``<mod>.weight`` next to ``<mod>.lora_A.default``
    / ``lora_B.default`` (no ``base_layer``): merged the same way, exact embeddings."""
    from safetensors.torch import save_file

    meta, t = fx
    sd = tower_state_dict(t, "image")
    cfg = json.loads(json.dumps(meta["configs"]["image"]))
    r, alpha = 4, 8.0
    cfg["vision_config"].update(lora_r=r, lora_alpha=alpha)
    g = torch.Generator().manual_seed(11)
    wrapped, n = {}, 0
    for k, v in sd.items():
        if not k.startswith("vision_model.encoder."):
            wrapped[k] = v
            continue
        k2 = k.replace("vision_model.encoder.", "vision_model.encoder.base_model.model.")
        if k.endswith(("q_proj.weight", "v_proj.weight")):  # peft's default target modules
            mod = k2.removesuffix(".weight")
            a = torch.randn(r, v.shape[1], generator=g) * 0.1
            b = torch.randn(v.shape[0], r, generator=g) * 0.1
            wrapped[k2] = v - (b @ a) * (alpha / r)
            wrapped[f"{mod}.lora_A.default.weight"] = a
            wrapped[f"{mod}.lora_B.default.weight"] = b
            n += 1
        else:
            wrapped[k2] = v
    assert not any(".base_layer." in k for k in wrapped) and n > 0
    merged, pairs = lb.merge_lora(wrapped, lora_alpha=alpha)
    assert pairs == n and sorted(merged) == sorted(sd)
    d = tmp_path / "old_peft"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in wrapped.items()}, str(d / "model.safetensors"))
    model = lb.load_languagebind_model(d)
    with torch.no_grad():
        z = torch.nn.functional.normalize(model.get_image_features(t["in.image"]), dim=-1)
    assert maxdiff(z, t["out.image.image_embeds"]) <= PARITY_ATOL


def _tiny_backbone(meta: dict, t: dict, audio_input: str) -> lb.LanguageBindBackbone:
    towers = {m: build_tower(meta, t, m) for m in lb.TOWERS}
    return lb.LanguageBindBackbone(
        towers, audio_input=audio_input, tokenizer=lambda p: t["in.input_ids"]
    )


@needs_fixture
def test_backbone_preprocessing_matches_official_inputs(fx) -> None:
    """encode(m, x) in the valid range == the official tower on the normalised input (every
    size from the sidecar: image side, frames, max depth, projection width)."""
    meta, t = fx
    bb = _tiny_backbone(meta, t, "fbank")
    mean = torch.tensor(lb.OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(lb.OPENAI_STD).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    n = t["in.input_ids"].shape[0]  # the official call pairs each input with one text
    ids = t["in.input_ids"]
    with torch.no_grad():
        x = torch.rand(n, *bb.spec("image").shape, generator=g)
        want = bb.towers["image"](ids, (x - mean) / std).image_embeds
        assert maxdiff(bb.encode("image", x), want) <= PARITY_ATOL
        # video: time first (T, 3, S, S) in [0, 1]; the official tower takes (3, T, S, S)
        vc = bb.towers["video"].config.vision_config
        assert bb.spec("video").shape == (vc.num_frames, 3, vc.image_size, vc.image_size)
        v = torch.rand(n, *bb.spec("video").shape, generator=g)
        official = ((v - mean.unsqueeze(1)) / std.unsqueeze(1)).transpose(1, 2)
        want = bb.towers["video"](ids, official).image_embeds
        assert maxdiff(bb.encode("video", v), want) <= PARITY_ATOL
        max_depth = bb.towers["depth"].config.vision_config.max_depth
        assert bb.spec("depth").hi == max_depth
        depth_m = torch.rand(n, *bb.spec("depth").shape, generator=g) * 1.2 * max_depth
        d01 = depth_m.clamp(0.01, max_depth) / max_depth
        want = bb.towers["depth"](ids, (d01.repeat(1, 3, 1, 1) - mean) / std)
        got = bb.encode("depth", depth_m.clamp(0, max_depth))
        assert maxdiff(got, want.image_embeds) <= PARITY_ATOL
        assert maxdiff(bb.encode("audio", t["in.audio"]), t["out.audio.image_embeds"]) <= (
            PARITY_ATOL
        )
        zt = bb.encode_text(meta["text"]["strings"])
    assert maxdiff(zt, t["out.image.text_embeds"]) <= PARITY_ATOL


@needs_fixture
def test_centers_are_the_template_ensemble(fx) -> None:
    """centers(K classes, T templates) == normalise(mean_t normalise(text(template_t(k)))),
    computed by hand one prompt at a time; chunked encoding (3, not dividing K*T) included."""
    meta, t = fx
    bb = lb.LanguageBindBackbone({"image": build_tower(meta, t, "image")})  # real tokenizer
    classes = ["dog", "cat", "sea horse"]
    templates = ["a photo of a {}.", "{}", "a blurry drawing of the {}, outdoors"]
    got = bb.centers(classes, templates, chunk_size=3)
    want = []
    with torch.no_grad():
        for c in classes:
            zs = [
                torch.nn.functional.normalize(bb.encode_text([tp.format(c)]), dim=-1)[0]
                for tp in templates
            ]
            want.append(torch.nn.functional.normalize(torch.stack(zs).mean(0), dim=0))
    torch.testing.assert_close(got, torch.stack(want), **FP32)
    assert got.shape == (len(classes), bb.embed_dim)
    # the ensemble is not one template's embedding: each template matters
    single = bb.centers(classes, templates[:1])
    assert (got - single).abs().max() > 1e-3


@needs_fixture
@pytest.mark.parametrize("audio_input", ["waveform", "fbank"])
def test_pgd_step_through_every_tower(fx, audio_input: str) -> None:
    from advcal.ops import pgd_step_

    meta, t = fx
    bb = _tiny_backbone(meta, t, audio_input)
    centers = bb.encode_text(meta["text"]["strings"]).detach()
    g = torch.Generator().manual_seed(1)
    for m in bb.modalities:
        spec = bb.spec(m)
        shape = tuple(s if s > 0 else 480 for s in spec.shape)
        lo = -3.0 if spec.lo is None else spec.lo
        hi = 3.0 if spec.hi is None else spec.hi
        x0 = lo + (hi - lo) * torch.rand((2, *shape), generator=g)
        x = x0.clone().requires_grad_(True)
        loss = (bb.encode(m, x) @ centers.t())[:, 0].sum()
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, m
        x_adv = x0.clone()
        pgd_step_([x_adv], [grad], [x0], alpha=spec.eps / 4, eps=spec.eps, lo=spec.lo, hi=spec.hi)
        assert (x_adv - x0).abs().max() <= spec.eps + 1e-6 * x0.abs().max()  # fp32 rounding
        if spec.lo is not None:
            assert x_adv.min() >= spec.lo and x_adv.max() <= spec.hi


@needs_fixture
def test_waveform_front_end_and_tokenizer(fx) -> None:
    """Waveform -> 3 fbank chunks as the upstream processor; real tokenizer -> fixture ids."""
    from advcal.backbones.audio import NormalizedFbank

    meta, t = fx
    bb = lb.LanguageBindBackbone({"audio": build_tower(meta, t, "audio")})
    vc = bb.towers["audio"].config.vision_config
    n = bb.spec("audio").shape[0]
    hop = vc.audio_sample_rate // 100  # 10 ms frame shift
    assert n == vc.target_length * hop
    g = torch.Generator().manual_seed(3)
    wav = torch.rand(2, n, generator=g) * 1.6 - 0.8
    ref = NormalizedFbank(vc.num_mel_bins, vc.target_length, lb.AUDIO_MEAN, 2 * lb.AUDIO_STD)
    got = bb.waveform_to_fbank(wav)
    assert got.shape == (2, 3, vc.num_mel_bins, vc.target_length)
    for c in range(3):  # an exact-length clip uses the same fbank for all three chunks
        assert maxdiff(got[:, c], ref(wav)) <= PARITY_ATOL
    # longer clips: front / middle / back chunks start at the first start of each third
    long = torch.rand(1, n + hop * 30, generator=g) * 1.6 - 0.8
    full = ref.fbank(long - long.mean(-1, keepdim=True))  # (1, frames, mel)
    parts = np.array_split(np.arange(full.shape[1] - vc.target_length + 1), 3)
    starts = [int(p[0]) if len(p) else 0 for p in parts]
    got = bb.waveform_to_fbank(long)
    for c, s in enumerate(starts):
        want = (full[:, s : s + vc.target_length].transpose(1, 2) - lb.AUDIO_MEAN) / (
            2 * lb.AUDIO_STD
        )
        assert maxdiff(got[:, c], want) <= PARITY_ATOL, (c, s)
    ids, mask = bb.tokenize(meta["text"]["strings"])
    assert ids.tolist() == meta["text"]["input_ids"]
    assert mask.tolist() == meta["text"]["attention_mask"]
