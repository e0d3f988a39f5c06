"""The one dispatcher (advcal.ops._dispatch): ADVCAL_BACKEND validation, the meaning of a
backend name an op lacks, and what `advcal info` reports per device."""

from __future__ import annotations

import importlib

import pytest
import torch

import advcal.ops  # noqa: F401  (registers every op)
from advcal.ops import _dispatch

HEAD = importlib.import_module("advcal.ops.head_ce")
FUSED = ("head_ce", "head_logits", "head_target_cos", "infonce")


@pytest.fixture
def fake_op(monkeypatch):
    """A registered op with a fast 'triton' backend that always fits, and the reference."""
    calls = []
    backends = [
        _dispatch.Backend("triton", lambda x: calls.append("triton") or x, lambda x: None),
        _dispatch.Backend("ref", lambda x: calls.append("ref") or x, lambda x: None),
    ]
    monkeypatch.setitem(_dispatch._OPS, "fake_op", tuple(backends))
    return calls


def test_backend_names_are_the_union_of_registered_backends():
    names = _dispatch.backend_names()
    assert {"triton", "ref", "cuda", "cpp"} <= set(names)
    assert names == tuple(sorted(set(names)))


@pytest.mark.parametrize("typo", ["tritn", "gpu", "reference", "cuda,ref"])
def test_unknown_backend_raises_naming_the_valid_ones(typo, monkeypatch, fake_op):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, typo)
    with pytest.raises(_dispatch.UnknownBackendError) as info:
        _dispatch.call("fake_op", torch.ones(2))
    msg = str(info.value)
    assert repr(typo) in msg and _dispatch.BACKEND_ENV in msg
    for name in ("auto", *_dispatch.backend_names()):
        assert name in msg
    assert fake_op == []  # raised before any backend ran
    with pytest.raises(ValueError):  # UnknownBackendError is a ValueError
        _dispatch.forced_backend()
    with pytest.raises(_dispatch.UnknownBackendError):
        _dispatch.chosen_by_device("cpu")


@pytest.mark.parametrize(("value", "want"), [("", None), ("auto", None), (" Ref ", "ref")])
def test_auto_and_case_insensitive_names(value, want, monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, value)
    assert _dispatch.forced_backend() == want


def test_a_name_this_op_lacks_means_its_fast_path(monkeypatch, fake_op):
    """'cuda' is a backend of pgd_step_, not of a Triton-only op: there it selects the op's own
    preference order (the fast path when it fits), not an error and not the reference."""
    assert "cuda" not in [b.name for b in _dispatch._OPS["fake_op"]]
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cuda")
    assert _dispatch.select("fake_op", torch.ones(2)).name == "triton"
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "ref")
    assert _dispatch.select("fake_op", torch.ones(2)).name == "ref"


def test_head_ce_with_backend_cuda_on_cpu_tensors_uses_its_automatic_choice(monkeypatch):
    """The same rule on a real op: ADVCAL_BACKEND=cuda leaves head_ce to its automatic choice,
    which for CPU tensors is the fused CPU path (float32/bfloat16; the reference otherwise)."""
    e = torch.randn(4096, 64)  # 4096 x 1024 x 64 multiply-adds: above CPU_MIN_MACS
    c = torch.nn.functional.normalize(torch.randn(1024, 64), dim=-1)
    y = torch.randint(0, 1024, (4096,))
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cuda")
    assert _dispatch.select("head_ce", e, None, None, c, y, 0.1).name == "cpu"
    assert _dispatch.select("head_ce", e.half(), None, None, c.half(), y, 0.1).name == "ref"
    assert _dispatch.select("head_ce", e[:3], None, None, c, y[:3], 0.1).name == "ref"  # small


def test_chosen_by_device_judges_fused_ops_by_device(monkeypatch):
    """On a GPU host `advcal info` must still report the CPU path for CPU tensors: the
    fused ops' why_not carries a per-device check (not only the machine-wide one)."""
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(HEAD, "_triton_import_error", lambda: None)
    cpu, cuda = _dispatch.chosen_by_device("cpu"), _dispatch.chosen_by_device("cuda")
    for op in FUSED:
        assert cpu[op] == "cpu", (op, cpu[op])
        assert cuda[op] == "triton", (op, cuda[op])
    # and without a GPU, the CUDA column says why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda = _dispatch.chosen_by_device("cuda")
    for op in FUSED:
        assert cuda[op] == "ref"
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "triton")
    forced = _dispatch.chosen_by_device("cpu")
    for op in FUSED:
        assert forced[op].startswith("triton cannot run: takes CUDA tensors"), forced[op]
