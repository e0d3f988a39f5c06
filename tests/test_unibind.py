"""UniBind: tiny checkpoints through the real loader, point path parity (Point-Bind fixture),
released key manifests, released-head weights, multi-center logits, centre conversion, PGD
through every modality."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advcal.backbones import imagebind as ib
from advcal.backbones import pointbert as pb
from advcal.backbones import unibind as ub

TOL = 1e-5  # fp32 parity; never loosened
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("ADVCAL_FIXTURES", ROOT.parent / "shared" / "fixtures"))
PB_STEM = FIXTURES / "pointbind_pointbert_tiny_A"
IB_STEM = FIXTURES / "imagebind_tiny_A"

needs_fixture = pytest.mark.skipif(
    not (PB_STEM.with_suffix(".safetensors").is_file() and IB_STEM.with_suffix(".json").is_file()),
    reason=f"Point-Bind / ImageBind fixtures not found in {FIXTURES} (set ADVCAL_FIXTURES)",
)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def pbfx() -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    meta = json.loads(PB_STEM.with_suffix(".json").read_text())
    return meta, load_file(str(PB_STEM.with_suffix(".safetensors")))


@pytest.fixture(scope="module")
def tiny_ckpt(pbfx, tmp_path_factory) -> tuple[Path, dict, dict]:
    """A UniBind-layout checkpoint: tiny ImageBind (out dim = the Point-Bind fixture's head) +
    the Point-Bind fixture's point path + released-style heads for image and point."""
    meta, t = pbfx
    out_dim = t["param.bind.modality_head_point.2.weight"].shape[0]
    torch.manual_seed(0)
    ib_cfg = ib.imagebind_tiny(out_embed_dim=out_dim).to_kwargs()
    model = ub.UniBind(
        ib.ImageBind(ib.ImageBindConfig(**ib_cfg)),
        meta["pointbert_config"],
        ["image", "point"],
        pc_feat_dims=meta["pc_feat_dims"],
    )
    sd = model.state_dict()
    for k, v in t.items():  # the fixture's point path, under UniBind's names
        if k.startswith("param."):
            sd[f"backbone.{k.removeprefix('param.')}"] = v
    g = torch.Generator().manual_seed(5)
    for k in list(sd):
        if k.startswith("mlp_for_"):
            sd[k] = torch.randn(sd[k].shape, generator=g) * 0.1
    path = tmp_path_factory.mktemp("unibind") / "unibind_tiny.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, ib_cfg, meta["pointbert_config"]


@pytest.fixture(scope="module")
def tiny(tiny_ckpt) -> ub.UniBindBackbone:
    from advcal.backbones import load

    path, ib_cfg, pcfg = tiny_ckpt
    return load("unibind", checkpoint=path, imagebind_config=ib_cfg, point_config=pcfg)


@needs_fixture
def test_tiny_checkpoint_loads_and_point_path_matches_pointbind(tiny, pbfx) -> None:
    _, t = pbfx
    assert set(tiny.modalities) == set(ub.UNIBIND_MODALITIES)
    assert all(not p.requires_grad for p in tiny.parameters())
    pc = t["in.pc"]
    tiny.fps_start = torch.tensor([253, 181])  # the recorded upstream FPS starts
    with torch.no_grad():
        z = tiny.encode("point", pc)
    assert maxdiff(z, F.normalize(t["out.pc_embed"], dim=-1)) <= TOL


@needs_fixture
def test_vision_paths_are_imagebind_plus_normalisation(tiny) -> None:
    g = torch.Generator().manual_seed(1)
    s = tiny.spec("image").shape[-1]
    x = torch.rand(2, 3, s, s, generator=g)
    mean = torch.tensor(ib.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(ib.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = F.normalize(tiny.model.bind.encode("vision", (x - mean) / std), dim=-1)
        assert maxdiff(tiny.encode("image", x), want) <= TOL
        assert maxdiff(tiny.encode("event", x), want) <= TOL
        w, b = tiny.head_weights("image")
        tiny.apply_heads = True
        got = tiny.encode("image", x)
        tiny.apply_heads = False
    assert maxdiff(got, F.normalize(want @ w.t() + b, dim=-1)) <= TOL
    assert tiny.has_head("point") and not tiny.has_head("audio")
    with pytest.raises(KeyError, match="mlp_for_audio"):
        tiny.head_weights("audio")


@needs_fixture
@pytest.mark.parametrize("which", ["image", "point"])
def test_released_layout_matches_manifest(which: str) -> None:
    """ImageBind-Huge + point head + mlp_for_<m> on the meta device == the manifest, except the
    I2P-MAE point encoder (not implemented natively: listed, not hidden)."""
    path = FIXTURES / f"unibind_{which}_keys.json"
    if not path.is_file():
        pytest.skip(f"manifest {path} absent")
    man = {k: v["shape"] for k, v in json.loads(path.read_text())["keys"].items()}
    with torch.device("meta"):
        model = ub.UniBind(ib.ImageBind(ib.imagebind_huge()), pb.PointBERTConfig(), [which])
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    i2p = ("backbone.point_encoder.", "backbone.pc_projection")
    assert {k: v for k, v in got.items() if not k.startswith(i2p)} == {
        k: v for k, v in man.items() if not k.startswith(i2p)
    }
    assert any(k.startswith("backbone.point_encoder.h_encoder.") for k in man)


def test_multi_center_logits_is_nearest_center_per_class() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 8, generator=g)
    centers = torch.randn(11, 8, generator=g)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1, 0, 4, 4])
    s = ub.multi_center_logits(z, centers, labels, num_classes=6)
    cos = F.normalize(z, dim=-1) @ F.normalize(centers, dim=-1).t()
    for k in range(5):
        assert torch.allclose(s[:, k], cos[:, labels == k].amax(1))
    assert torch.isinf(s[:, 5]).all()
    assert torch.equal(s.argmax(1), labels[cos.argmax(1)])
    z.requires_grad_(True)
    ub.multi_center_logits(z, centers, labels).max(1).values.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_convert_centers_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    obj = {
        "dog": torch.randn(50, 16, generator=g),
        "cat": np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32),
        "ibis": torch.randn(3, 16, generator=g),
    }
    src = tmp_path / "centres.pkl"
    with open(src, "wb") as f:
        pickle.dump(obj, f)
    dst = tmp_path / "centres.safetensors"
    with pytest.raises(PermissionError, match="--trust-pickle"):
        ub.convert_centers(src, dst, trust_pickle=False)
    assert not dst.exists()
    ub.convert_centers(src, dst, trust_pickle=True)
    mc = ub.load_centers(dst)
    assert mc.class_names == ["dog", "cat", "ibis"]
    assert mc.centers.shape == (103, 16) and mc.labels.shape == (103,)
    want = F.normalize(torch.cat([obj["dog"], torch.from_numpy(obj["cat"]), obj["ibis"]]), dim=-1)
    assert maxdiff(mc.centers, want) <= 1e-6
    assert mc.labels.tolist() == [0] * 50 + [1] * 50 + [2] * 3
    with pytest.raises(ValueError, match="convert-centers"):
        ub.load_centers(src)


def test_events_to_frame() -> None:
    ev = torch.tensor([[1, 2, 0.1, 1], [1, 2, 0.2, 1], [3, 0, 0.3, -1], [0, 0, 0.4, 1]])
    f = ub.events_to_frame(ev, 4, 5)
    assert f.shape == (3, 4, 5) and f.min() >= 0 and f.max() <= 1
    assert f[0, 2, 1] == 1.0 and f[0, 0, 0] == 0.5 and f[2, 0, 3] == 1.0 and f[1].abs().sum() == 0


@needs_fixture
def test_pgd_step_through_every_modality(tiny) -> None:
    from advcal.ops import pgd_step_

    g = torch.Generator().manual_seed(4)
    centers = tiny.centers(["dog", "cat"], templates=["a photo of a {}."])
    lengths = {"video": 2, "audio": 16000 * 2, "point": 256}
    for m in tiny.modalities:
        spec = tiny.spec(m)
        shape = tuple(s if s > 0 else lengths[m] for s in spec.shape)
        lo = -1.0 if spec.lo is None else spec.lo
        hi = 1.0 if spec.hi is None else spec.hi
        x0 = lo + (hi - lo) * torch.rand((2, *shape), generator=g)
        x = x0.clone().requires_grad_(True)
        loss = (tiny.encode(m, x) @ centers.t())[:, 0].sum()
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, m
        x_adv = x0.clone()
        pgd_step_([x_adv], [grad], [x0], alpha=spec.eps, eps=spec.eps, lo=spec.lo, hi=spec.hi)
        assert 0 < (x_adv - x0).abs().max() <= spec.eps + 1e-6 * x0.abs().max(), m
