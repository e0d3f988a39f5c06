"""End to end on a small subset: digits + a tiny minibind, through the real pipeline and CLI."""

import json

import pytest
import torch

import advcal
from advcal.cli import main
from advcal.pipeline import RunConfig, load_run, run

TINY = {
    "backbone_kwargs": {
        "embed_dim": 32,
        "width": 4,
        "epochs": 1,
        "modalities": ["image", "audio", "point"],
    },
    "modalities": ["image", "audio", "point"],
    "train_limit": 64,
    "test_limit": 24,
    "calib": {"epochs": 1, "batch_size": 32, "attack_steps": 2},
    "eval": {
        "suite": ["apgd-ce:2", "apgd-t:2", "square:20"],
        "sweep_suite": ["apgd-ce:2"],
        "weak": ["pgd:2", "crossmaxim:2"],
        "retrieval_steps": 2,
        "batch_size": 16,
    },
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("ADVCAL_CACHE")
    os.environ["ADVCAL_CACHE"] = str(cache)
    out = tmp_path_factory.mktemp("run")
    try:
        rep = run(RunConfig.from_dict(TINY), out, progress=False)
        yield out, rep
    finally:
        if old is None:
            os.environ.pop("ADVCAL_CACHE", None)
        else:
            os.environ["ADVCAL_CACHE"] = old


def test_report_has_every_required_field(finished_run):
    out, _ = finished_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["backbone"] == "minibind"
    for key in (
        "config",
        "modalities",
        "retrieval",
        "sanity",
        "trainable_params",
        "backbone_params",
        "timings",
    ):
        assert key in on_disk, key
    assert on_disk["config"]["calib"]["epochs"] == 1 and "eval" in on_disk["config"]
    for m in TINY["modalities"]:
        r = on_disk["modalities"][m]
        for k in ("clean_top1", "robust_top1", "clean_top5", "robust_top5"):
            for when in ("before", "after"):
                assert 0.0 <= r[f"{k}_{when}"] <= 1.0
        assert r["eps"] > 0
        assert list(r["attacks_before"]) == ["apgd-ce-2", "apgd-t-2", "square-20q"]
        assert set(r["compare_before"]) == {"legacy"}
        assert r["n"] == 24
    assert all(isinstance(v, bool) for v in on_disk["sanity"].values())
    assert "image->audio" in on_disk["retrieval"]
    md = (out / "report.md").read_text()
    assert md.startswith("# advcal report")
    t = on_disk["timings"]  # the data loaders' wait is part of the phases, not beside them
    total = sum(v for k, v in t.items() if k != "data_wait")
    assert 0 < t["data_wait"] < t["calibrate"] + t["eval_before"] + t["eval_after"]
    assert f"of the wall time ({total:.0f} s), waiting for data" in md
    assert (out / "robust_vs_eps.png").stat().st_size > 1000
    assert 0 < on_disk["trainable_params"] < on_disk["backbone_params"] * 10


def test_load_run_gives_attackable_classifiers(finished_run):
    out, _ = finished_run
    r = load_run(out)
    test = r.dataset("test")
    x, y = test.inputs["image"][:8], test.labels[:8]
    cal, frozen = r.classifier("image"), r.classifier("image", calibrated=False)
    assert isinstance(cal, torch.nn.Module)
    assert cal(x).shape == (8, test.num_classes)
    assert not torch.equal(cal(x), frozen(x))  # trained heads differ from identity
    # any attack library can drive it: a plain FGSM written against nn.Module
    x_req = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(cal(x_req), y).backward()
    assert x_req.grad is not None and x_req.grad.abs().sum() > 0
    x_adv = advcal.PGD(cal, steps=2)(x, y)
    assert (x_adv - x).abs().max() <= cal.spec.eps + 1e-6


def test_resume_skips_finished_phases_and_rejects_other_config(finished_run, tmp_path):
    out, rep = finished_run
    again = run(RunConfig.from_dict(TINY), out, resume=True, progress=False)
    assert again["timings"]["eval_before"] == 0.0  # loaded, not recomputed
    assert again["modalities"]["image"]["robust_top1_after"] == pytest.approx(
        rep["modalities"]["image"]["robust_top1_after"]
    )
    other = RunConfig.from_dict({**TINY, "test_limit": 20})
    with pytest.raises(ValueError, match="different config"):
        run(other, out, resume=True, progress=False)


def test_cli_evaluate_run_and_info(finished_run, capsys, tmp_path):
    out, _ = finished_run
    assert (
        main(["evaluate", "--run", str(out), "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    )
    assert "| image |" in capsys.readouterr().out
    assert (tmp_path / "ev" / "report.json").is_file()
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backends" in text or "ops:" in text


def test_config_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown key"):
        RunConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="unknown key"):
        RunConfig.from_dict({"calib": {"lr": 1e-3, "bogus": 1}})
    bad = tmp_path / "c.toml"
    bad.write_text("backbone = \n")
    assert main(["calibrate", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "invalid TOML" in capsys.readouterr().err
    assert main(["calibrate", "--backbone", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown backbone 'nope'" in capsys.readouterr().err
