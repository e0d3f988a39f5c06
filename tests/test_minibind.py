"""The embedded minibind backbone: encoders, freezing, text tower, checkpoints, tiny pretraining.

Never runs the full pretraining: every model here is a tiny config (width 4, D 32).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from advcal.backbones import load as load_backbone
from advcal.backbones.minibind import (
    MODALITIES,
    HashTextEncoder,
    MiniBind,
    MiniBindConfig,
    cache_path,
    load,
    pretrain,
    specs,
)
from advcal.data.digits import CLASS_NAMES, TEMPLATES, digits

TINY = MiniBindConfig(embed_dim=32, width=4, epochs=1, batch_size=32)


@pytest.fixture(scope="module")
def model() -> MiniBind:
    torch.manual_seed(0)
    return MiniBind(TINY)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return digits("test", limit=5).inputs


@pytest.mark.parametrize("m", MODALITIES)
def test_encode_shape_and_input_grad(model: MiniBind, batch: dict, m: str) -> None:
    x = batch[m].clone().requires_grad_(True)
    z = model.encode(m, x)
    assert z.shape == (5, TINY.embed_dim) and torch.isfinite(z).all()
    z.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_specs_match_data(batch: dict) -> None:
    for m, spec in specs().items():
        spec.check_input(batch[m], modality=m)
        assert spec.eps == pytest.approx(4 / 255 if m != "point" else spec.eps)
    assert specs()["audio"].lo == -1.0 and specs()["audio"].space == "waveform"


def test_frozen_and_bn_stays_eval(model: MiniBind, batch: dict) -> None:
    assert all(not p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training
    assert all(not mod.training for mod in model.modules())
    bn = next(mod for mod in model.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.encode("image", batch["image"] * 0.5)
    assert torch.equal(bn.running_mean, before)


def test_encode_rejects_bad_input(model: MiniBind) -> None:
    with pytest.raises(ValueError, match="shape"):
        model.encode("image", torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="unknown modality"):
        model.encode("imu", torch.rand(2, 6))


def test_text_encoder_deterministic_and_general() -> None:
    a = HashTextEncoder(64, seed=7)(["a drawing of the digit two.", "anything at all"])
    b = HashTextEncoder(64, seed=7)(["a drawing of the digit two.", "anything at all"])
    assert torch.equal(a, b)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))
    c = HashTextEncoder(64, seed=8)(["a drawing of the digit two."])
    assert not torch.allclose(a[:1], c)
    with pytest.raises(TypeError):
        HashTextEncoder(64)("one string")


def test_centers_unit_norm_and_distinct(model: MiniBind) -> None:
    c = model.centers(CLASS_NAMES, TEMPLATES)
    assert c.shape == (10, TINY.embed_dim)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(10))
    sim = c @ c.T - 2 * torch.eye(10)
    assert sim.max() < 0.6  # class words dominate the shared template words


def test_checkpoint_round_trip(model: MiniBind, batch: dict, tmp_path: Path) -> None:
    path = model.save(tmp_path / "mb.safetensors")
    back = load("minibind", checkpoint=path)
    assert back.config == model.config
    for m in MODALITIES:
        torch.testing.assert_close(back.encode(m, batch[m]), model.encode(m, batch[m]))
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_and_foreign_checkpoints(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load("minibind", checkpoint=bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a minibind checkpoint"):
        load("minibind", checkpoint=foreign)
    with pytest.raises(FileNotFoundError):
        load("minibind", checkpoint=tmp_path / "missing.safetensors")


def test_config_hash_and_json() -> None:
    assert MiniBindConfig.from_json(TINY.to_json()) == TINY
    assert TINY.hash() != replace(TINY, epochs=2).hash()
    with pytest.raises(ValueError, match="modalities"):
        MiniBindConfig(modalities=("imu",))


def test_tiny_pretrain_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = replace(TINY, modalities=("image", "audio", "point"))
    data = digits("train", modalities=cfg.modalities, limit=96)
    m1 = pretrain(cfg, data, progress=False)
    m2 = pretrain(cfg, data, progress=False)
    assert all(not p.requires_grad for p in m1.parameters()) and not m1.training
    x = data.inputs["image"][:4]
    torch.testing.assert_close(m1.encode("image", x), m2.encode("image", x), rtol=0, atol=0)
    # the trained encoder moved away from its initialisation
    fresh = MiniBind(cfg)
    assert not torch.allclose(fresh.encode("image", x), m1.encode("image", x))

    # load() pretrains on a cache miss (tiny config on a tiny subset), then reads the cache
    monkeypatch.setenv("ADVCAL_CACHE", str(tmp_path))
    import advcal.backbones.minibind as mb

    calls = []

    def fake_pretrain(config, dataset=None, progress=True):
        calls.append(config)
        return pretrain(config, data, progress=False)

    monkeypatch.setattr(mb, "pretrain", fake_pretrain)
    a = load_backbone("minibind", config=cfg)
    assert cache_path(cfg).is_file() and len(calls) == 1
    b = load_backbone("minibind", config=cfg)
    assert len(calls) == 1
    z = F.normalize(a.encode("audio", data.inputs["audio"][:3]), dim=-1)
    torch.testing.assert_close(z, F.normalize(b.encode("audio", data.inputs["audio"][:3]), dim=-1))


@pytest.mark.parametrize("m", MODALITIES)
def test_folded_batchnorm_computes_the_same_function(batch: dict, m: str) -> None:
    """encode() runs a copy with BatchNorm folded into the layer before it: the same outputs
    and input gradients as the registered (unfolded) encoder, to float rounding."""
    torch.manual_seed(1)
    model = MiniBind(TINY)
    with torch.no_grad():  # non-trivial BN statistics, so a wrong fold would show
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1, 0.3)
                mod.bias.normal_(0, 0.3)
    x = batch[m].clone()

    def out_and_grad(f):
        xx = x.clone().requires_grad_(True)
        z = f(xx)
        (g,) = torch.autograd.grad(z.square().sum(), xx)
        return z.detach(), g

    z_ref, g_ref = out_and_grad(model.encoders[m])
    z, g = out_and_grad(lambda v: model.encode(m, v))
    assert not any(
        isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
        for mod in model._inference_encoder(m, x).modules()
    )
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    # a weight change reaches encode(): load_state_dict drops the folded copies
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(k for k in state if k.startswith(f"encoders.{m}.") and k.endswith("weight"))
    state[first] = state[first] * 2
    model.load_state_dict(state)
    z2, _ = out_and_grad(lambda v: model.encode(m, v))
    assert not torch.allclose(z2, z)
