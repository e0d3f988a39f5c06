"""`advcal evaluate` and `advcal calibrate` end to end on miniature copies of every official
layout (advcal.data.miniature), with a tiny minibind whose transforms turn each benchmark's files
(JPEG, wav, mp4, point txt/h5, depth png, event bin/npz) into its input layouts.

Also: a run on a streamed dataset holds no split in memory (peak RSS bounded in a child
process), the clean-embedding cache is reused, and a corrupt file is named or, with
``--skip-bad``, skipped and counted in the report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import runkit

pytest.importorskip("PIL")
pytest.importorskip("soundfile")
pytest.importorskip("av")
pytest.importorskip("h5py")

from advcal.cli import main
from advcal.data import miniature

TINY_TOML = """
backbone = "minibind"
[backbone_kwargs]
embed_dim = 32
width = 4
epochs = 1
[calib]
epochs = 1
batch_size = 4
attack_steps = 1
[eval]
suite = ["apgd-ce:2", "apgd-t:2"]
compare = []
sweep = [1.0]
sweep_suite = ["apgd-ce:1"]
weak = ["pgd:1"]
retrieval_steps = 1
batch_size = 4
"""


def _imagenet(root: Path) -> str:
    miniature.make_imagenet(root, "folders")
    shutil.copytree(root / "val", root / "train")  # a calibration split for the plumbing
    return f"imagenet:{root}"


def _esc50(root: Path) -> str:
    miniature.make_esc50(root)
    return f"esc50:{root}?fold=5"


def _modelnet_txt(root: Path) -> str:
    return f"modelnet40:{miniature.make_modelnet40_txt(root)}"


def _modelnet_h5(root: Path) -> str:
    return f"modelnet40:{miniature.make_modelnet40_h5(root)}"


def _msrvtt(root: Path) -> str:
    miniature.make_msrvtt(root)
    return f"msrvtt:{root}?task=category"


def _nyud(root: Path) -> str:
    return f"nyud:{miniature.make_nyud(root)}"


def _llvip(root: Path) -> str:
    return f"llvip:{miniature.make_llvip(root)}"


def _ncaltech(root: Path) -> str:
    out = miniature.make_ncaltech101(root)
    return f"ncaltech101:{out}"


def _nimagenet(root: Path) -> str:
    return f"nimagenet:{miniature.make_nimagenet(root)}"


def _paired(root: Path) -> str:
    return f"paired:{miniature.make_paired(root)}"


LAYOUTS = {
    "imagenet": (_imagenet, "val"),
    "esc50": (_esc50, "test"),
    "modelnet40-txt": (_modelnet_txt, "test"),
    "modelnet40-h5": (_modelnet_h5, "test"),
    "msrvtt-category": (_msrvtt, "test"),
    "nyud": (_nyud, "test"),
    "llvip": (_llvip, "val"),
    "ncaltech101": (_ncaltech, "val"),
    "nimagenet": (_nimagenet, "val"),
    "paired": (_paired, "test"),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = runkit.cache(tmp_path_factory)
    root = tmp_path_factory.mktemp("layouts")
    (root / "tiny.toml").write_text(TINY_TOML)
    mp = pytest.MonkeyPatch()
    mp.setenv("ADVCAL_CACHE", str(cache))
    yield root
    mp.undo()


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_evaluate_and_calibrate_on_each_official_layout(env, name, capsys):
    make, split = LAYOUTS[name]
    spec = make(env / name)
    toml = str(env / "tiny.toml")
    out = env / f"{name}-eval"
    assert main(["evaluate", "--config", toml, "--data", spec, "--split", split,
                 "--out", str(out), "--quiet"]) == 0  # fmt: skip
    rep = _report(out)
    assert rep["data"]["split"] == split and rep["data"]["n"] >= 2
    assert rep["data"]["fingerprint"] and rep["data"]["source"].startswith(spec.split("?")[0])
    assert rep["provenance"]["data"]["test"]["fingerprint"] == rep["data"]["fingerprint"]
    for r in rep["modalities"].values():
        assert 0 <= r["robust_top1_before"] <= r["clean_top1_before"] <= 1
    out = env / f"{name}-run"
    argv = ["calibrate", "--config", toml, "--data", spec, "--split", split, "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    rep = _report(out)
    assert all(r["robust_top1_after"] is not None for r in rep["modalities"].values())
    assert (out / "heads.safetensors").is_file()
    capsys.readouterr()


def test_msrvtt_text_to_video_retrieval(env, capsys):
    """MSR-VTT's 1k-A split as what it is, a retrieval set: caption queries, the video
    gallery clean and under the ranking attack; calibration on it is refused by name."""
    root = env / "msrvtt-retrieval"
    miniature.make_msrvtt(root)
    toml = str(env / "tiny.toml")
    out = env / "msrvtt-retrieval-eval"
    argv = ["evaluate", "--config", toml, "--data", f"msrvtt:{root}", "--split", "test"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    rep = _report(out)
    assert rep["modalities"] == {} and rep["data"]["task"] == "retrieval"
    r = rep["retrieval"]["text->video"]["before"]
    assert set(r) == {"clean", "adv"}
    assert all(r["adv"][k] <= r["clean"][k] + 1e-9 for k in r["clean"])
    rc = main(["calibrate", "--config", toml, "--data", f"msrvtt:{root}", "--quiet",
               "--train-split", "test", "--out", str(env / "msrvtt-retrieval-run")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "retrieval set" in err and "task=category" in err


def test_corrupt_file_is_named_or_skipped_and_counted(env, capsys):
    root = env / "corrupt"
    miniature.make_imagenet(root, "folders")
    victim = sorted((root / "val").rglob("*.JPEG"))[1]
    victim.write_bytes(b"not a jpeg at all")
    toml = str(env / "tiny.toml")
    argv = ["evaluate", "--config", toml, "--data", f"imagenet:{root}", "--split", "val"]
    rc = main([*argv, "--out", str(env / "corrupt-eval"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and victim.name in err and "Traceback" not in err
    rc = main([*argv, "--out", str(env / "corrupt-skip"), "--quiet", "--skip-bad"])
    assert rc == 0
    rep = _report(env / "corrupt-skip")
    assert rep["data"]["skipped"] == 1
    assert rep["data"]["n"] == rep["data"]["of"] - 1


def test_clean_embeddings_are_cached_and_reused(env, tmp_path, monkeypatch):
    """The second calibration of the same backbone x data reads the cache (no encode pass)."""
    import advcal
    from advcal.calibrate import CalibConfig, Calibrator

    monkeypatch.setenv("ADVCAL_CACHE", str(tmp_path))
    bb = advcal.backbones.load("minibind", embed_dim=32, width=4, epochs=1, progress=False)
    monkeypatch.setenv("ADVCAL_CACHE", str(tmp_path / "emb"))
    data = advcal.data.open("digits", "train").subset(list(range(24)))
    centers = bb.centers(data.class_names, data.templates)
    calls = []
    real = bb.encode

    def counting(m, x, **kw):
        calls.append(len(x))
        return real(m, x, **kw)

    monkeypatch.setattr(bb, "encode", counting)
    first = Calibrator(bb, centers, ["image"], CalibConfig(epochs=1)).clean_embeddings(data)
    n_first = sum(calls)
    calls.clear()
    again = Calibrator(bb, centers, ["image"], CalibConfig(epochs=1)).clean_embeddings(data)
    assert n_first == 24 and sum(calls) == 0
    assert first["image"].path == again["image"].path and first["image"].path.is_file()
    import torch

    idx = torch.tensor([3, 0, 7])
    assert torch.equal(first["image"][idx], again["image"][idx])


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("cached", [False, True])
def test_every_rank_enters_the_cache_barrier(env, tmp_path, monkeypatch, rank, cached):
    """Under torchrun each rank calls the cache's barrier exactly once, whether or not it sees
    the files: a rank that looked after rank 0 had written them used to skip it and pair with
    the next collective instead (a hang until --dist-timeout, seen in CI)."""
    import advcal
    from advcal import distributed
    from advcal.calibrate import CalibConfig, Calibrator

    monkeypatch.setenv("ADVCAL_CACHE", str(tmp_path))
    bb = advcal.backbones.load("minibind", embed_dim=32, width=4, epochs=1, progress=False)
    monkeypatch.setenv("ADVCAL_CACHE", str(tmp_path / "emb"))
    data = advcal.data.open("digits", "train").subset(list(range(12)))
    centers = bb.centers(data.class_names, data.templates)
    if cached:  # the files exist before any rank looks (written by one process)
        Calibrator(bb, centers, ["image"], CalibConfig(epochs=1)).clean_embeddings(data)
    barriers = []

    def barrier():  # on rank 1, rank 0 writes the files while this rank waits here
        barriers.append(1)
        if rank == 1 and not cached:
            with monkeypatch.context() as m:
                m.setattr(distributed, "enabled", lambda: False)
                m.setattr(distributed, "is_main", lambda: True)
                Calibrator(bb, centers, ["image"], CalibConfig(epochs=1)).clean_embeddings(data)

    monkeypatch.setattr(distributed, "enabled", lambda: True)
    monkeypatch.setattr(distributed, "is_main", lambda: rank == 0)
    monkeypatch.setattr(distributed, "barrier", barrier)
    emb = Calibrator(bb, centers, ["image"], CalibConfig(epochs=1)).clean_embeddings(data)
    assert len(barriers) == 1 and emb["image"].path.is_file()


N_BIG = 24000  # 24000 x (3 x 32 x 32) float32 = 295 MB on disk
GROWTH_BOUND_MB = 30  # what one run may add to the child's peak resident memory (measured: 4-9)


@pytest.mark.slow
def test_streamed_run_holds_no_split_in_memory(env, tmp_path):
    """A dataset file 10x the allowed growth streams through calibration and evaluation in a
    child process whose peak resident memory grows by less than the bound: no code path holds
    a split (the old loader read the whole file, 295 MB, and copied its splits; a memory-mapped
    reader kept every page it touched resident: 340 MB at twice this size)."""
    import torch

    from advcal import data

    path = tmp_path / "big.safetensors"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N_BIG, 3, 32, 32, generator=g)
    labels = torch.arange(N_BIG) % 10
    data.save(data.MultiModalDataset({"image": x}, labels, tuple("abcdefghij"), name="big"), path)
    del x
    script = textwrap.dedent(
        f"""
        import resource
        import advcal
        from advcal.pipeline import RunConfig, run

        kw = {{"embed_dim": 32, "width": 4, "epochs": 1, "modalities": ["image"]}}
        advcal.backbones.load("minibind", progress=False, **kw)
        cfg = RunConfig.from_dict({{
            "backbone_kwargs": kw, "data": {str(path)!r}, "modalities": ["image"],
            "calib": {{"epochs": 1, "batch_size": 256, "attack_steps": 1}},
            "eval": {{"suite": ["pgd:1"], "compare": [], "sweep": [1.0],
                      "sweep_suite": ["pgd:1"], "weak": ["pgd:1"], "retrieval": False,
                      "batch_size": 256}},
        }})
        # the baseline: everything imported and built, one warm-up batch through the model
        run(cfg.replace(train_limit=512, test_limit=256), {str(tmp_path / "warm")!r},
            progress=False)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB
        rep = run(cfg, {str(tmp_path / "run")!r}, progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("GROWTH_MB", peak - base, rep["data"]["of"])
        """
    )
    env_vars = {**os.environ, "ADVCAL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env_vars, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("GROWTH_MB"))
    growth, n_test = float(line.split()[1]), int(line.split()[2])
    assert n_test == N_BIG // 4  # the file's seeded stratified test quarter, read in full
    assert growth < GROWTH_BOUND_MB, f"peak RSS grew {growth:.0f} MB streaming 295 MB"
