"""Point-Bind PointBERT encoder: FPS/kNN grouping and parity with pointbind_pointbert_tiny_A,
the released key manifest, vectorised grouping vs a naive reference, gradients for attacks."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import fixture_stems, fixtures_dir, load_parity_set, parity_params
from tolerances import PARITY_ATOL

from advcal.backbones import pointbert as pb
from advcal.backbones.languagebind import load_state_dict_checked

FIXTURES = fixtures_dir()
STEMS = fixture_stems("pointbind_pointbert")  # pointbind_pointbert_tiny_<set>

needs_fixture = pytest.mark.skipif(
    not STEMS,
    reason="no Point-Bind parity fixture pointbind_pointbert_tiny_* ($ADVCAL_FIXTURES or "
    "../shared/fixtures)",
)


@pytest.fixture(scope="module", **parity_params("pointbind_pointbert"))
def fx(request) -> tuple[dict, dict[str, torch.Tensor]]:
    return load_parity_set(request.param, "pointbind_pointbert")


def recorded_starts(meta: dict, n_points: int, batch: int) -> torch.Tensor:
    """FPS start indices recorded in the sidecar, cross-checked against the recorded seed."""
    m = re.search(r"start indices \[([\d,\s]+)\]", meta["fps_note"])
    assert m, "sidecar fps_note lost its recorded start indices"
    starts = torch.tensor([int(s) for s in m.group(1).split(",")])
    seed = int(re.search(r"manual_seed\((\d+)\)", meta["fps_note"]).group(1))
    g = torch.Generator().manual_seed(seed)
    assert torch.equal(torch.randint(0, n_points, (batch,), generator=g), starts)
    return starts


def out_dim_of(tensors: dict) -> int:
    """The point head's output width (= the bind model's out_embed_dim), from the weights."""
    return tensors["param.bind.modality_head_point.2.weight"].shape[0]


def build(meta: dict, tensors: dict) -> pb.PointBind:
    out_dim = out_dim_of(tensors)
    assert out_dim == meta["bind_constructor_kwargs"]["out_embed_dim"]
    model = pb.pointbind_pointbert(
        meta["pointbert_config"], out_embed_dim=out_dim, pc_feat_dims=meta["pc_feat_dims"]
    ).eval()
    sd = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    load_state_dict_checked(model, sd, what="Point-Bind tiny")
    return model


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def set_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max distance between the point sets of matching groups ``(B, G, M, 3)`` (order-free)."""
    d = torch.cdist(a.flatten(0, 1), b.flatten(0, 1))  # (BG, M, M)
    return max(d.min(2).values.max().item(), d.min(1).values.max().item())


@needs_fixture
def test_parity_tiny_A(fx) -> None:
    meta, t = fx
    model = build(meta, t)
    pc = t["in.pc"]
    start = recorded_starts(meta, pc.shape[1], pc.shape[0])
    with torch.no_grad():
        neighborhood, center = model.point_encoder.group(pc, start)
        feat = model.point_encoder(pc, start)
        enc = model.encode_pc(pc, start)
        head = model.head(enc)
        out = model(pc, start)
    assert maxdiff(center, t["grp.center"]) <= PARITY_ATOL
    assert neighborhood.shape == t["grp.neighborhood"].shape
    assert set_diff(neighborhood, t["grp.neighborhood"]) <= PARITY_ATOL
    assert maxdiff(feat, t["pre.point_encoder"]) <= PARITY_ATOL
    assert maxdiff(enc, t["pre.encode_pc"]) <= PARITY_ATOL
    assert maxdiff(head, t["pre.head_point"]) <= PARITY_ATOL
    assert maxdiff(out, t["out.pc_embed"]) <= PARITY_ATOL
    # the recorded grouping fed directly gives the same feature (bypasses FPS entirely)
    with torch.no_grad():
        feat2 = model.point_encoder.forward_groups(t["grp.neighborhood"], t["grp.center"])
    assert maxdiff(feat2, t["pre.point_encoder"]) <= PARITY_ATOL


@needs_fixture
def test_fps_without_start_draws_like_upstream(fx) -> None:
    meta, t = fx
    pc = t["in.pc"]
    seed = int(re.search(r"manual_seed\((\d+)\)", meta["fps_note"]).group(1))
    g = torch.Generator().manual_seed(seed)
    idx = pb.farthest_point_sample(pc, meta["pointbert_config"]["num_group"], generator=g)
    centers = pc[torch.arange(pc.shape[0])[:, None], idx]
    assert maxdiff(centers, t["grp.center"]) == 0.0


def naive_fps(xyz: torch.Tensor, k: int, start: int) -> torch.Tensor:
    out = []
    for cloud in xyz:  # one cloud at a time, one pick at a time
        picked = [start]
        dist = torch.full((cloud.shape[0],), float("inf"))
        for _ in range(k - 1):
            dist = torch.minimum(dist, ((cloud - cloud[picked[-1]]) ** 2).sum(-1))
            picked.append(int(dist.argmax()))
        out.append(torch.tensor(picked))
    return torch.stack(out)


@pytest.mark.parametrize("b,n,g,m", [(1, 17, 5, 3), (3, 257, 31, 7), (2, 1000, 64, 32)])
def test_grouping_matches_naive_reference(b: int, n: int, g: int, m: int) -> None:
    gen = torch.Generator().manual_seed(n)
    xyz = torch.rand(b, n, 3, generator=gen) * 2 - 1
    idx = pb.farthest_point_sample(xyz, g, start=n // 2)
    assert torch.equal(idx, naive_fps(xyz, g, n // 2))
    assert all(len(set(r.tolist())) == g for r in idx)  # distinct picks
    centers = xyz[torch.arange(b)[:, None], idx]
    knn = pb.knn_indices(xyz, centers, m)
    d = torch.cdist(centers, xyz)
    want = d.argsort(dim=-1)[..., :m]
    assert torch.equal(knn.sort(-1).values, want.sort(-1).values)
    nb, c = pb.group_points(xyz, g, m, start=n // 2)
    assert maxdiff(c, centers) == 0.0
    assert nb.shape == (b, g, m, 3)
    # every group's nearest point is its centre itself
    assert nb.norm(dim=-1).amin(-1).max() == 0.0


def test_fps_arguments_are_checked() -> None:
    xyz = torch.rand(2, 10, 3)
    with pytest.raises(ValueError, match="num_samples"):
        pb.farthest_point_sample(xyz, 11)
    with pytest.raises(ValueError, match="start"):
        pb.farthest_point_sample(xyz, 3, start=torch.tensor([0, 10]))


@needs_fixture
def test_point_keys_match_released_manifest() -> None:
    """Released PointBERT geometry on the meta device == the manifest's point-path keys."""
    path = FIXTURES / "pointbind_pointbert_keys.json"
    if not path.is_file():
        pytest.skip(f"manifest {path} absent")
    man = json.loads(path.read_text())
    out_dim = man["keys"]["bind.modality_head_point.2.weight"]["shape"][0]
    with torch.device("meta"):
        model = pb.pointbind_pointbert(man["pointbert_config"], out_embed_dim=out_dim)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {k: v["shape"] for k, v in man["keys"].items() if k.startswith(pb.POINT_KEY_PREFIXES)}
    assert got == want


@needs_fixture
def test_full_pointbind_manifest_with_native_imagebind() -> None:
    """With the native ImageBind as ``bind``: every key of the released POINTBIND module."""
    path = FIXTURES / "pointbind_pointbert_keys.json"
    ib = pytest.importorskip("advcal.backbones.imagebind", reason="native ImageBind not present")
    man = json.loads(path.read_text())
    with torch.device("meta"):
        model = pb.pointbind_pointbert(
            man["pointbert_config"],
            out_embed_dim=man["keys"]["bind.modality_head_point.2.weight"]["shape"][0],
            bind=ib.ImageBind(ib.imagebind_huge()),
        )
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == {k: v["shape"] for k, v in man["keys"].items()}
    assert sum(v.numel() for v in model.state_dict().values()) == man["num_elements"]


@needs_fixture
def test_gradient_step_in_coordinate_units(fx) -> None:
    """A PGD step moves the points (eps in coordinate units) and changes the embedding."""
    from advcal.ops import pgd_step_

    meta, t = fx
    model = build(meta, t)
    pc = t["in.pc"].clone()
    target = torch.nn.functional.normalize(torch.randn(pc.shape[0], out_dim_of(t)), dim=-1)
    x = pc.clone().requires_grad_(True)
    loss = -(model(x) * target).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    eps = 0.02
    x_adv = pc.clone()
    pgd_step_([x_adv], [grad], [pc], alpha=eps, eps=eps, lo=None, hi=None)
    assert 0 < (x_adv - pc).abs().max() <= eps + 1e-7
    with torch.no_grad():
        assert not torch.equal(model(x_adv), model(pc))
