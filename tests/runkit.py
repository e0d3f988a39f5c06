"""Shared pieces of the run-folder tests: the tiny run, a folder snapshot, the cache."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import torch


def _cheapest_eval() -> dict:
    """The cheapest evaluation protocol EvalConfig takes: one-step attacks, one sweep point,
    no retrieval."""
    return {
        "suite": ["pgd:1"],
        "compare": [],
        "sweep": [1.0],
        "sweep_suite": ["pgd:1"],
        "weak": ["pgd:1"],
        "retrieval": False,
        "batch_size": 16,
    }


# the cheapest real run: minibind (width 4, 1 pretraining epoch) on two digits modalities,
# 2 calibration epochs of 3 batches (2 checkpoints), 1-step attacks; ~3 s on one core
TINY: dict = {
    "backbone_kwargs": {"embed_dim": 32, "width": 4, "epochs": 1, "modalities": ["image", "audio"]},
    "modalities": ["image", "audio"],
    "train_limit": 48,
    "test_limit": 16,
    "calib": {"epochs": 2, "batch_size": 16, "attack_steps": 1},
    "eval": _cheapest_eval(),
}


def cache(tmp_path_factory) -> Path:
    """One minibind weights cache for the whole session (pretraining the tiny one: ~4 s)."""
    path = tmp_path_factory.getbasetemp() / "advcal-cache"
    path.mkdir(exist_ok=True)
    return path


def write_config(path: Path, cfg: dict | None = None) -> Path:
    path.write_text(json.dumps(TINY if cfg is None else cfg))
    return path


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` (hidden ones too): sha256 of its bytes and its mode."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(folder))] = (digest, stat.S_IMODE(p.stat().st_mode))
    return out


def heads_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_heads(a: Path, b: Path) -> None:
    ta, tb = heads_tensors(a), heads_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs: max {(ta[k] - tb[k]).abs().max()}"


def without_timings(d):
    """A report or evaluation without its wall-clock timings (``seconds*`` keys): what a
    rerun must reproduce exactly."""
    if isinstance(d, dict):
        return {k: without_timings(v) for k, v in d.items() if not str(k).startswith("seconds")}
    if isinstance(d, list):
        return [without_timings(v) for v in d]
    return d


def env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "ADVCAL_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
