"""Loads the optional compiled extension ``advcal._C`` once.

The extension registers ``torch.ops.advcal.*`` (C++ on CPU, CUDA kernels in CUDA builds); the
Python module itself is empty. If it is missing or fails to load, one warning says why and
every op runs its plain-PyTorch reference instead. ``advcal info`` shows :func:`available`,
:func:`why_unavailable` and :func:`has_kernel`.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings

import torch

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None, "warned": False}
_kernels: dict[tuple[str, str], bool] = {}


def load(warn: bool = True):
    """The loaded ``advcal._C`` module, or None (with one warning, the first time, if ``warn``)."""
    if _state["tried"] and (_state["module"] is not None or _state["warned"] or not warn):
        return _state["module"]  # fast path, lock-free (also traceable by torch.compile)
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            if os.environ.get("ADVCAL_DISABLE_EXT", "0") == "1":
                _state["error"] = "disabled by ADVCAL_DISABLE_EXT=1"
            else:
                try:
                    _state["module"] = importlib.import_module("advcal._C")
                except Exception as exc:  # ImportError, OSError (undefined symbol, ABI), ...
                    _state["error"] = (
                        f"{type(exc).__name__}: {exc}. Build it with "
                        "`pip install --no-build-isolation -e .` (see setup.py)"
                    )
        if _state["module"] is None and warn and not _state["warned"]:
            _state["warned"] = True
            warnings.warn(
                f"advcal._C is not available ({_state['error']}); advcal ops run their "
                "plain-PyTorch references",
                RuntimeWarning,
                stacklevel=3,
            )
        return _state["module"]


def available() -> bool:
    """Whether ``advcal._C`` loaded (no warning)."""
    return load(warn=False) is not None


def why_unavailable() -> str | None:
    """Why ``advcal._C`` did not load, or None when it did."""
    load(warn=False)
    return _state["error"]


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``advcal::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    key = (op, dispatch_key)
    if key not in _kernels:
        _kernels[key] = available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"advcal::{op}", dispatch_key
        )
    return _kernels[key]


def info() -> dict[str, object]:
    """For ``advcal info``: what was built."""
    ok = available()
    return {
        "extension": "loaded" if ok else f"unavailable: {why_unavailable()}",
        "cpu_kernels": ok and has_kernel("pgd_step_", "CPU"),
        "cuda_kernels": ok and has_kernel("pgd_step_", "CUDA"),
    }
