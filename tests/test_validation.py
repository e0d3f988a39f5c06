"""advcal.validation: config fields checked against their type hints, devices, finite tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

from advcal import CalibConfig, EvalConfig, InputSpec, Objective, RunConfig, validation
from advcal.errors import ConfigError, FileFormatError, UserError


@dataclass(frozen=True)
class Inner:
    k: int = 1

    def __post_init__(self) -> None:
        validation.check_fields(self)
        if self.k < 0:
            raise ValueError(f"Inner.k must be >= 0, got {self.k}")


@dataclass(frozen=True)
class Outer:
    n: int = 1
    x: float = 0.5
    flag: bool = False
    name: str = "a"
    opt: int | None = None
    mode: Literal["a", "b"] = "a"
    many: tuple[int, ...] = (1,)
    pair: tuple[int, str] = (1, "x")
    names: list[str] = field(default_factory=list)
    either: int | tuple[int, ...] = 1
    table: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        validation.check_fields(self)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"n": True}, "Outer.n must be an int, got True (bool)"),
        ({"n": 15.5}, "Outer.n must be an int, got 15.5 (float)"),
        ({"n": 15.0}, "Outer.n must be an int, got 15.0 (float)"),
        ({"n": "3"}, "Outer.n must be an int, got '3' (str)"),
        ({"n": None}, "Outer.n must be an int, got None"),
        ({"x": True}, "Outer.x must be a finite number, got True (bool)"),
        ({"x": "0.1"}, "Outer.x must be a finite number, got '0.1'"),
        ({"x": math.nan}, "Outer.x must be a finite number, got nan"),
        ({"x": math.inf}, "Outer.x must be a finite number, got inf"),
        ({"x": -math.inf}, "Outer.x must be a finite number, got -inf"),
        ({"flag": 1}, "Outer.flag must be true or false, got 1 (int)"),
        ({"flag": "yes"}, "Outer.flag must be true or false, got 'yes'"),
        ({"name": 3}, "Outer.name must be a str, got 3 (int)"),
        ({"opt": 2.5}, "Outer.opt must be an int, or None, got 2.5"),
        ({"mode": "c"}, "Outer.mode must be one of 'a', 'b', got 'c'"),
        ({"mode": 1}, "Outer.mode must be one of 'a', 'b', got 1"),
        ({"many": 3}, "Outer.many must be a list of int, got 3 (int)"),
        ({"many": "123"}, "Outer.many must be a list of int, got '123' (str)"),
        ({"many": [1, True]}, "Outer.many must be a list of int, got [1, True]"),
        ({"pair": (1, 2)}, "Outer.pair must be a list of 2 values (an int, a str)"),
        ({"pair": (1,)}, "Outer.pair must be a list of 2 values"),
        ({"names": "abc"}, "Outer.names must be a list of str, got 'abc'"),
        ({"either": [1, 2.5]}, "Outer.either must be an int, or a list of int"),
        ({"table": [1, 2]}, "Outer.table must be a table (dict), got [1, 2]"),
        ({"inner": 3}, "Outer.inner must be a Inner or a table of its keys, got 3"),
        (
            {"inner": {"k": True}},
            "Inner.k must be an int, got True (bool) (config section [inner])",
        ),
        ({"inner": {"k": -1}}, "Inner.k must be >= 0, got -1 (config section [inner])"),
        ({"inner": {"j": 1}}, "unknown key(s) ['j'] for Inner; known: ['k']"),
    ],
)
def test_check_fields_refuses_with_class_field_value_and_allowed(kw, needle):
    with pytest.raises(ConfigError) as info:
        Outer(**kw)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    assert isinstance(info.value, UserError)


def test_check_fields_normalises_what_files_and_callers_give():
    o = Outer(
        n=3,
        x=2,
        many=[1, 2],
        pair=[4, "y"],
        names=("a", "b"),
        either=[1, 2],
        table={"a": 1},
        inner={"k": 5},
        name=Path("p/q"),
    )
    assert o.x == 2.0 and isinstance(o.x, float)
    assert o.many == (1, 2) and o.pair == (4, "y") and o.names == ["a", "b"]
    assert o.either == (1, 2) and o.inner == Inner(5) and o.name == str(Path("p/q"))
    assert Outer(either=4).either == 4 and Outer(opt=None).opt is None


def test_numpy_scalars_are_numbers_not_bools():
    np = pytest.importorskip("numpy")
    o = Outer(n=np.int64(4), x=np.float32(0.25))
    assert o.n == 4 and type(o.n) is int and o.x == 0.25 and type(o.x) is float
    with pytest.raises(ConfigError, match=r"Outer\.flag"):
        Outer(flag=np.bool_(True))


def test_advcal_configs_use_it_and_keep_their_own_checks():
    with pytest.raises(ConfigError, match=r"CalibConfig.epochs must be an int, got True"):
        CalibConfig(epochs=True)
    with pytest.raises(ConfigError, match=r"CalibConfig.batch_size must be an int, got 15.5"):
        CalibConfig(batch_size=15.5)
    with pytest.raises(ValueError, match=r"CalibConfig\.epochs must be positive"):
        CalibConfig(epochs=0)  # the hand-written range check still runs
    with pytest.raises(ConfigError, match=r"EvalConfig.sweep must be a list of finite number"):
        EvalConfig(sweep=["a"])
    with pytest.raises(ConfigError, match=r"Objective.tau must be a finite number, got nan"):
        Objective(tau=math.nan)
    with pytest.raises(ConfigError, match=r"InputSpec.norm must be one of 'linf', 'l2'"):
        InputSpec((3,), norm="l1")
    assert EvalConfig(sweep=[1, 2]).sweep == (1.0, 2.0)  # a list of ints: a tuple of floats
    assert InputSpec([3, 4], 0, 1, 1).shape == (3, 4)
    assert CalibConfig(objective={"ce": 2}).objective == Objective(ce=2.0)


def test_runconfig_nested_errors_name_their_section():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({"calib": {"objective": {"tau": "x"}}})
    assert "Objective.tau" in str(info.value) and "[calib.objective]" in str(info.value)
    with pytest.raises(ConfigError, match=r"RunConfig.calib must be a CalibConfig"):
        RunConfig.from_dict({"calib": [1, 2]})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epochz'\] for RunConfig"):
        RunConfig.from_dict({"epochz": 3})


@pytest.mark.parametrize("text", ["gpu", "GPU", "gpu:0"])
def test_gpu_is_refused_naming_cuda(text):
    with pytest.raises(ConfigError, match="use device='cuda'"):
        validation.parse_device(text)
    with pytest.raises(ConfigError, match="cuda"):
        RunConfig(device=text)


@pytest.mark.parametrize("text", ["tpu", "cuda:x", "cpu:0:1", "", "cuda:-1"])
def test_bad_device_strings(text):
    with pytest.raises(ConfigError, match="is not a device"):
        validation.parse_device(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_absent_cuda_is_refused_naming_what_is_there():
    with pytest.raises(UserError) as info:
        validation.check_device("cuda")
    assert "cuda requested but this machine has no CUDA device" in str(info.value)
    assert "available: cpu" in str(info.value)
    assert RunConfig(device="cuda").device == "cuda"  # a config may name it; a run refuses
    assert validation.check_device("cpu") == torch.device("cpu")


def test_check_device_index_out_of_range():
    n = torch.cuda.device_count()
    with pytest.raises(UserError, match="available: cpu"):
        validation.check_device(f"cuda:{n + 3}")


def test_check_finite_names_what_and_row():
    t = torch.ones(4, 3)
    validation.check_finite(t, "x")
    t[2, 1] = math.inf
    with pytest.raises(FileFormatError, match=r"centers file c.st: contains NaN or Inf \(first "):
        validation.check_finite(t, "centers file c.st:")
    with pytest.raises(FileFormatError, match="row 2"):
        validation.check_finite(t, "t")


def test_check_inputs_casts_float_dtypes_and_refuses_ints_and_nan():
    x64 = torch.rand(3, 2, dtype=torch.float64)
    out = validation.check_inputs({"image": x64, "audio": torch.rand(3, 4).half()}, "ds")
    assert out["image"].dtype == torch.float32 and torch.equal(out["image"], x64.float())
    assert out["audio"].dtype == torch.float32
    keep = torch.rand(3, 2)
    assert validation.check_inputs({"image": keep}, "ds")["image"] is keep  # no copy
    with pytest.raises(FileFormatError, match=r"ds: inputs\['image'\] has dtype torch.uint8"):
        validation.check_inputs({"image": torch.zeros(2, 2, dtype=torch.uint8)}, "ds")
    bad = torch.rand(3, 2)
    bad[1, 0] = math.nan
    with pytest.raises(FileFormatError, match=r"ds: inputs\['image'\] contains NaN or Inf"):
        validation.check_inputs({"image": bad}, "ds")


def test_check_state_names_the_tensor_and_both_shapes():
    want = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    validation.check_state(want, {"w": torch.ones(4, 4), "b": torch.ones(4)}, "f")
    with pytest.raises(FileFormatError, match=r"f: tensor 'w' has shape \(3, 4\), .* \(4, 4\)"):
        validation.check_state(want, {"w": torch.ones(3, 4), "b": torch.ones(4)}, "f")
    with pytest.raises(FileFormatError, match=r"missing tensors \['b'\]"):
        validation.check_state(want, {"w": torch.ones(4, 4)}, "f")
    with pytest.raises(FileFormatError, match=r"tensor 'b' contains NaN"):
        validation.check_state(want, {"w": torch.ones(4, 4), "b": torch.full((4,), math.nan)}, "f")
