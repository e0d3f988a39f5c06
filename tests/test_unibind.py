"""UniBind: tiny checkpoints through the real loader, point path parity (Point-Bind fixture),
released key manifests, released-head weights, multi-center logits, centre conversion, PGD
through every modality."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_stems, fixtures_dir, load_parity_set, parity_params
from safetensors.torch import save_file
from test_pointbert import recorded_starts  # the sidecar's FPS starts, seed-checked
from tolerances import FP32, PARITY_ATOL

from advcal.backbones import imagebind as ib
from advcal.backbones import pointbert as pb
from advcal.backbones import unibind as ub
from advcal.backbones.clip_tokenizer import get_tokenizer

FIXTURES = fixtures_dir()
PB_STEMS = fixture_stems("pointbind_pointbert")  # pointbind_pointbert_tiny_<set>

needs_fixture = pytest.mark.skipif(
    not PB_STEMS,
    reason="no Point-Bind fixture pointbind_pointbert_tiny_* ($ADVCAL_FIXTURES or "
    "../shared/fixtures)",
)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", **parity_params("pointbind_pointbert"))
def pbfx(request) -> tuple[dict, dict[str, torch.Tensor]]:
    return load_parity_set(request.param, "pointbind_pointbert")


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
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, ib_cfg, meta["pointbert_config"]


@pytest.fixture(scope="module")
def tiny(tiny_ckpt) -> ub.UniBindBackbone:
    from advcal.backbones import load

    path, ib_cfg, pcfg = tiny_ckpt
    return load("unibind", checkpoint=path, imagebind_config=ib_cfg, point_config=pcfg)


@needs_fixture
def test_tiny_checkpoint_loads_and_point_path_matches_pointbind(tiny, pbfx) -> None:
    meta, t = pbfx
    assert set(tiny.modalities) == set(ub.UNIBIND_MODALITIES)
    assert all(not p.requires_grad for p in tiny.parameters())
    pc = t["in.pc"]
    tiny.fps_start = recorded_starts(meta, pc.shape[1], pc.shape[0])  # the sidecar's starts
    try:
        with torch.no_grad():
            z = tiny.encode("point", pc)
    finally:
        tiny.fps_start = 0
    assert maxdiff(z, F.normalize(t["out.pc_embed"], dim=-1)) <= PARITY_ATOL


@needs_fixture
def test_vision_paths_are_imagebind_plus_normalisation(tiny) -> None:
    g = torch.Generator().manual_seed(1)
    s = tiny.spec("image").shape[-1]
    x = torch.rand(2, 3, s, s, generator=g)
    mean = torch.tensor(ib.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(ib.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = F.normalize(tiny.model.bind.encode("vision", (x - mean) / std), dim=-1)
        assert maxdiff(tiny.encode("image", x), want) <= PARITY_ATOL
        assert maxdiff(tiny.encode("event", x), want) <= PARITY_ATOL
        w, b = tiny.head_weights("image")
        tiny.apply_heads = True
        got = tiny.encode("image", x)
        tiny.apply_heads = False
    assert maxdiff(got, F.normalize(want @ w.t() + b, dim=-1)) <= PARITY_ATOL
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
def test_pgd_step_through_every_modality(tiny, pbfx) -> None:
    from advcal.ops import pgd_step_

    g = torch.Generator().manual_seed(4)
    centers = tiny.centers(["dog", "cat"], templates=["a photo of a {}."])
    lengths = {
        "video": tiny.image_bb.config.video_frames,  # one clip
        "audio": tiny.image_bb.audio_clip_samples,  # one clip
        "point": pbfx[1]["in.pc"].shape[1],  # the fixture's cloud size
    }
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


# -- centre pickles: the formats upstream writes, CUDA tensors on a CPU machine --------------
def _cuda_tagged(fn):
    """Run ``fn`` while torch tags every saved storage as ``cuda:0``: what a pickle written on a
    GPU machine holds (torch.save and plain pickle.dump of tensors both go through this tag)."""
    with mock.patch("torch.serialization.location_tag", lambda storage: "cuda:0"):
        return fn()


@pytest.mark.parametrize("writer", ["pickle", "torch_zip", "torch_legacy"])
def test_convert_centers_maps_cuda_tensors_to_cpu(tmp_path: Path, writer: str) -> None:
    g = torch.Generator().manual_seed(6)
    obj = {"dog": torch.randn(50, 8, generator=g), 7: torch.randn(50, 8, generator=g)}
    src = tmp_path / "centres.pkl"

    def write() -> None:
        if writer == "pickle":
            src.write_bytes(pickle.dumps(obj))
        else:
            torch.save(obj, src, _use_new_zipfile_serialization=writer == "torch_zip")

    _cuda_tagged(write)
    if not torch.cuda.is_available():  # the stock loaders refuse: the test is not vacuous
        with pytest.raises(RuntimeError, match="CUDA"):
            if writer == "pickle":
                pickle.loads(src.read_bytes())
            else:
                torch.load(src, weights_only=False)
    dst = ub.convert_centers(src, tmp_path / "c.safetensors", trust_pickle=True)
    mc = ub.load_centers(dst)
    assert mc.class_names == ["dog", "7"] and mc.labels.tolist() == [0] * 50 + [1] * 50
    want = F.normalize(torch.cat([obj["dog"], obj[7]]), dim=-1)
    torch.testing.assert_close(mc.centers, want, **FP32)


def test_convert_centers_accepts_lists_and_rejects_bad_files(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(3, 5, generator=g)
    obj = {
        "list_of_lists": rows.tolist(),
        "list_of_tensors": [rows[0], rows[1]],
        "list_of_arrays": [rows[2].numpy()],
        "one_vector": rows[0].tolist(),
    }
    src = tmp_path / "lists.pkl"
    src.write_bytes(pickle.dumps(obj))
    mc = ub.load_centers(ub.convert_centers(src, tmp_path / "l.safetensors", trust_pickle=True))
    want = torch.cat([rows, rows[:2], rows[2:], rows[:1]])
    torch.testing.assert_close(mc.centers, F.normalize(want, dim=-1), **FP32)
    assert mc.labels.tolist() == [0, 0, 0, 1, 1, 2, 3]
    bad = tmp_path / "widths.pkl"
    bad.write_bytes(pickle.dumps({"a": torch.zeros(2, 4) + 1, "b": torch.ones(2, 5)}))
    with pytest.raises(ValueError, match="width 5"):
        ub.convert_centers(bad, tmp_path / "x.safetensors", trust_pickle=True)
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(src.read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot unpickle"):
        ub.convert_centers(cut, tmp_path / "y.safetensors", trust_pickle=True)


def test_multi_centers_api(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ib.imagebind_tiny()
    bb = ub.UniBindBackbone(ub.UniBind(ib.ImageBind(cfg), None, ["image"]))
    with pytest.raises(ValueError, match="convert-centers"):
        bb.multi_centers()
    g = torch.Generator().manual_seed(9)
    src = tmp_path / "c.pkl"
    obj = {"dog": torch.randn(4, cfg.out_embed_dim, generator=g)}
    obj["cat"] = torch.randn(2, cfg.out_embed_dim, generator=g)
    src.write_bytes(pickle.dumps(obj))
    dst = ub.convert_centers(src, tmp_path / "c.safetensors", trust_pickle=True)
    bb.centers_path = dst
    mc = bb.multi_centers()
    assert mc.centers.shape == (6, cfg.out_embed_dim) and mc.class_names == ["dog", "cat"]
    torch.testing.assert_close(mc.centers.norm(dim=-1), torch.ones(6), **FP32)
    assert bb.multi_centers(dst).labels.tolist() == [0, 0, 0, 0, 1, 1]
    narrow = tmp_path / "n.pkl"
    narrow.write_bytes(pickle.dumps({"dog": torch.randn(2, cfg.out_embed_dim + 1)}))
    with pytest.raises(ValueError, match="wide"):
        bb.multi_centers(ub.convert_centers(narrow, tmp_path / "n.st", trust_pickle=True))
    w, b = bb.head_weights("image")
    assert w.shape == (cfg.out_embed_dim, cfg.out_embed_dim) and b.shape == (cfg.out_embed_dim,)
    assert bb.head_modalities == ("image",)


# -- text: UniBind's vendored tokenizer ------------------------------------------------------
def test_text_truncates_hard_at_77_like_unibinds_tokenizer() -> None:
    """Point-Bind/UniBind's vendored SimpleTokenizer keeps the first 77 ids of
    [sot] + bpe + [eot] (eot lost when too long); ImageBind's current one forces eot."""
    torch.manual_seed(0)
    bb = ub.UniBindBackbone(ub.UniBind(ib.ImageBind(ib.imagebind_tiny()), None, []))
    text = "a photo of a small brown dog running " * 12  # ~85 BPE tokens
    tok = get_tokenizer()
    full = [tok.sot_id, *tok.encode(text), tok.eot_id]
    assert len(full) > 77
    ids = bb.image_bb.tokenize([text])
    assert ids[0].tolist() == full[:77] and tok.eot_id not in ids[0].tolist()
    short = bb.image_bb.tokenize(["a dog"])[0].tolist()
    assert short[:4] == [tok.sot_id, *tok.encode("a dog"), tok.eot_id]
    with torch.no_grad():
        z = bb.encode_text([text])
        want = F.normalize(bb.model.bind.encode("text", torch.tensor([full[:77]])), dim=-1)
        eot_style = F.normalize(
            bb.model.bind.encode("text", torch.tensor([[*full[:76], tok.eot_id]])), dim=-1
        )
    torch.testing.assert_close(z, want, **FP32)
    assert (z - eot_style).abs().max() > 1e-3  # the rule matters for the embedding
    # ImageBind itself keeps its own convention
    assert ib.ImageBindBackbone(bb.model.bind).tokenize([text])[0, -1] == tok.eot_id


# -- checkpoints: merge order, conflicts, truncated/foreign files, I2P-MAE -----------------------
def _tiny_unibind_files(tmp: Path) -> tuple[dict, dict, dict[str, Path]]:
    """ImageBind-only, UniBind-layout (``backbone.bind.*`` + mlp) and Point-Bind-layout files
    of one tiny model, written as a user would hold them."""
    torch.manual_seed(3)
    ib_cfg = ib.imagebind_tiny().to_kwargs()
    pcfg = {"trans_dim": 32, "depth": 1, "num_heads": 2, "group_size": 8, "num_group": 16}
    pcfg["encoder_dims"] = 32
    model = ub.UniBind(ib.ImageBind(ib.ImageBindConfig(**ib_cfg)), pcfg, ["image"])
    sd = model.state_dict()
    point_path = (  # POINTBIND's point path, under UniBind's backbone. prefix
        "backbone.point_encoder.",
        "backbone.pc_projection",
        "backbone.logit_scale",
        "backbone.bind.modality_head_point.",
        "backbone.bind.modality_postprocessor_point.",
    )
    files = {
        "imagebind": {  # plain ImageBind names (modality_*), no point head
            k.removeprefix("backbone.bind."): v
            for k, v in sd.items()
            if k.startswith("backbone.bind.") and not k.startswith(point_path)
        },
        "unibind": {k: v for k, v in sd.items() if not k.startswith(point_path)},
        "pointbind": {  # Point-Bind's names (bind.*, point_encoder.*): the point path only
            k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith(point_path)
        },
    }
    paths = {}
    for name, d in files.items():
        paths[name] = tmp / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in d.items()}, str(paths[name]))
    return ib_cfg, pcfg, paths


def test_checkpoint_merge_is_order_free_and_conflicts_are_named(tmp_path: Path) -> None:
    from advcal.backbones import load

    ib_cfg, pcfg, p = _tiny_unibind_files(tmp_path)
    kw = {"imagebind_config": ib_cfg, "point_config": pcfg}
    x = torch.rand(2, 3, ib_cfg["image_size"], ib_cfg["image_size"])
    outs = []
    for order in (["unibind", "imagebind", "pointbind"], ["pointbind", "imagebind", "unibind"]):
        bb = load("unibind", checkpoint=[p[n] for n in order], **kw)
        assert "point" in bb.modalities and bb.head_modalities == ("image",)
        with torch.no_grad():
            outs.append(bb.encode("image", x))
    assert torch.equal(outs[0], outs[1])
    # the same key, different values, in two files: an error naming the key and both files
    sd = ib.read_checkpoint(p["imagebind"])
    key = "modality_heads.vision.2.weight"
    sd[key] = sd[key] + 1.0
    other = tmp_path / "other_imagebind.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(other))
    with pytest.raises(ib.CheckpointError, match=r"bind\.modality_heads\.vision\.2\.weight") as e:
        load("unibind", checkpoint=[p["unibind"], other], **kw)
    assert str(p["unibind"]) in str(e.value) and str(other) in str(e.value)
    # within one file, two spellings of one tensor must agree
    with pytest.raises(ValueError, match="both name"):
        ub.canonical_state_dict({"bind.modality_x": torch.zeros(2), "modality_x": torch.ones(2)})


def test_truncated_missing_and_unexpected_checkpoints(tmp_path: Path) -> None:
    from advcal.backbones import load

    ib_cfg, pcfg, p = _tiny_unibind_files(tmp_path)
    kw = {"imagebind_config": ib_cfg, "point_config": pcfg}
    data = p["unibind"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ib.CheckpointError, match="truncated"):
        load("unibind", checkpoint=cut, **kw)
    sd = ib.read_checkpoint(p["unibind"])
    gone = "backbone.bind.modality_trunks.vision.blocks.0.attn.in_proj_weight"
    miss = tmp_path / "missing.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if k != gone}, str(miss))
    with pytest.raises(ib.CheckpointError, match=r"missing keys: modality_trunks\.vision"):
        load("unibind", checkpoint=miss, **kw)
    extra = tmp_path / "extra.safetensors"
    save_file({**{k: v.contiguous() for k, v in sd.items()}, "foo.bar": torch.ones(1)}, str(extra))
    with pytest.raises(ValueError, match=r"unexpected keys: .*foo\.bar"):
        load("unibind", checkpoint=extra, **kw)
    head = {**{k: v.contiguous() for k, v in sd.items()}, "mlp_for_image.weight": torch.ones(3, 3)}
    bad_head = tmp_path / "bad_head.safetensors"
    save_file(head, str(bad_head))
    with pytest.raises(ValueError, match=r"mlp_for_image\.weight: checkpoint \(3, 3\)"):
        load("unibind", checkpoint=bad_head, **kw)


def test_released_i2pmae_point_path_is_dropped_with_the_note(tmp_path: Path, caplog) -> None:
    """A UniBind point fine-tune: I2P-MAE encoder + pc_projection + point head + mlp_for_point.
    Without PointBERT weights: no 'point', the other modalities work; with them: 'point'."""
    from advcal.backbones import load

    ib_cfg, pcfg, p = _tiny_unibind_files(tmp_path)
    sd = ib.read_checkpoint(p["unibind"])
    e = ib_cfg["out_embed_dim"]
    i2p = {
        "backbone.point_encoder.h_encoder.token_embed.0.first_conv.0.weight": torch.ones(4, 3, 1),
        "backbone.pc_projection": torch.ones(7, 512),
        "backbone.logit_scale": torch.tensor(1.0),
        "backbone.bind.modality_head_point.0.weight": torch.ones(512),
        "backbone.bind.modality_head_point.0.bias": torch.zeros(512),
        "backbone.bind.modality_head_point.2.weight": torch.ones(e, 512),
        "backbone.bind.modality_postprocessor_point.1.log_logit_scale": torch.tensor(0.0),
        "mlp_for_point.weight": torch.ones(e, e),
        "mlp_for_point.bias": torch.zeros(e),
    }
    rel = tmp_path / "point_model_best.safetensors"
    save_file({**{k: v.contiguous() for k, v in sd.items()}, **i2p}, str(rel))
    kw = {"imagebind_config": ib_cfg, "point_config": pcfg}
    with caplog.at_level(logging.WARNING, logger="advcal.backbones.unibind"):
        bb = load("unibind", checkpoint=rel, **kw)
    assert any("I2P-MAE" in r.message and "PointBERT" in r.message for r in caplog.records)
    assert set(bb.modalities) == {"image", "video", "audio", "thermal", "event"}
    assert bb.head_modalities == ("image",)  # mlp_for_point was trained on I2P-MAE features
    with pytest.raises(KeyError, match="mlp_for_point"):
        bb.head_weights("point")
    # the UniBind file's I2P-MAE point path does not clash with Point-Bind's PointBERT one
    both = load("unibind", checkpoint=[rel, p["pointbind"]], **kw)
    assert "point" in both.modalities
    with torch.no_grad():
        assert torch.isfinite(both.encode("point", torch.rand(1, 64, 3))).all()
