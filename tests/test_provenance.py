"""Provenance in report.json, and a run's config (config.json or report.json) fed back as
``--config`` reproducing the run bitwise."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import runkit
import torch

import advcal
from advcal import provenance
from advcal.cli import main
from advcal.pipeline import RunConfig, run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    cache = runkit.cache(tmp_path_factory)
    mp = pytest.MonkeyPatch()
    mp.setenv("ADVCAL_CACHE", str(cache))
    out = tmp_path_factory.mktemp("prov") / "run"
    try:
        rep = run(RunConfig.from_dict(runkit.TINY), out, progress=False)
        yield out, rep
    finally:
        mp.undo()


def test_report_carries_provenance(finished):
    out, _ = finished
    on_disk = json.loads((out / "report.json").read_text())
    p = on_disk["provenance"]
    assert p["advcal"] == advcal.__version__ and p["torch"] == torch.__version__
    assert p["python"].count(".") == 2 and p["cuda"] == torch.version.cuda
    assert p["device"]["type"] == "cpu" and p["device"]["name"]
    assert p["world_size"] == 1
    assert p["seeds"] == {"calib": 0, "eval": 1234, "subset": 0}
    for split in ("train", "test"):
        d = p["data"][split]
        assert d["source"] == "digits" and len(d["fingerprint"]) == 64 and d["samples"] > 0
    assert p["data"]["train"]["fingerprint"] != p["data"]["test"]["fingerprint"]
    sha = hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest()
    assert p["checkpoint_pt_sha256"] == sha
    assert p["heads_sha256"] == hashlib.sha256((out / "heads.safetensors").read_bytes()).hexdigest()
    assert p["checkpoints"] == [] and len(p["backbone_weights_sha256"]) == 64  # minibind: weights
    if (Path(advcal.__file__).resolve().parents[1] / ".git").exists() and shutil.which("git"):
        assert len(p["git"]["revision"]) == 40 and isinstance(p["git"]["dirty"], bool)
    # the resolved modalities and centers live beside the config, not in it
    assert (
        on_disk["run"]["modalities"] == ["image", "audio"]
        and "text centers" in (on_disk["run"]["centers"])
    )
    assert "centers_used" not in on_disk["config"]


@pytest.mark.parametrize("which", ["config.json", "report.json"])
def test_config_fed_back_reproduces_the_run_bitwise(finished, tmp_path, which, capsys):
    out, _ = finished
    again = tmp_path / "again"
    assert main(["calibrate", "--config", str(out / which), "--out", str(again), "--quiet"]) == 0
    capsys.readouterr()
    runkit.assert_same_heads(out / "heads.safetensors", again / "heads.safetensors")
    a = json.loads((out / "report.json").read_text())
    b = json.loads((again / "report.json").read_text())
    assert a["config"] == b["config"]
    assert runkit.without_timings(a["modalities"]) == runkit.without_timings(
        b["modalities"]
    )  # every metric, not timings
    assert json.loads((again / "config.json").read_text()) == json.loads(
        (out / "config.json").read_text()
    )


def test_sha256_streamed_and_cached_by_path_size_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVCAL_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "ckpt.bin"
    data = os.urandom(3 * provenance.BLOCK + 17)  # several blocks and a tail
    f.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert provenance.sha256_file(f) == want
    cached = json.loads(provenance.cache_file().read_text())
    assert list(cached.values()) == [want] and str(f.resolve()) in next(iter(cached))
    # a cache hit does not read the file: prove it by making reading fail
    monkeypatch.setattr(provenance, "open", lambda *a, **k: 1 / 0, raising=False)
    assert provenance.sha256_file(f) == want
    monkeypatch.undo()
    monkeypatch.setenv("ADVCAL_CACHE", str(tmp_path / "cache"))
    f.write_bytes(data[:-1])  # size (and mtime) change: hashed again
    assert provenance.sha256_file(f) == hashlib.sha256(data[:-1]).hexdigest()


def test_checkpoint_files_of_a_folder_and_a_list(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVCAL_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "LanguageBind_Image"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "model.safetensors").write_bytes(b"abc")
    one = tmp_path / "x.pt"
    one.write_bytes(b"xyz")
    got = provenance.checkpoint_files([str(d), one])
    assert [g["path"] for g in got] == [
        str(d / "config.json"),
        str(d / "sub" / "model.safetensors"),
        str(one),
    ]
    assert got[2] == {"path": str(one), "bytes": 3, "sha256": hashlib.sha256(b"xyz").hexdigest()}
    assert provenance.checkpoint_files(None) == []


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary")
def test_git_revision_of_a_checkout(tmp_path):
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    assert provenance.git_revision(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "f").write_text("1")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    rev = git("rev-parse", "HEAD")
    assert provenance.git_revision(tmp_path) == {"revision": rev, "dirty": False}
    (tmp_path / "f").write_text("2")
    assert provenance.git_revision(tmp_path) == {"revision": rev, "dirty": True}


def test_weights_sha256_sees_one_changed_value():
    m = torch.nn.Linear(3, 2)
    a = provenance.weights_sha256(m)
    with torch.no_grad():
        m.bias[0] += 1e-7
    assert provenance.weights_sha256(m) != a and len(a) == 64
