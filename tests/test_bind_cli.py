"""The CLI end to end on tiny checkpoints of the three Bind families, through the real loaders.

Acceptance tests of two issues:

* ``advcal calibrate --backbone imagebind_huge --checkpoint PATH ...`` runs end to end on a
  tiny config (a ``.pth`` the test writes), and the run folder it leaves is evaluated again by
  ``advcal evaluate --run DIR`` (the config round-trips through ``config.json``).
* ``advcal evaluate`` runs on tiny checkpoints of imagebind_huge, languagebind_* and unibind,
  each written in the released format its loader reads (ImageBind safetensors; LanguageBind
  HF directories ``LanguageBind_<Tower>/`` with ``config.json`` + ``model.safetensors``;
  UniBind one merged weights file), and writes the standard report.

Every checkpoint is random-initialised from a tiny config (no fixture needed); every dataset is
a small :class:`MultiModalDataset` file (``advcal.data.save``) whose inputs fit the backbone's
InputSpecs, with image + one non-vision modality per family. The protocol is as cheap as the
configs allow (1 epoch, 1 attack step everywhere), so this checks plumbing, not robustness.
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tolerances import FP32

from advcal import backbones
from advcal.backbones import imagebind as ib
from advcal.backbones import languagebind as lb
from advcal.backbones import unibind as ub
from advcal.cli import main
from advcal.data import MultiModalDataset, save
from advcal.pipeline import load_run

CLASSES = ("dog", "cat", "bird")
N = 9  # samples: 3 per class
FREE = {"audio": 7680, "point": 256}  # sizes of the free (-1) spec dims, per modality

# tiny configs, as a user would write them in [backbone_kwargs] of the TOML
IB_TINY = ib.imagebind_tiny(out_embed_dim=24).to_kwargs()
LB_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 24,
}
LB_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "hidden_act": "quick_gelu",
    "lora_r": 0,
    "projection_dim": 24,
}
LB_TOWERS = {  # tower -> vision_config overrides (the audio tower: 32 mel x 48 frames)
    "image": {},
    "audio": {"num_mel_bins": 32, "target_length": 48},
    "video": {"add_time_attn": True, "num_frames": 2},
}
PB_TINY = {
    "trans_dim": 32,
    "depth": 1,
    "num_heads": 2,
    "group_size": 8,
    "num_group": 16,
    "encoder_dims": 32,
}

# the cheapest protocol the configs accept
PROTOCOL = """
[calib]
epochs = 1
batch_size = 8
attack_steps = 1

[eval]
suite = ["apgd-ce:1", "apgd-t:1"]
compare = []
sweep_suite = ["apgd-ce:1"]
weak = ["pgd:1"]
retrieval_steps = 1
batch_size = 8
"""


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: intra-op threads only add sync overhead (100x on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- writing the files a user would have -----------------------------------------------------
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {v!r}")


def write_config(path: Path, backbone_kwargs: dict) -> Path:
    lines = ["[backbone_kwargs]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in backbone_kwargs.items()]
    path.write_text("\n".join(lines) + "\n" + PROTOCOL)
    return path


def write_dataset(path: Path, bb: backbones.Backbone, modalities: tuple[str, ...]) -> Path:
    """``N`` samples of ``modalities`` inside each spec's valid range, 3 classes."""
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for m in modalities:
        spec = bb.spec(m)
        shape = tuple(FREE[m] if s == -1 else s for s in spec.shape)
        if spec.lo is None or spec.hi is None:
            lo, hi = -1.0, 1.0
        else:
            lo, hi = spec.lo, spec.hi
        inputs[m] = lo + (hi - lo) * torch.rand((N, *shape), generator=g)
    labels = torch.arange(N) % len(CLASSES)
    ds = MultiModalDataset(inputs, labels, CLASSES, name="tiny", templates=("a photo of a {}.",))
    save(ds, path)
    return path


def imagebind_checkpoint(tmp: Path, fmt: str) -> tuple[Path, dict]:
    """The official ImageBind state_dict of a tiny config, as ``.pth`` or safetensors."""
    torch.manual_seed(1)
    sd = ib.ImageBind(ib.ImageBindConfig(**IB_TINY)).state_dict()
    if fmt == "pth":
        path = tmp / "imagebind_tiny.pth"
        torch.save(sd, path)
    else:
        path = tmp / "imagebind_tiny.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, {"config": IB_TINY}


def languagebind_checkpoint(tmp: Path, towers=("image", "audio")) -> tuple[Path, dict]:
    """A root holding ``LanguageBind_Image/``, ``LanguageBind_Audio_FT/``, ... as released
    (HF ``config.json`` + ``model.safetensors``); the towers share one text tower."""
    root = tmp / "languagebind"
    text_sd: dict[str, torch.Tensor] | None = None
    for i, tower in enumerate(towers):
        extra = LB_TOWERS[tower]
        cfg = {
            "text_config": LB_TEXT,
            "vision_config": {**LB_VISION, **extra},
            "projection_dim": 24,
        }
        torch.manual_seed(10 + i)
        sd = lb.LanguageBindModel(lb.LanguageBindConfig.from_dict(cfg)).state_dict()
        if text_sd is None:
            text_sd = {k: v for k, v in sd.items() if k.startswith("text_")}
        sd.update(text_sd)  # the released towers carry identical text weights
        d = root / f"LanguageBind_{tower.capitalize()}{'_FT' if tower != 'image' else ''}"
        d.mkdir(parents=True)
        hf = {**cfg, "architectures": [f"LanguageBind{tower.capitalize()}"]}
        hf["torch_dtype"] = "float32"
        (d / "config.json").write_text(json.dumps(hf))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return root, {}


def unibind_checkpoint(tmp: Path) -> tuple[Path, dict]:
    """UniBind's layout (``backbone.bind.*``, ``backbone.point_encoder.*``, ``mlp_for_<m>``)
    in one safetensors file."""
    torch.manual_seed(2)
    model = ub.UniBind(
        ib.ImageBind(ib.ImageBindConfig(**IB_TINY)), PB_TINY, ["image", "point"], pc_feat_dims=64
    )
    path = tmp / "unibind_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, {"imagebind_config": IB_TINY, "point_config": PB_TINY}


FAMILIES = {  # backbone name -> (checkpoint writer, dataset modalities)
    "imagebind_huge": (lambda tmp: imagebind_checkpoint(tmp, "safetensors"), ("image", "imu")),
    "languagebind_all": (languagebind_checkpoint, ("image", "audio")),
    # one tower by name, its HF directory as --checkpoint (the video tower: time attention)
    "languagebind_video_ft": (
        lambda tmp: (languagebind_checkpoint(tmp, ("video",))[0] / "LanguageBind_Video_FT", {}),
        ("video",),
    ),
    "unibind": (unibind_checkpoint, ("image", "point")),
}


def prepare(tmp: Path, name: str, ckpt: Path, kwargs: dict, modalities) -> tuple[Path, Path]:
    """Write the dataset (shaped by the loaded backbone's specs) and the TOML config."""
    bb = backbones.load(name, checkpoint=ckpt, **kwargs)
    data = write_dataset(tmp / "data.safetensors", bb, modalities)
    return data, write_config(tmp / "run.toml", kwargs)


def read_report(out: Path) -> dict:
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    return json.loads((out / "report.json").read_text())


def check_report(rep: dict, name: str, modalities, *, calibrated: bool) -> None:
    assert rep["backbone"] == name
    assert rep["config"]["backbone"] == name
    assert sorted(rep["run"]["modalities"]) == sorted(modalities)  # as resolved
    assert rep["config"]["eval"]["suite"] == [
        {"name": "apgd-ce", "steps": 1, "restarts": 1, "n_targets": None, "alpha_ratio": None},
        {"name": "apgd-t", "steps": 1, "restarts": 1, "n_targets": None, "alpha_ratio": None},
    ]
    assert set(rep["modalities"]) == set(modalities)
    after = ("clean_top1_after", "clean_top5_after", "robust_top1_after", "robust_top5_after")
    for m in modalities:
        r = rep["modalities"][m]
        for k in ("clean_top1_before", "clean_top5_before", "robust_top1_before"):
            assert 0.0 <= r[k] <= 1.0, (m, k, r[k])
        assert r["clean_top5_before"] == 1.0  # 3 classes: top-5 is everything
        assert r["robust_top1_before"] <= r["clean_top1_before"]
        assert r["eps"] > 0 and math.isfinite(r["eps"])
        assert len(r["sweep_before"]) == 4
        for k in after:
            assert (r[k] is not None) == calibrated, (m, k)
    pairs = rep["retrieval"]
    assert pairs, "two paired modalities give retrieval results"
    for res in pairs.values():
        for kind in ("clean", "adv"):
            assert all(0.0 <= v <= 1.0 for v in res["before"][kind].values())
        assert (res["after"] is not None) == calibrated
    # a check that cannot run here (no black-box attack in this suite) is None, never a pass
    assert rep["sanity"] and all(v is None or isinstance(v, bool) for v in rep["sanity"].values())
    assert all(v is None for k, v in rep["sanity"].items() if "black_box" in k)
    assert any(k.startswith("after.") for k in rep["sanity"]) == calibrated
    assert rep["backbone_params"] > 0
    assert (rep["trainable_params"] > 0) == calibrated
    assert rep["timings"] and all(v >= 0 for v in rep["timings"].values())


# -- the acceptance tests ---------------------------------------------------------------------
def test_calibrate_imagebind_huge_end_to_end(tmp_path: Path) -> None:
    """Issue 1: ``advcal calibrate --backbone imagebind_huge --checkpoint X.pth`` on a tiny
    config, then ``advcal evaluate --run`` on the run folder it wrote."""
    ckpt, kwargs = imagebind_checkpoint(tmp_path, "pth")
    mods = ("image", "imu")
    data, toml = prepare(tmp_path, "imagebind_huge", ckpt, kwargs, mods)
    out = tmp_path / "run"
    argv = ["calibrate", "--config", str(toml), "--backbone", "imagebind_huge"]
    argv += ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0

    rep = read_report(out)
    check_report(rep, "imagebind_huge", mods, calibrated=True)
    assert rep["config"]["checkpoint"] == str(ckpt)
    assert rep["config"]["backbone_kwargs"]["config"]["vision_embed_dim"] == 32
    assert rep["config"]["calib"]["epochs"] == 1
    assert {"load_backbone", "eval_before", "calibrate", "eval_after"} <= set(rep["timings"])
    assert (out / "heads.safetensors").is_file() and (out / "config.json").is_file()
    n_params = sum(p.numel() for p in ib.ImageBind(ib.ImageBindConfig(**IB_TINY)).parameters())
    assert rep["backbone_params"] == n_params

    # the run folder alone rebuilds the model (config.json -> the same tiny config)
    assert main(["evaluate", "--run", str(out), "--no-progress"]) == 0
    again = read_report(out / "eval")
    check_report(again, "imagebind_huge", mods, calibrated=True)
    assert again["trainable_params"] == rep["trainable_params"]
    for m in mods:  # clean accuracies are deterministic: the same heads give the same numbers
        assert (
            again["modalities"][m]["clean_top1_after"] == rep["modalities"][m]["clean_top1_after"]
        )


@pytest.mark.parametrize("name", list(FAMILIES))
def test_evaluate_each_family(tmp_path: Path, name: str) -> None:
    """Issue 2: ``advcal evaluate`` on a tiny checkpoint of each family, standard report."""
    write_ckpt, mods = FAMILIES[name]
    ckpt, kwargs = write_ckpt(tmp_path)
    data, toml = prepare(tmp_path, name, ckpt, kwargs, mods)
    out = tmp_path / "eval"
    argv = ["evaluate", "--config", str(toml), "--backbone", name, "--checkpoint", str(ckpt)]
    argv += ["--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0

    rep = read_report(out)
    check_report(rep, name, mods, calibrated=False)
    assert rep["config"]["checkpoint"] == str(ckpt)
    assert rep["config"]["backbone_kwargs"] == json.loads(json.dumps(kwargs))
    assert "evaluate" in rep["timings"]
    bb = backbones.load(name, checkpoint=ckpt, **kwargs)
    assert rep["backbone_params"] == bb.num_params()


def test_evaluate_wrong_config_is_a_clean_error(tmp_path: Path, capsys) -> None:
    """A tiny checkpoint without its ``config`` (huge sizes assumed): exit 2, naming the fix."""
    ckpt, kwargs = imagebind_checkpoint(tmp_path, "safetensors")
    data, _ = prepare(tmp_path, "imagebind_huge", ckpt, kwargs, ("image",))
    argv = ["evaluate", "--backbone", "imagebind_huge", "--checkpoint", str(ckpt)]
    argv += ["--data", str(data), "--out", str(tmp_path / "eval"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "advcal evaluate: error:" in err and "config=" in err
    assert not (tmp_path / "eval" / "report.json").exists()


# -- convert-centers ---------------------------------------------------------------------------
def _centre_pickle(tmp: Path) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(4)
    obj = {c: torch.randn(5, 24, generator=g) for c in CLASSES}  # UniBind: {label: (n, D)}
    src = tmp / "centres.pkl"
    src.write_bytes(pickle.dumps(obj))
    return src, obj


def test_convert_centers_needs_trust_pickle(tmp_path: Path, capsys) -> None:
    """Without --trust-pickle: exit 2, one line naming the flag, nothing written."""
    src, _ = _centre_pickle(tmp_path)
    dst = tmp_path / "centres.safetensors"
    assert main(["convert-centers", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advcal convert-centers: error:") and "--trust-pickle" in err
    assert "Traceback" not in err and not dst.exists()
    # the installed entry point behaves the same in a fresh process (no traceback)
    proc = subprocess.run(
        [sys.executable, "-m", "advcal.cli", "convert-centers", str(src), str(dst)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--trust-pickle" in proc.stderr
    assert "Traceback" not in proc.stderr and not dst.exists()


def test_convert_centers_with_trust_pickle_writes_loadable_safetensors(
    tmp_path: Path, capsys
) -> None:
    src, obj = _centre_pickle(tmp_path)
    dst = tmp_path / "out" / "centres.safetensors"
    assert main(["convert-centers", str(src), str(dst), "--trust-pickle"]) == 0
    assert "15 centres of width 24 for 3 classes" in capsys.readouterr().out
    mc = ub.load_centers(dst)
    assert mc.class_names == list(CLASSES)
    assert mc.labels.tolist() == [i for i in range(len(CLASSES)) for _ in range(5)]
    want = torch.nn.functional.normalize(torch.cat([obj[c] for c in CLASSES]), dim=-1)
    torch.testing.assert_close(mc.centers, want, **FP32)
    # a missing source is a clean error too
    assert main(["convert-centers", str(tmp_path / "absent.pkl"), str(dst), "--trust-pickle"]) == 2
    assert "not found" in capsys.readouterr().err


def test_calibrate_unibind_with_its_multi_centers(tmp_path: Path, capsys) -> None:
    """UniBind's workflow: convert its centre pickle once, then calibrate + evaluate with the
    multi-center file (a class scores its nearest centre) through the real loader."""
    ckpt, kwargs = unibind_checkpoint(tmp_path)
    mods = ("image", "point")
    data, toml = prepare(tmp_path, "unibind", ckpt, kwargs, mods)
    src, _ = _centre_pickle(tmp_path)
    centres = tmp_path / "centres.safetensors"
    assert main(["convert-centers", str(src), str(centres), "--trust-pickle"]) == 0
    out = tmp_path / "run"
    argv = ["calibrate", "--config", str(toml), "--backbone", "unibind", "--checkpoint", str(ckpt)]
    argv += ["--data", str(data), "--centers", str(centres), "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    rep = read_report(out)
    check_report(rep, "unibind", mods, calibrated=True)
    assert rep["config"]["centers"] == str(centres)
    assert "15 centers for 3 classes" in rep["run"]["centers"]
    # the rebuilt run scores with the same multi-centers
    run = load_run(out)
    clf = run.classifier("image")
    assert clf.multi_center and clf.centers.shape[0] == 15 and clf.num_classes == 3


def test_linear_heads_start_from_unibinds_released_heads(tmp_path: Path) -> None:
    """head_init='backbone': a linear calibration head initialised from UniBind's released
    mlp_for_<m> reproduces UniBind's own head (encode_vision_with_mlp) before any training."""
    from advcal.attacks import ZeroShotClassifier
    from advcal.calibrate import CalibConfig, Calibrator

    ckpt, kwargs = unibind_checkpoint(tmp_path)
    plain = backbones.load("unibind", checkpoint=ckpt, **kwargs)
    with_heads = backbones.load("unibind", checkpoint=ckpt, apply_heads=True, **kwargs)
    centers = plain.centers(list(CLASSES))
    cfg = CalibConfig(head_kind="linear", head_init="backbone")
    cal = Calibrator(plain, centers, ["image"], cfg)
    assert cal.initialised_from == ["image"]
    x = torch.rand(3, *plain.spec("image").shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = ZeroShotClassifier(plain, "image", centers, cal.heads["image"])(x)
        theirs = ZeroShotClassifier(with_heads, "image", centers)(x)
        identity = ZeroShotClassifier(plain, "image", centers)(x)
    torch.testing.assert_close(ours, theirs, **FP32)
    assert (ours - identity).abs().max() > 1e-3, "the released head changes the logits"
    with pytest.raises(ValueError, match="needs head_kind='linear'"):
        CalibConfig(head_init="backbone")
