import pytest
import torch

from advcal.heads import KINDS, CalibrationHeads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", [1, 7, 33])
def test_identity_at_init_reproduces_embeddings_exactly(kind, dim):
    heads = CalibrationHeads(["image", "audio"], dim, kind=kind)
    e = torch.randn(5, dim)
    for m in ("image", "audio"):
        assert torch.equal(heads(m, e), e)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip(tmp_path, kind):
    heads = CalibrationHeads(["image", "depth"], 8, kind=kind, hidden=5)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    heads.save(tmp_path / "h.safetensors")
    back = CalibrationHeads.load(tmp_path / "h.safetensors")
    e = torch.randn(3, 8)
    assert back.kind == kind and back.modalities == ("image", "depth")
    assert torch.equal(back("depth", e), heads("depth", e))


def test_fused_params_match_forward():
    heads = CalibrationHeads(["x"], 6, kind="residual_linear")
    with torch.no_grad():
        heads["x"].weight.normal_()
        heads["x"].bias.normal_()
    w, b, residual = heads["x"].fused()
    e = torch.randn(4, 6)
    assert residual and torch.allclose(heads("x", e), e + e @ w.T + b)
    assert CalibrationHeads(["x"], 6, kind="mlp")["x"].fused() is None


def test_load_linear_and_errors(tmp_path):
    heads = CalibrationHeads(["x"], 4, kind="linear")
    w = torch.randn(4, 4)
    heads.load_linear("x", w, None)
    assert torch.equal(heads["x"].weight, w)
    with pytest.raises(ValueError, match="weight for 'x' must be"):
        heads.load_linear("x", torch.randn(3, 4), None)
    with pytest.raises(ValueError, match="no head for modality 'y'"):
        heads["y"]
    with pytest.raises(ValueError, match="head kind"):
        CalibrationHeads(["x"], 4, kind="conv")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable heads file"):
        CalibrationHeads.load(bad)
