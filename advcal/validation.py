"""Validation at the boundary: config fields against their type hints, devices, finite tensors,
dataset inputs.

:func:`check_fields` is the first line of every config dataclass's ``__post_init__``
(``RunConfig``, ``CalibConfig``, ``EvalConfig``, ``Objective``, ``InputSpec``): it checks each
field against its type hint and normalises what a TOML/JSON file or a Python caller naturally
gives, so the hand-written range checks after it see the declared types:

* ``int``: an int, never a bool (``epochs=true``) nor a float (``batch_size=15.5``, ``15.0``);
* ``float``: an int or a float, never a bool, finite (NaN/Inf refused); stored as ``float``;
* ``bool``: ``True``/``False`` only (``1`` and ``"yes"`` refused);
* ``str``: a str (a ``pathlib.Path`` is stored as its str);
* ``tuple[X, ...]`` / ``list[X]``: a list or tuple of ``X`` (a bare str is not a tuple of str);
* ``Literal[...]``: one of the choices; ``X | None``: ``None`` or ``X``; unions: the first
  member that fits;
* a nested config dataclass: an instance, or a mapping of its keys (unknown keys refused).

Every error is one :class:`~advcal.errors.ConfigError` naming ``Class.field``, the value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

import torch

from advcal.errors import ConfigError, FileFormatError, UserError


class _Mismatch(Exception):
    """Internal: the value does not fit a hint (the caller writes the message)."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    """``tuple[int, ...] | None`` -> ``"a list of int, or None"`` (for error messages)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if hint is Any:
        return "anything"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an int"
    if hint is float:
        return "a finite number"
    if hint is str:
        return "a str"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return ", or ".join(_describe(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} values (" + ", ".join(map(_describe, args)) + ")"
        inner = args[0] if args else Any
        return f"a list of {_describe(inner).removeprefix('an ').removeprefix('a ')}"
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        return "a table (dict)"
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} or a table of its keys"
    return getattr(hint, "__name__", str(hint))


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """``value`` as ``hint`` declares it, or raise :class:`_Mismatch`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for a in args:  # first member that fits; a nested error of a fitting kind wins
            try:
                return _coerce(a, value, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if _is_int(value):
            return int(value)
        raise _Mismatch
    if hint is float:
        if _is_int(value) or (isinstance(value, numbers.Real) and not isinstance(value, bool)):
            f = float(value)
            if not math.isfinite(f):
                raise ConfigError(f"{where} must be a finite number, got {value!r}")
            return f
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise _Mismatch
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):  # a str is a sequence, never a list of values
            raise _Mismatch
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch
            items = [
                _coerce(a, v, f"{where}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            ]
        else:
            inner = args[0] if args else Any
            items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or hint) is tuple else list(items)
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _Mismatch
        if len(args) == 2:
            return {
                _coerce(args[0], k, f"{where} key"): _coerce(args[1], v, f"{where}[{k!r}]")
                for k, v in value.items()
            }
        return dict(value)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return build(hint, value, section=where.split(".", 1)[-1])
        raise _Mismatch
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value  # a hint this checker does not model: left to the class's own checks


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def check_fields(obj: Any) -> None:
    """Check (and normalise, in place, frozen or not) every field of the dataclass ``obj``
    against its type hint. Raises :class:`ConfigError` naming ``Class.field``."""
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(obj):
        if f.name not in hints:
            continue
        where = f"{cls.__name__}.{f.name}"
        value = getattr(obj, f.name)
        try:
            new = _coerce(hints[f.name], value, where)
        except _Mismatch:
            raise ConfigError(
                f"{where} must be {_describe(hints[f.name])}, got {_show(value)}"
            ) from None
        if new is not value:
            object.__setattr__(obj, f.name, new)


def build(cls: type, values: Mapping, section: str | None = None) -> Any:
    """``cls(**values)`` for a config dataclass, refusing unknown keys by name; errors carry
    ``section`` (the config-file table the values came from, e.g. ``"calib"``)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{cls.__name__} needs a table of keys, got {_show(values)}", section)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(k) for k in values if k not in names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}", section
        )
    try:
        return cls(**values)
    except ConfigError as err:
        inner = f"{section}.{err.section}" if section and err.section else section or err.section
        raise ConfigError(err.message, inner) from None
    except (ValueError, TypeError) as err:  # a hand-written check of the class
        raise ConfigError(str(err), section) from None


# -- devices ---------------------------------------------------------------------------------

_DEVICE = re.compile(r"^(cpu|cuda|mps|meta)(:(\d+))?$")


def parse_device(device: str | torch.device, name: str = "device") -> str:
    """The device string, syntax only (a config may name a device this machine lacks; it is
    checked with :func:`check_device` where the work runs). ``gpu`` is refused naming ``cuda``."""
    text = str(device).strip()
    if text.lower() in ("gpu", "cuda:gpu") or text.lower().startswith("gpu:"):
        idx = text.partition(":")[2]
        raise ConfigError(
            f"{name}={text!r}: PyTorch calls a GPU 'cuda'; "
            f"use {name}='cuda' (or 'cuda:{idx or 'N'}')"
        )
    if not _DEVICE.match(text):
        raise ConfigError(f"{name}={text!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'")
    return text


def available_devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def check_device(device: str | torch.device, name: str = "device") -> torch.device:
    """The device, refused when this machine does not have it (naming what it has)."""
    text = parse_device(device, name)
    dev = torch.device(text)
    have = available_devices()
    where = ", ".join(have)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"{name}={text!r}: cuda requested but this machine has no CUDA device "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                f"available: {where}"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"{name}={text!r}: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s); available: {where}"
            )
    elif dev.type == "mps" and "mps" not in have:
        raise UserError(f"{name}={text!r}: this machine has no MPS device; available: {where}")
    elif dev.type == "meta":
        raise UserError(f"{name}={text!r}: the meta device holds no data; available: {where}")
    return dev


# -- tensors and datasets ----------------------------------------------------------------------


def check_finite(t: torch.Tensor, what: str) -> None:
    """Refuse NaN/Inf in ``t``, naming ``what`` (a file, a tensor) and the first bad row."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1) if t.dim() else None
        rows = "" if bad is None else f" (first at row {int(bad.nonzero()[0, 0])})"
        raise FileFormatError(f"{what} contains NaN or Inf{rows}; advcal refuses non-finite values")


def check_state(expected: Mapping[str, torch.Tensor], got: Mapping[str, Any], source: str) -> None:
    """Refuse a saved state (heads file, checkpoint) that does not fit the module it loads
    into: missing or unknown tensors, a tensor of another shape (naming both shapes), a
    non-tensor, NaN/Inf. ``source`` names the file (and the part of it)."""
    missing = sorted(set(expected) - set(got))
    unknown = sorted(set(got) - set(expected))
    if missing or unknown:
        raise FileFormatError(
            f"{source} does not fit the heads: missing tensors {missing}, unknown tensors {unknown}"
        )
    for k, want in expected.items():
        t = got[k]
        if not isinstance(t, torch.Tensor):
            raise FileFormatError(f"{source}: {k!r} is {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(want.shape):
            raise FileFormatError(
                f"{source}: tensor {k!r} has shape {tuple(t.shape)}, the heads need "
                f"{tuple(want.shape)}"
            )
        if not t.is_floating_point():
            raise FileFormatError(f"{source}: tensor {k!r} has dtype {t.dtype}, not floating")
        check_finite(t, f"{source}: tensor {k!r}")


FLOAT_INPUTS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_inputs(inputs: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Dataset inputs at the boundary: every modality a floating tensor with finite values;
    float64/float16/bfloat16 cast to float32 (the dtype every backbone and attack computes
    in: casting is exact for fp16/bf16, and fp64 inputs in a valid range lose nothing an
    attack's eps could see). Integer inputs are refused (a dataset stores inputs in their
    valid float range, e.g. pixels in [0, 1], not uint8 0..255)."""
    out = {}
    for m, x in inputs.items():
        if not isinstance(x, torch.Tensor):
            raise FileFormatError(f"{where}: inputs[{m!r}] is {type(x).__name__}, not a tensor")
        if not x.is_floating_point():
            raise FileFormatError(
                f"{where}: inputs[{m!r}] has dtype {x.dtype}; inputs must be floating point in "
                f"the modality's valid range (e.g. pixels as float in [0, 1], not uint8)"
            )
        if x.dtype not in FLOAT_INPUTS:
            raise FileFormatError(f"{where}: inputs[{m!r}] has unsupported dtype {x.dtype}")
        check_finite(x, f"{where}: inputs[{m!r}]")
        out[m] = x.float() if x.dtype != torch.float32 else x
    return out


__all__ = [
    "available_devices",
    "build",
    "check_device",
    "check_fields",
    "check_finite",
    "check_inputs",
    "check_state",
    "parse_device",
]
