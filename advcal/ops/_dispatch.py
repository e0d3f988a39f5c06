"""One dispatcher for every fast op.

Each op lists its backends in order of preference (e.g. ``cuda`` extension, ``triton``,
``ref``). A backend declares, for concrete inputs, why it *cannot* run them (``None`` when it
can). The first that can run wins. ``ADVCAL_BACKEND=<name>`` forces a backend for every op; a
forced backend that cannot run the inputs raises one error listing its reason, never a silent
fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BACKEND_ENV = "ADVCAL_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the given inputs."""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``why_not(*args, **kwargs)`` returns ``None`` when the backend can run those inputs, or a
    short reason (``"tensors are on cpu"``, ``"advcal._C not built: ..."``) when it cannot.
    """

    name: str
    fn: Callable
    why_not: Callable[..., str | None]


_OPS: dict[str, tuple[Backend, ...]] = {}


def register(op: str, backends: Sequence[Backend]) -> None:
    if not backends or backends[-1].name != "ref":
        raise ValueError(f"op {op}: the last backend must be the reference ('ref')")
    _OPS[op] = tuple(backends)


def forced_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    return None if value in ("", "auto") else value


def select(op: str, *args, **kwargs) -> Backend:
    """The backend that will run ``op`` on these inputs."""
    backends = _OPS[op]
    forced = forced_backend()
    if forced is not None:
        names = [b.name for b in backends]
        if forced not in names:
            if forced == "ref":  # unreachable: every op has a ref
                raise AssertionError(op)
            # a backend this op does not have (e.g. 'cuda' for a Triton-only op): use the
            # op's own preference order, so ADVCAL_BACKEND=cuda means "the fast GPU path".
            forced = None
        else:
            backend = backends[names.index(forced)]
            reason = backend.why_not(*args, **kwargs)
            if reason is not None:
                raise BackendUnavailableError(
                    f"{BACKEND_ENV}={forced} cannot run advcal.{op}: {reason}. "
                    f"Unset {BACKEND_ENV} (or set it to 'ref') to use the reference."
                )
            return backend
    for backend in backends:
        if backend.why_not(*args, **kwargs) is None:
            return backend
    raise AssertionError(f"op {op}: the reference refused its inputs")  # ref always fits


def call(op: str, *args, **kwargs):
    return select(op, *args, **kwargs).fn(*args, **kwargs)


def describe() -> dict[str, dict[str, str]]:
    """For ``advcal info``: per op, each backend and whether/why it is unavailable in general.

    Backends may expose ``why_not`` without inputs via a ``why_not_general`` attribute on
    ``fn``; otherwise only their name is listed.
    """
    out: dict[str, dict[str, str]] = {}
    for op, backends in _OPS.items():
        out[op] = {}
        for b in backends:
            general = getattr(b.why_not, "general", None)
            reason = general() if callable(general) else None
            out[op][b.name] = "available" if reason is None else f"unavailable: {reason}"
    return out


def ops() -> tuple[str, ...]:
    return tuple(_OPS)


def chosen_by_device(device: str) -> dict[str, str]:
    """For ``advcal info``: the backend each op would use for tensors on ``device``, judged by
    each backend's ``why_not.device(device)`` when it has one (else by its general check)."""
    out: dict[str, str] = {}
    forced = forced_backend()
    for op, backends in _OPS.items():
        for b in backends:
            if forced is not None and forced in [x.name for x in backends] and b.name != forced:
                continue
            check = getattr(b.why_not, "device", None)
            general = getattr(b.why_not, "general", None)
            reason = (
                check(device) if callable(check) else (general() if callable(general) else None)
            )
            if reason is None:
                out[op] = b.name
                break
            out[op] = f"{b.name} cannot run: {reason}"
    return out
