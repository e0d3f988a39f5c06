"""Provenance: what a report needs so its numbers can be traced and reproduced.

:func:`collect` returns the ``provenance`` table of ``report.json``: advcal's version and git
revision (when advcal runs from a git checkout), Python, torch, CUDA and the device's name,
the world size, the data's fingerprints (``ds.info.fingerprint`` of each split), the sha256
of every checkpoint file (or, for a backbone built without one, of its weights), the seeds,
the command line and the time.

Checkpoints of real Bind models are gigabytes: :func:`sha256_file` streams the file in 1 MiB
blocks (about 2 s per GB on one core) and caches the digest in
``$ADVCAL_CACHE/sha256.json`` keyed by real path, size and mtime, so only a changed file is
hashed again.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

BLOCK = 1 << 20  # 1 MiB reads: sha256 runs at disk speed, memory stays flat
CACHE_ENTRIES = 512  # digests kept in the cache file (oldest dropped first)
SUBSET_SEED = 0  # the seed of train_limit/test_limit subsets (pipeline._datasets)
# a backbone without a checkpoint file (minibind, wrapped encoders) is fingerprinted by its
# weights when it is small enough to hash quickly (~0.3 s per 100M fp32 parameters)
MAX_WEIGHT_HASH_PARAMS = 200_000_000


def cache_file() -> Path:
    root = os.environ.get("ADVCAL_CACHE") or Path.home() / ".cache" / "advcal"
    return Path(root) / "sha256.json"


def _load_cache() -> dict:
    import json

    try:
        d = json.loads(cache_file().read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):  # absent or damaged: a cache, never an error
        return {}


def _save_cache(cache: dict) -> None:
    from advcal import runfolder

    items = list(cache.items())[-CACHE_ENTRIES:]
    with contextlib.suppress(OSError):  # a read-only home: hash again next time
        runfolder.write_json(cache_file(), dict(items))


def sha256_file(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """sha256 hex of a file, streamed; cached by (real path, size, mtime_ns)."""
    p = Path(path)
    st = p.stat()
    key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache = _load_cache() if use_cache else {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    digest = h.hexdigest()
    if use_cache:
        cache.pop(key, None)
        cache[key] = digest
        _save_cache(cache)
    return digest


def checkpoint_files(checkpoint: str | os.PathLike | list | tuple | None) -> list[dict]:
    """``[{path, bytes, sha256}]`` for a checkpoint file, each file of a checkpoint folder
    (recursively, sorted), or each entry of a list; ``[]`` for None."""
    if checkpoint is None:
        return []
    entries = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
    out = []
    for entry in entries:
        p = Path(entry)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.is_file():
                out.append({"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)})
    return out


def weights_sha256(module: torch.nn.Module) -> str | None:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes), or None above
    :data:`MAX_WEIGHT_HASH_PARAMS` elements."""
    state = module.state_dict()
    if sum(t.numel() for t in state.values()) > MAX_WEIGHT_HASH_PARAMS:
        return None
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def git_revision(root: str | os.PathLike | None = None) -> dict | None:
    """``{"revision", "dirty"}`` of the git checkout advcal runs from, or None (an installed
    wheel, no git binary, not a checkout)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": rev, "dirty": bool(status.strip())}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str | torch.device) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return {
            "type": "cuda",
            "index": idx,
            "name": torch.cuda.get_device_name(idx),
            "capability": f"{major}.{minor}",
        }
    return {"type": dev.type, "name": _cpu_name() if dev.type == "cpu" else dev.type}


def dataset_info(ds: Any) -> dict:
    """A split's identity: name, source, split, size and content fingerprint."""
    info = getattr(ds, "info", None)
    out: dict[str, Any] = {"samples": len(ds)}
    if info is not None:
        out.update(
            name=info.name, source=info.source, split=info.split, fingerprint=info.fingerprint
        )
    else:
        out["name"] = getattr(ds, "name", type(ds).__name__)
    return out


def collect(
    config: Any,
    *,
    backbone: torch.nn.Module | None = None,
    datasets: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    world_size: int = 1,
) -> dict:
    """The ``provenance`` table of a report. ``config`` is the run's ``RunConfig``."""
    from advcal import __version__

    checkpoints = checkpoint_files(getattr(config, "checkpoint", None))
    out: dict[str, Any] = {
        "advcal": __version__,
        "git": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device_info(device),
        "world_size": world_size,
        "data": {k: dataset_info(v) for k, v in (datasets or {}).items()},
        "checkpoints": checkpoints,
        "seeds": {
            "calib": getattr(getattr(config, "calib", None), "seed", None),
            "eval": getattr(getattr(config, "eval", None), "seed", None),
            "subset": SUBSET_SEED,
        },
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else [],
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if not checkpoints and backbone is not None:
        out["backbone_weights_sha256"] = weights_sha256(backbone)
    return out


__all__ = [
    "checkpoint_files",
    "collect",
    "dataset_info",
    "device_info",
    "git_revision",
    "sha256_file",
    "weights_sha256",
]
