"""One dispatcher for every fast op.

Each op lists its backends in order of preference (e.g. ``cuda`` extension, ``triton``,
``ref``). A backend declares, for concrete inputs, why it *cannot* run them (``None`` when it
can). The first that can run wins. ``ADVCAL_BACKEND=<name>`` forces a backend for every op; a
forced backend that cannot run the inputs raises one error listing its reason, never a silent
fallback.

Valid values of ``ADVCAL_BACKEND``: ``auto`` (or unset), or the name of any registered backend
(:func:`backend_names`: ``cuda``, ``cpp``, ``triton``, ``ref``); anything else raises
:class:`UnknownBackendError` naming them. A name that some op registers but another lacks means
*that other op's own fast path*: ``ADVCAL_BACKEND=cuda`` runs ``pgd_step_`` on the CUDA
extension and the Triton-only ``head_ce`` / ``infonce`` on Triton (their automatic choice), so
one setting selects "the GPU path" everywhere. ``ref`` exists for every op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BACKEND_ENV = "ADVCAL_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the given inputs."""


class UnknownBackendError(ValueError):
    """``ADVCAL_BACKEND`` names no registered backend."""


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


def backend_names() -> tuple[str, ...]:
    """Every backend name some registered op has (the valid ``ADVCAL_BACKEND`` values, with
    ``auto``)."""
    return tuple(sorted({b.name for backends in _OPS.values() for b in backends}))


def forced_backend() -> str | None:
    """The backend ``ADVCAL_BACKEND`` forces, or None for ``auto``/unset; a typo raises."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in backend_names():
        valid = ", ".join(("auto", *backend_names()))
        raise UnknownBackendError(
            f"{BACKEND_ENV}={value!r} is not a backend; use one of: {valid} (or unset it)"
        )
    return value


def select(op: str, *args, **kwargs) -> Backend:
    """The backend that will run ``op`` on these inputs."""
    backends = _OPS[op]
    forced = forced_backend()
    if forced is not None:
        names = [b.name for b in backends]
        if forced not in names:
            # a backend another op has but this one lacks (e.g. 'cuda' for the Triton-only
            # head_ce): this op's own preference order, so ADVCAL_BACKEND=cuda means "the fast
            # GPU path" for every op (see the module docstring)
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
